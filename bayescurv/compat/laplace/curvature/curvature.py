"""laplace-torch's ``laplace.curvature.curvature``."""

from bayescurv.laplace.laplace_torch.backends import (
    CurvatureInterface,
    EFInterface,
    GGNInterface,
    HessianInterface,
)

__all__ = [
    "CurvatureInterface",
    "EFInterface",
    "GGNInterface",
    "HessianInterface",
]
