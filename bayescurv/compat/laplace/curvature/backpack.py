"""laplace-torch's ``laplace.curvature.backpack`` (engine-computed)."""

from bayescurv.laplace.laplace_torch.backends import (
    BackPackEF,
    BackPackGGN,
    BackPackInterface,
)

__all__ = [
    "BackPackEF",
    "BackPackGGN",
    "BackPackInterface",
]
