"""laplace-torch's ``laplace.utils.utils``."""

from bayescurv.laplace.laplace_torch.linalg import (
    block_diag,
    diagonal_add_scalar,
    invsqrt_precision,
    kron,
    normal_samples,
    symeig,
)
from bayescurv.laplace.laplace_torch.prior_shapes import (
    expand_prior_precision,
    fix_prior_prec_structure,
    parameters_per_layer,
)
from bayescurv.laplace.laplace_torch.subset_of_data import SoDSampler
from bayescurv.laplace.tune.validation import get_nll, validate

__all__ = [
    "SoDSampler",
    "block_diag",
    "diagonal_add_scalar",
    "expand_prior_precision",
    "fix_prior_prec_structure",
    "get_nll",
    "invsqrt_precision",
    "kron",
    "normal_samples",
    "parameters_per_layer",
    "symeig",
    "validate",
]
