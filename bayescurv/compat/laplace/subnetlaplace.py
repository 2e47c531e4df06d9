"""laplace-torch's ``laplace.subnetlaplace``: the subnetwork Laplace classes."""

from bayescurv.compat.laplace._pending import pending
from bayescurv.laplace import SubnetLaplace

__all__ = [
    "SubnetLaplace",
]

# names resolved on first use (not in __all__ until every one is provided)
__getattr__ = pending(__name__, ["FullSubnetLaplace", "DiagSubnetLaplace"])
