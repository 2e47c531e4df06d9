"""laplace-torch names whose bayescurv implementation is looked up on first use.

The per-structure classes (``FullLaplace``, ``KronLLLaplace``, ...) are thin names
over :mod:`bayescurv.laplace`'s posteriors; they are resolved when first imported
from a compat module, so a compat module imports even where a name is not provided
(then importing that name raises naming it).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

_SOURCES = ("bayescurv.laplace.flavors", "bayescurv.laplace")


def _lookup(name: str) -> Any:
    for source in _SOURCES:
        try:
            module = importlib.import_module(source)
        except ModuleNotFoundError as error:
            if error.name != source:
                raise
            continue
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(name)


def pending(module: str, names: list[str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` resolving ``names`` from bayescurv's Laplace layer.

    Args:
        module: The compat module's ``__name__`` (for error messages).
        names: The laplace-torch names it provides.
    """

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        try:
            return _lookup(name)
        except AttributeError:
            raise AttributeError(
                f"module {module!r}: bayescurv does not provide laplace-torch's "
                f"{name} (yet); use bayescurv.Laplace(...) with the matching options."
            ) from None

    return __getattr__
