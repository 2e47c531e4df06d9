"""laplace-torch's ``laplace.subnetlaplace``: the subnetwork Laplace classes."""

from bayescurv.laplace import SubnetLaplace
from bayescurv.laplace.laplace_torch.flavors import (
    DiagSubnetLaplace,
    FullSubnetLaplace,
)

__all__ = [
    "DiagSubnetLaplace",
    "FullSubnetLaplace",
    "SubnetLaplace",
]
