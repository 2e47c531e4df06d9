"""laplace-torch's ``laplace.curvature.curvlinops`` (engine-computed)."""

from bayescurv.laplace.laplace_torch.backends import (
    CurvlinopsEF,
    CurvlinopsGGN,
    CurvlinopsHessian,
    CurvlinopsInterface,
)

__all__ = [
    "CurvlinopsEF",
    "CurvlinopsGGN",
    "CurvlinopsHessian",
    "CurvlinopsInterface",
]
