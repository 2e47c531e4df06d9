"""laplace-torch's ``laplace.curvature.asdl`` (engine-computed)."""

from bayescurv.laplace.laplace_torch.backends import (
    AsdlEF,
    AsdlGGN,
    AsdlHessian,
    AsdlInterface,
)

__all__ = [
    "AsdlEF",
    "AsdlGGN",
    "AsdlHessian",
    "AsdlInterface",
]
