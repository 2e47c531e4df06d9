r"""Laplace approximations on the engine and the curvature structures.

The API mirrors laplace-torch's, so switching is one import line:

    from bayescurv import Laplace            # instead of: from laplace import Laplace
    la = Laplace(model, "classification", subset_of_weights="last_layer",
                 hessian_structure="kron")
    la.fit(train_loader)
    la.optimize_prior_precision(method="marglik")
    probs = la(x_test, pred_type="glm", link_approx="probit")

Where to look:

* :mod:`.posterior` — :class:`BaseLaplace`: ``fit``, ``la(x)``, the evidence, tuning;
  a thin object around the immutable fitted state and hyperparameters
  (:mod:`.state`);
* :mod:`.subsets` — one posterior class per weight subset (:class:`AllWeightsLaplace`,
  :class:`LastLayerLaplace`, :class:`SubnetLaplace`), each with every Hessian
  structure (``full``, ``kron``, ``diag``, ``lowrank``);
* :mod:`.function_space` — ``hessian_structure="gp"``: the linearized network as a
  GP (:class:`FunctionalLaplace`, :class:`FunctionalLLLaplace`);
* :mod:`.sources` — where the curvature comes from and how it is accumulated;
* :mod:`.predict` — the GLM and sampling predictives and link approximations;
* :mod:`.tune` — the evidence, its optimization, grid search, marglik training;
* :mod:`.serialization` — ``state_dict`` / ``load_state_dict``;
* :mod:`.distributed` — fitting across processes with ``torch.distributed``;
* :mod:`.subnetwork` — which weights a subnetwork posterior covers (masks);
* :mod:`.laplace_torch` — laplace-torch's class names, matrix forms, backends and
  utilities over this design.

See ``docs/laplace.md``.
"""

from bayescurv.laplace.boundary import InputTypeError
from bayescurv.laplace.data import MissingKeyError, ModelCallError
from bayescurv.laplace.distributed import DistributedFitError
from bayescurv.laplace.enums import (
    CurvatureType,
    FeatureReduction,
    HessianStructure,
    Likelihood,
    LinkApprox,
    PredType,
    PriorStructure,
    SubsetOfWeights,
    TuningMethod,
)
from bayescurv.laplace.factory import POSTERIORS, Laplace
from bayescurv.laplace.function_space import (
    FunctionalApproximation,
    FunctionalLaplace,
    FunctionalLLLaplace,
    FunctionSpaceLaplace,
)
from bayescurv.laplace.function_space.state import PriorChangeError
from bayescurv.laplace.hyper import HyperparameterTypeError
from bayescurv.laplace.laplace_torch.feature_extractor import FeatureExtractor
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
from bayescurv.laplace.likelihoods import LikelihoodModel
from bayescurv.laplace.posterior import (
    BaseLaplace,
    NotFittedError,
    UnknownBackendError,
)
from bayescurv.laplace.sources import NonFiniteCurvatureError
from bayescurv.laplace.state import FittedState, Hyperparameters
from bayescurv.laplace.subnetwork import (
    LargestMagnitudeSubnetMask,
    LargestVarianceDiagLaplaceSubnetMask,
    LargestVarianceSWAGSubnetMask,
    LastLayerSubnetMask,
    ModuleNameSubnetMask,
    ParamNameSubnetMask,
    RandomSubnetMask,
    ScoreBasedSubnetMask,
    SubnetMask,
)
from bayescurv.laplace.subsets import AllWeightsLaplace, LastLayerLaplace, SubnetLaplace
from bayescurv.laplace.tune.marglik_training import marglik_training

__all__ = [
    "POSTERIORS",
    "AllWeightsLaplace",
    "BaseLaplace",
    "CurvatureType",
    "DiagLLLaplace",
    "DiagLaplace",
    "DiagSubnetLaplace",
    "DistributedFitError",
    "FeatureExtractor",
    "FeatureReduction",
    "FittedState",
    "FullLLLaplace",
    "FullLaplace",
    "FullSubnetLaplace",
    "FunctionSpaceLaplace",
    "FunctionalApproximation",
    "FunctionalLLLaplace",
    "FunctionalLaplace",
    "HessianStructure",
    "HyperparameterTypeError",
    "Hyperparameters",
    "InputTypeError",
    "KronLLLaplace",
    "KronLaplace",
    "LLLaplace",
    "Laplace",
    "LargestMagnitudeSubnetMask",
    "LargestVarianceDiagLaplaceSubnetMask",
    "LargestVarianceSWAGSubnetMask",
    "LastLayerLaplace",
    "LastLayerSubnetMask",
    "Likelihood",
    "LikelihoodModel",
    "LinkApprox",
    "LowRankLaplace",
    "MissingKeyError",
    "ModelCallError",
    "ModuleNameSubnetMask",
    "NonFiniteCurvatureError",
    "NotFittedError",
    "ParamNameSubnetMask",
    "ParametricLaplace",
    "PredType",
    "PriorChangeError",
    "PriorStructure",
    "RandomSubnetMask",
    "ScoreBasedSubnetMask",
    "SubnetLaplace",
    "SubnetMask",
    "SubsetOfWeights",
    "TuningMethod",
    "UnknownBackendError",
    "marglik_training",
]
