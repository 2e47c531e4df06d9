"""laplace-torch's ``laplace.utils``: matrices, feature extraction, masks, helpers."""

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
from bayescurv.laplace.laplace_torch.feature_extractor import FeatureExtractor
from bayescurv.laplace.laplace_torch.linalg import (
    block_diag,
    diagonal_add_scalar,
    invsqrt_precision,
    kron,
    normal_samples,
    symeig,
)
from bayescurv.laplace.laplace_torch.matrix import Kron, KronDecomposed
from bayescurv.laplace.laplace_torch.prior_shapes import (
    expand_prior_precision,
    fix_prior_prec_structure,
    parameters_per_layer,
)
from bayescurv.laplace.laplace_torch.subset_of_data import SoDSampler
from bayescurv.laplace.laplace_torch.swag import fit_diagonal_swag_var
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
from bayescurv.laplace.tune.validation import RunningNLLMetric, get_nll, validate

__all__ = [
    "FeatureExtractor",
    "FunctionalApproximation",
    "HessianStructure",
    "Kron",
    "KronDecomposed",
    "LargestMagnitudeSubnetMask",
    "LargestVarianceDiagLaplaceSubnetMask",
    "LargestVarianceSWAGSubnetMask",
    "LastLayerSubnetMask",
    "Likelihood",
    "LinkApprox",
    "ModuleNameSubnetMask",
    "ParamNameSubnetMask",
    "PredType",
    "PriorStructure",
    "RandomSubnetMask",
    "RunningNLLMetric",
    "ScoreBasedSubnetMask",
    "SoDSampler",
    "SubnetMask",
    "SubsetOfWeights",
    "TuningMethod",
    "block_diag",
    "diagonal_add_scalar",
    "expand_prior_precision",
    "fit_diagonal_swag_var",
    "fix_prior_prec_structure",
    "get_nll",
    "invsqrt_precision",
    "kron",
    "normal_samples",
    "parameters_per_layer",
    "symeig",
    "validate",
]
