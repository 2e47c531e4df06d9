"""laplace-torch's ``laplace.baselaplace``: the all-weights Laplace classes."""

from bayescurv.compat.laplace._pending import pending
from bayescurv.laplace import BaseLaplace

__all__ = [
    "BaseLaplace",
]

# names resolved on first use (not in __all__ until every one is provided)
__getattr__ = pending(
    __name__,
    [
        "ParametricLaplace",
        "FullLaplace",
        "KronLaplace",
        "DiagLaplace",
        "LowRankLaplace",
    ],
)
