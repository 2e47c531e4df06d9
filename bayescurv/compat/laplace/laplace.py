"""laplace-torch's ``laplace.laplace``: the ``Laplace`` factory."""

from bayescurv.laplace import Laplace

__all__ = [
    "Laplace",
]
