"""laplace-torch's ``laplace.utils.matrix``."""

from bayescurv.laplace.matrix import Kron, KronDecomposed

__all__ = [
    "Kron",
    "KronDecomposed",
]
