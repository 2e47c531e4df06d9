"""laplace-torch's ``laplace.baselaplace``: the all-weights Laplace classes."""

from bayescurv.laplace import BaseLaplace, FunctionalLaplace
from bayescurv.laplace.laplace_torch.flavors import (
    DiagLaplace,
    FullLaplace,
    KronLaplace,
    LowRankLaplace,
    ParametricLaplace,
)

__all__ = [
    "BaseLaplace",
    "DiagLaplace",
    "FullLaplace",
    "FunctionalLaplace",
    "KronLaplace",
    "LowRankLaplace",
    "ParametricLaplace",
]
