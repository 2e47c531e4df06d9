"""laplace-torch's ``laplace`` package on bayescurv: ``import laplace`` -> this module.

Every name is bayescurv's implementation (see :mod:`bayescurv.laplace`; the
per-structure classes are aliases,
:mod:`bayescurv.laplace.laplace_torch.flavors`; the function-space classes
``FunctionalLaplace`` and ``FunctionalLLLaplace`` are
:mod:`bayescurv.laplace.function_space`'s, see ``docs/function_space.md`` for where
they differ from laplace-torch's).
"""

# NOTE [The function shadows its submodule]
# Imported through the submodule so that it is loaded here, before the name is bound:
# a later `import bayescurv.compat.laplace.marglik_training` then cannot rebind the
# package attribute to the module (laplace-torch's layout has the same name twice).
from bayescurv.compat.laplace.marglik_training import marglik_training
from bayescurv.laplace import (
    BaseLaplace,
    FunctionalLaplace,
    FunctionalLLLaplace,
    Laplace,
    SubnetLaplace,
)
from bayescurv.laplace.enums import (
    HessianStructure,
    Likelihood,
    LinkApprox,
    PredType,
    PriorStructure,
    SubsetOfWeights,
    TuningMethod,
)
from bayescurv.laplace.function_space import FunctionalApproximation
from bayescurv.laplace.laplace_torch.flavors import (
    DiagLaplace,
    DiagLLLaplace,
    DiagSubnetLaplace,
    FullLaplace,
    FullLLLaplace,
    FullSubnetLaplace,
    KronLaplace,
    KronLLLaplace,
    LLLaplace,
    LowRankLaplace,
    ParametricLaplace,
)

__all__ = [
    "BaseLaplace",
    "DiagLLLaplace",
    "DiagLaplace",
    "DiagSubnetLaplace",
    "FullLLLaplace",
    "FullLaplace",
    "FullSubnetLaplace",
    "FunctionalApproximation",
    "FunctionalLLLaplace",
    "FunctionalLaplace",
    "HessianStructure",
    "KronLLLaplace",
    "KronLaplace",
    "LLLaplace",
    "Laplace",
    "Likelihood",
    "LinkApprox",
    "LowRankLaplace",
    "ParametricLaplace",
    "PredType",
    "PriorStructure",
    "SubnetLaplace",
    "SubsetOfWeights",
    "TuningMethod",
    "marglik_training",
]
