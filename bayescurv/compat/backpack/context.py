"""The ``backpack`` and ``disable`` context managers and the state they set.

# NOTE [Global state, as in BackPACK]
# The active extensions are read by tensor hooks that autograd calls during
# ``loss.backward()``, possibly on one of its worker threads (CUDA), where context
# variables of the calling thread are not visible. The state is therefore a module
# global, like BackPACK's ``CTX``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from inspect import isclass
from types import TracebackType
from typing import Any

from torch import nn

from bayescurv.compat.backpack.extensions import BackpropExtension


@dataclass(frozen=True)
class Settings:
    """What one ``with backpack(...)`` block activates.

    Attributes:
        extensions: The active extensions.
        extension_hook: Called on every module of the extended model (and the loss)
            after the quantities are stored.
        debug: Print what is computed.
        retain_graph: Accepted for compatibility (stored inputs are never freed).
    """

    extensions: tuple[BackpropExtension, ...] = ()
    extension_hook: Callable[[nn.Module], None] | None = None
    debug: bool = False
    retain_graph: bool = False


_STACK: list[Settings] = [Settings()]
_STORE_IO = [True]
_INTERNAL = [0]


def active() -> Settings:
    """The settings of the innermost ``with backpack(...)`` block."""
    return _STACK[-1]


@contextmanager
def internal() -> Iterator[None]:
    """Mark bayescurv's own forward and backward passes: hooks ignore them."""
    _INTERNAL[0] += 1
    try:
        yield
    finally:
        _INTERNAL[0] -= 1


def is_internal() -> bool:
    """Whether bayescurv itself is running the model (see :func:`internal`)."""
    return _INTERNAL[0] > 0


class _Pushed:
    """A context manager that pushes ``_value`` onto ``_stack`` for its block."""

    _stack: list[Any]
    _value: Any

    def __enter__(self) -> None:
        self._stack.append(self._value)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stack.pop()


class backpack(_Pushed):
    """Activate extensions for the ``backward`` calls inside the block.

    Args:
        *exts: Extension instances (see :mod:`bayescurv.compat.backpack.extensions`).
        extension_hook: Function called on each module of the extended model and on
            the loss module after the quantities are stored (it may read and delete
            them). Default: none.
        debug: Print the extensions computed for each extended module.
        retain_graph: Accepted for compatibility; the inputs bayescurv stores live as
            long as the model output, so repeated backward passes always work.

    Raises:
        ValueError: If an argument is not an extension instance (a class is named as
            such) or two extensions share a savefield.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv.compat.backpack import backpack, extend
        >>> from bayescurv.compat.backpack.extensions import BatchGrad
        >>> model = extend(nn.Linear(3, 2))
        >>> lossfunc = extend(nn.MSELoss(reduction="sum"))
        >>> x, y = torch.randn(5, 3), torch.randn(5, 2)
        >>> loss = lossfunc(model(x), y)
        >>> with backpack(BatchGrad()):
        ...     loss.backward()
        >>> model.weight.grad_batch.shape
        torch.Size([5, 2, 3])
        >>> torch.allclose(model.weight.grad_batch.sum(0), model.weight.grad)
        True
    """

    def __init__(
        self,
        *exts: BackpropExtension,
        extension_hook: Callable[[nn.Module], None] | None = None,
        debug: bool = False,
        retain_graph: bool = False,
    ) -> None:
        for ext in exts:
            if isclass(ext) and issubclass(ext, BackpropExtension):
                raise ValueError(
                    f"backpack expects extension instances, got the class "
                    f"{ext.__name__}: write {ext.__name__}()."
                )
            if not isinstance(ext, BackpropExtension):
                raise ValueError(
                    f"backpack expects extensions from "
                    f"bayescurv.compat.backpack.extensions, got {ext!r} (extensions "
                    "of the original backpack package do not work here)."
                )
        savefields = [ext.savefield for ext in exts]
        duplicates = sorted({s for s in savefields if savefields.count(s) > 1})
        if duplicates:
            raise ValueError(
                f"Two extensions write the same savefield {duplicates}; give "
                "curvature-matrix products distinct savefield= arguments."
            )
        if extension_hook is not None and not callable(extension_hook):
            raise ValueError(
                f"extension_hook must be callable, got {type(extension_hook).__name__}."
            )
        self.settings = Settings(tuple(exts), extension_hook, debug, retain_graph)
        self._stack, self._value = _STACK, self.settings


class disable(_Pushed):
    """Do not store inputs in the forward passes inside the block.

    Backward passes through such a forward inside ``with backpack(...)`` raise.
    """

    _stack, _value = _STORE_IO, False

    @staticmethod
    def should_store_io() -> bool:
        """Whether forward passes store their inputs (``False`` inside the block)."""
        return _STORE_IO[-1]
