"""The options of the Laplace layer as ``str`` enums (laplace-torch's names).

Every option accepts the enum member or its string value; an unknown value raises a
``ValueError`` that lists the valid ones (:func:`parse`).
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

from bayescurv.curvature.prior import PriorStructure

__all__ = [
    "CurvatureType",
    "FeatureReduction",
    "HessianStructure",
    "Likelihood",
    "LinkApprox",
    "PredType",
    "PriorStructure",
    "SubsetOfWeights",
    "TuningMethod",
    "parse",
]


class Likelihood(str, Enum):
    r"""The likelihood :math:`p(y \mid f)` of the model output ``f``."""

    CLASSIFICATION = "classification"
    """Categorical on the logits ``[N, C]`` (``CrossEntropyLoss``)."""
    REGRESSION = "regression"
    """Gaussian, noise ``sigma_noise``, on the output ``[N, K]`` (``MSELoss``)."""
    BINARY = "binary"
    """Bernoulli on the logits ``[N]`` or ``[N, K]`` (``BCEWithLogitsLoss``)."""
    REWARD_MODELING = "reward_modeling"
    """laplace-torch's reward modeling: fitted as classification on pairs
    (``x: [N, 2, ...]``, model output ``[N, 2]``, the preferred index as target),
    predicted as regression on single inputs (``[N, ...]`` -> rewards ``[N, 1]``)."""


class SubsetOfWeights(str, Enum):
    """Which weights get a Laplace posterior (the others stay at the MAP)."""

    ALL = "all"
    """Every trainable parameter."""
    LAST_LAYER = "last_layer"
    """The last ``nn.Linear`` layer (weight and bias), found automatically."""
    SUBNETWORK = "subnetwork"
    """Selected entries of the trainable parameters (``subnetwork_indices``)."""


class HessianStructure(str, Enum):
    """The structure of the posterior precision."""

    FULL = "full"
    """The dense GGN, ``[P, P]``."""
    KRON = "kron"
    """Kronecker factors per parameter tensor (KFLR, or KFAC with ``stochastic``)."""
    DIAG = "diag"
    """The GGN diagonal, ``[P]``."""
    LOWRANK = "lowrank"
    """Top ``rank`` GGN eigenpairs plus the diagonal of the remainder."""
    GP = "gp"
    """The function-space (GP) posterior of the linearized network
    (:mod:`bayescurv.laplace.function_space`)."""


class FeatureReduction(str, Enum):
    """How last-layer features ``[N, *T, H]`` (e.g. tokens) become ``[N, H]``."""

    PICK_FIRST = "pick_first"
    """The first position (e.g. a classification token)."""
    PICK_LAST = "pick_last"
    """The last position (e.g. the last token of a causal language model)."""
    AVERAGE = "average"
    """The mean over all positions."""


class CurvatureType(str, Enum):
    r"""Which matrix of second-order information the data term :math:`H` is."""

    GGN = "ggn"
    r"""The generalized Gauss-Newton :math:`\sum_n J_n^\top \nabla_f^2\ell_n J_n`
    (exact, or its Monte Carlo estimate, the Fisher, with ``stochastic=True``)."""
    EF = "ef"
    r"""The empirical Fisher :math:`\sum_n g_n g_n^\top` of the per-sample gradients."""
    HESSIAN = "hessian"
    """The Hessian of the loss (not positive semi-definite in general)."""


class PredType(str, Enum):
    """How the predictive distribution is formed."""

    GLM = "glm"
    """The linearized network, a Gaussian over the outputs."""
    NN = "nn"
    """Monte Carlo over network weights sampled from the posterior."""


class LinkApprox(str, Enum):
    """How the GLM's Gaussian over logits is pushed through the link function."""

    PROBIT = "probit"
    """The probit approximation, :math:`\\kappa = (1 + \\pi \\sigma^2 / 8)^{-1/2}`."""
    MC = "mc"
    """Monte Carlo over sampled logits."""
    BRIDGE = "bridge"
    """The Laplace bridge to a Dirichlet."""
    BRIDGE_NORM = "bridge_norm"
    """The normalized Laplace bridge."""


class TuningMethod(str, Enum):
    """How ``optimize_prior_precision`` tunes the prior precision."""

    MARGLIK = "marglik"
    """Gradient ascent on the log marginal likelihood (the evidence)."""
    GRIDSEARCH = "gridsearch"
    """Grid search on a validation loss."""


_E = TypeVar("_E", bound=Enum)


def parse(enum: type[_E], value: object, option: str) -> _E:
    """Convert an option to its enum member, naming the valid values otherwise.

    Args:
        enum: The enum class.
        value: A member or its string value.
        option: The option name, used in the error message.

    Returns:
        The member.

    Raises:
        ValueError: For an unknown value; the message lists the valid ones.
    """
    try:
        return enum(value)
    except ValueError:
        valid = ", ".join(repr(m.value) for m in enum)
        raise ValueError(
            f"unknown {option}={value!r}; valid values: {valid}."
        ) from None
