"""laplace-torch's ``laplace.utils.matrix``."""

from bayescurv.laplace.laplace_torch.matrix import Kron, KronDecomposed

__all__ = [
    "Kron",
    "KronDecomposed",
]
