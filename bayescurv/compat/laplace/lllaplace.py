"""laplace-torch's ``laplace.lllaplace``: the last-layer Laplace classes."""

from bayescurv.laplace import FunctionalLLLaplace
from bayescurv.laplace.laplace_torch.flavors import (
    DiagLLLaplace,
    FullLLLaplace,
    KronLLLaplace,
    LLLaplace,
)

__all__ = [
    "DiagLLLaplace",
    "FullLLLaplace",
    "FunctionalLLLaplace",
    "KronLLLaplace",
    "LLLaplace",
]
