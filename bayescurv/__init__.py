"""bayescurv: information beyond the gradient, and Bayesian deep learning on it.

laplace-torch's public names are importable from here as from ``laplace``, so
switching is one import line (``from bayescurv import Laplace``); see
``docs/migrating.md``.
"""

from bayescurv import cockpit, curvature, engine, laplace, metrics, recipes, vivit
from bayescurv.laplace import (
    BaseLaplace,
    DiagLaplace,
    DiagLLLaplace,
    DiagSubnetLaplace,
    FullLaplace,
    FullLLLaplace,
    FullSubnetLaplace,
    FunctionalLaplace,
    FunctionalLLLaplace,
    HessianStructure,
    KronLaplace,
    KronLLLaplace,
    Laplace,
    Likelihood,
    LinkApprox,
    LLLaplace,
    LowRankLaplace,
    ParametricLaplace,
    PredType,
    PriorStructure,
    SubnetLaplace,
    SubsetOfWeights,
    TuningMethod,
    marglik_training,
)

__all__ = [
    "BaseLaplace",
    "DiagLLLaplace",
    "DiagLaplace",
    "DiagSubnetLaplace",
    "FullLLLaplace",
    "FullLaplace",
    "FullSubnetLaplace",
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
    "cockpit",
    "curvature",
    "engine",
    "laplace",
    "marglik_training",
    "metrics",
    "recipes",
    "vivit",
]
__version__ = "0.1.0"
