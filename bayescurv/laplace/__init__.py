r"""Laplace approximations on the engine and the curvature structures.

The API mirrors laplace-torch's, so switching is one import line:

    from bayescurv import Laplace            # instead of: from laplace import Laplace
    la = Laplace(model, "classification", subset_of_weights="last_layer",
                 hessian_structure="kron")
    la.fit(train_loader)
    la.optimize_prior_precision(method="marglik")
    probs = la(x_test, pred_type="glm", link_approx="probit")

One posterior class per weight subset (:class:`AllWeightsLaplace`,
:class:`LastLayerLaplace`, :class:`SubnetLaplace`) works with every Hessian structure
(``full``, ``kron``, ``diag``, ``lowrank``) through the builders of
:mod:`bayescurv.laplace.structures` and the objects of :mod:`bayescurv.curvature`.
See ``docs/laplace.md``.
"""

from bayescurv.laplace.enums import (
    HessianStructure,
    Likelihood,
    LinkApprox,
    PredType,
    PriorStructure,
    SubsetOfWeights,
    TuningMethod,
)
from bayescurv.laplace.factory import POSTERIORS, Laplace
from bayescurv.laplace.likelihoods import LikelihoodModel
from bayescurv.laplace.marglik_training import marglik_training
from bayescurv.laplace.posterior import BaseLaplace, NotFittedError
from bayescurv.laplace.structures import NonFiniteCurvatureError
from bayescurv.laplace.subnetwork import (
    LargestMagnitudeSubnetMask,
    LargestVarianceDiagLaplaceSubnetMask,
    ModuleNameSubnetMask,
    ParamNameSubnetMask,
    RandomSubnetMask,
    SubnetMask,
)
from bayescurv.laplace.subsets import AllWeightsLaplace, LastLayerLaplace, SubnetLaplace

__all__ = [
    "POSTERIORS",
    "AllWeightsLaplace",
    "BaseLaplace",
    "HessianStructure",
    "Laplace",
    "LargestMagnitudeSubnetMask",
    "LargestVarianceDiagLaplaceSubnetMask",
    "LastLayerLaplace",
    "Likelihood",
    "LikelihoodModel",
    "LinkApprox",
    "ModuleNameSubnetMask",
    "NonFiniteCurvatureError",
    "NotFittedError",
    "ParamNameSubnetMask",
    "PredType",
    "PriorStructure",
    "RandomSubnetMask",
    "SubnetLaplace",
    "SubnetMask",
    "SubsetOfWeights",
    "TuningMethod",
    "marglik_training",
]
