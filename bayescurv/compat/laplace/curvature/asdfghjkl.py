"""laplace-torch's ``laplace.curvature.asdfghjkl`` (engine-computed)."""

from bayescurv.laplace.laplace_torch.backends import (
    AsdfghjklEF,
    AsdfghjklGGN,
    AsdfghjklHessian,
    AsdfghjklInterface,
)

__all__ = [
    "AsdfghjklEF",
    "AsdfghjklGGN",
    "AsdfghjklHessian",
    "AsdfghjklInterface",
]
