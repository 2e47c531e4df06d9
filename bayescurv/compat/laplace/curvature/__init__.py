"""laplace-torch's ``laplace.curvature``: every backend computed by bayescurv's engine.

See :mod:`bayescurv.laplace.laplace_torch.backends`: the classes of one curvature
type (GGN, empirical Fisher, Hessian) compute the same matrix, whatever library they
are named after.
"""

from bayescurv.laplace.laplace_torch.backends import (
    AsdfghjklEF,
    AsdfghjklGGN,
    AsdfghjklHessian,
    AsdfghjklInterface,
    AsdlEF,
    AsdlGGN,
    AsdlHessian,
    AsdlInterface,
    BackPackEF,
    BackPackGGN,
    BackPackInterface,
    CurvatureInterface,
    CurvlinopsEF,
    CurvlinopsGGN,
    CurvlinopsHessian,
    CurvlinopsInterface,
    EFInterface,
    GGNInterface,
    HessianInterface,
)

__all__ = [
    "AsdfghjklEF",
    "AsdfghjklGGN",
    "AsdfghjklHessian",
    "AsdfghjklInterface",
    "AsdlEF",
    "AsdlGGN",
    "AsdlHessian",
    "AsdlInterface",
    "BackPackEF",
    "BackPackGGN",
    "BackPackInterface",
    "CurvatureInterface",
    "CurvlinopsEF",
    "CurvlinopsGGN",
    "CurvlinopsHessian",
    "CurvlinopsInterface",
    "EFInterface",
    "GGNInterface",
    "HessianInterface",
]
