"""laplace-torch's ``laplace`` package on bayescurv: ``import laplace`` -> this module.

Every name is bayescurv's implementation (see :mod:`bayescurv.laplace`); the
per-structure class names are resolved from the Laplace layer on first use.
"""

from bayescurv.compat.laplace._pending import pending

# NOTE [The function shadows its submodule]
# Imported through the submodule so that it is loaded here, before the name is bound:
# a later `import bayescurv.compat.laplace.marglik_training` then cannot rebind the
# package attribute to the module (laplace-torch's layout has the same name twice).
from bayescurv.compat.laplace.marglik_training import marglik_training
from bayescurv.laplace import BaseLaplace, Laplace, SubnetLaplace
from bayescurv.laplace.enums import (
    HessianStructure,
    Likelihood,
    LinkApprox,
    PredType,
    PriorStructure,
    SubsetOfWeights,
    TuningMethod,
)

__all__ = [
    "BaseLaplace",
    "HessianStructure",
    "Laplace",
    "Likelihood",
    "LinkApprox",
    "PredType",
    "PriorStructure",
    "SubnetLaplace",
    "SubsetOfWeights",
    "TuningMethod",
    "marglik_training",
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
        "LLLaplace",
        "FullLLLaplace",
        "KronLLLaplace",
        "DiagLLLaplace",
        "FullSubnetLaplace",
        "DiagSubnetLaplace",
    ],
)
