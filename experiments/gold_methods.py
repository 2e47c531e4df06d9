"""The methods compared with NUTS: every Laplace variant, the MAP, a deep ensemble.

A method maps a :class:`Fitted` problem and test inputs to a :class:`Prediction`.
The Laplace variants are data (:class:`LaplaceVariant`: subset x structure x prior x
predictive), so a new variant is one more entry of :data:`STRUCTURES` or of
:func:`methods`. The function-space (GP) Laplace (``hessian_structure="gp"``) is one
structure, on all data where the kernel fits (:data:`GP_MAX_ROWS`) and on random
subsets of the training points (:data:`GP_SUBSETS`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import torch
from pyro.infer import Predictive
from torch import Tensor, nn

from bayescurv import Laplace
from bayescurv.laplace import BaseLaplace
from bayescurv.laplace.pyro import to_pyro
from experiments.gold_problems import Data, Problem

SUBSETS = ("all", "last_layer")
"""Weight subsets of the Laplace variants."""
STRUCTURES = ("full", "kron", "diag", "lowrank", "gp")
"""Hessian structures of the Laplace variants (``"gp"``: the function-space GP)."""
GP_SUBSETS = (None, 50, 300)
"""Training points of the GP rows: all (``None``), then random subsets."""
GP_MAX_ROWS = 5000
"""The largest kernel (``n_subset`` x outputs rows) of a GP row.

Its fit computes the eigenvalues of a dense ``[rows, rows]`` matrix (``rows**3``): a
GP row whose kernel would be larger (digits with all 1,401 points: 14,010 rows,
minutes of one core and GBs per fit) is left out of the study, not approximated.
"""
PRIORS = ("fixed", "evidence")
"""``fixed``: NUTS's prior precision; ``evidence``: tuned by ``marglik`` (default)."""
PAIRWISE = "pairwise"
"""A link of this study only: the probit on every logit difference (see below)."""
LINKS = {
    "classification": ("probit", "mc", "bridge_norm", PAIRWISE),
    "regression": (None,),
}
"""GLM link approximations per likelihood (regression's GLM predictive is exact)."""


@dataclass(frozen=True)
class Prediction:
    """A predictive distribution at ``M`` test points.

    Classification: ``probs`` ``[M, C]``. Regression (of the function ``f``): a
    Gaussian ``f_mean``, ``f_var`` ``[M]`` and, for sampling methods, the draws
    ``f_samples`` ``[S, M]`` (the predictive of targets is then their mixture).
    """

    probs: Tensor | None = None
    f_mean: Tensor | None = None
    f_var: Tensor | None = None
    f_samples: Tensor | None = None

    @classmethod
    def from_outputs(cls, outputs: Tensor, likelihood: str) -> Prediction:
        """Average of networks: ``outputs`` ``[S, M, K]`` of ``S`` weight draws."""
        if likelihood == "classification":
            return cls(probs=outputs.softmax(-1).mean(0))
        f = outputs[..., 0]
        return cls(f_mean=f.mean(0), f_var=f.var(0, unbiased=False), f_samples=f)


@dataclass
class Fitted:
    """A problem with its data and MAP networks (``nets[0]`` is *the* MAP).

    Attributes:
        problem: The problem.
        data: Its data.
        nets: Networks at the MAP of initialization seeds ``0, 1, ...``.
        n_samples: Draws of every Monte Carlo predictive.
        seed: Seed of every Monte Carlo predictive.
        laplace: Fitted Laplace approximations by (subset, structure, prior, T).
    """

    problem: Problem
    data: Data
    nets: list[nn.Module]
    n_samples: int = 1000
    seed: int = 0
    laplace: dict[tuple, BaseLaplace] = field(default_factory=dict)


@dataclass(frozen=True)
class LaplaceVariant:
    """One Laplace approximation of the MAP ``nets[0]`` and one of its predictives.

    Attributes:
        subset: ``"all"`` or ``"last_layer"``.
        structure: ``"full"``, ``"kron"``, ``"diag"``, ``"lowrank"`` or ``"gp"``.
        prior: ``"fixed"`` (the problem's) or ``"evidence"`` (``marglik``-tuned).
        predictive: ``"glm"`` or ``"nn"`` (sampled networks; not for ``"gp"``).
        link: Classification GLM link approximation (``None`` otherwise).
        temperature: Posterior temperature.
        n_subset: ``"gp"`` only: the exact GP on this many random training
            points (``None``: all of them).
    """

    subset: str
    structure: str
    prior: str = "fixed"
    predictive: str = "glm"
    link: str | None = None
    temperature: float = 1.0
    n_subset: int | None = None

    @property
    def how(self) -> str:
        """The predictive and its link, e.g. ``glm probit`` or ``nn``."""
        return self.predictive + (f" {self.link}" if self.link else "")

    @property
    def kind(self) -> str:
        """The structure, with the GP's subset of data: ``kron``, ``gp 50 points``."""
        points = f" {self.n_subset} points" if self.n_subset is not None else ""
        return self.structure + points

    @property
    def name(self) -> str:
        """A table label, e.g. ``LA last_layer kron, evidence, glm probit``."""
        cold = f", T={self.temperature:g}" if self.temperature != 1 else ""
        return f"LA {self.subset} {self.kind}, {self.prior}, {self.how}{cold}"

    def applies(self, n_train: int, n_outputs: int) -> bool:
        """Whether the variant is in the study of ``n_train`` points of ``n_outputs``.

        A GP row needs a proper subset (``n_subset < n_train``) and a kernel of at
        most :data:`GP_MAX_ROWS` rows; the weight-space rows always apply.
        """
        if self.structure != "gp":
            return True
        if self.n_subset is None:
            return n_train * n_outputs <= GP_MAX_ROWS
        return self.n_subset < n_train and self.n_subset * n_outputs <= GP_MAX_ROWS

    def fit(self, fitted: Fitted) -> BaseLaplace:
        """The fitted (and, for ``evidence``, tuned) approximation, cached."""
        key = (self.subset, self.kind, self.prior, self.temperature)
        if key not in fitted.laplace:
            problem, data = fitted.problem, fitted.data
            gp = {"n_subset": self.n_subset} if self.structure == "gp" else {}
            la = Laplace(
                fitted.nets[0],
                problem.likelihood,
                subset_of_weights=self.subset,
                hessian_structure=self.structure,
                prior_precision=problem.prior_precision,
                sigma_noise=problem.sigma_noise,
                temperature=self.temperature,
                **gp,
            )
            la.fit([(data.x_train, data.y_train)])
            if self.prior == "evidence":
                la.optimize_prior_precision(method="marglik")
            fitted.laplace[key] = la
        return fitted.laplace[key]

    def __call__(self, fitted: Fitted, x: Tensor) -> Prediction:
        """The predictive at ``x``."""
        la = self.fit(fitted)
        gen = torch.Generator().manual_seed(fitted.seed)
        if fitted.problem.likelihood == "classification":
            if self.link == PAIRWISE:
                return Prediction(probs=pairwise_probit(*la.glm_moments(x)))
            if self.predictive == "nn":
                probs = la(
                    x, "nn", link_approx="mc", n_samples=fitted.n_samples, generator=gen
                )
            else:
                probs = la(
                    x, link_approx=self.link, n_samples=fitted.n_samples, generator=gen
                )
            return Prediction(probs=probs)
        if self.predictive == "nn":
            return Prediction.from_outputs(pyro_outputs(la, x, fitted), "regression")
        f_mu, f_var = la(x)
        return Prediction(f_mean=f_mu[:, 0], f_var=f_var[:, 0, 0])


# NOTE [Pairwise probit]
# The library's probit (laplace-torch's) scales every logit by its own marginal
# variance, softmax(f_k / sqrt(1 + pi/8 var f_k)), ignoring their covariance. Softmax
# depends on the logit differences only, and a shift shared by all logits (e.g. a
# last-layer bias under a weak prior) inflates every marginal variance without
# changing a single probability: on moons with the evidence-tuned last-layer prior
# the mean marginal variance is ~40x that of the difference. The pairwise form uses
# the variance of each difference, covariances included (exact for a shared shift;
# for two classes it is the binary probit of f_1 - f_0), as the mean-field
# approximations of Lu, Ie & Sha (2020) do with variances only.
def pairwise_probit(f_mu: Tensor, f_var: Tensor, scale: float = math.pi / 8) -> Tensor:
    r"""Class probabilities from the logit differences' probit approximations.

    .. math::
        p_k \propto \Big(1 + \sum_{j \ne k} \exp\big(-(\mu_k - \mu_j) /
        \sqrt{1 + \lambda \operatorname{Var}(f_k - f_j)}\big)\Big)^{-1}

    Args:
        f_mu: Logit means ``[M, C]``.
        f_var: Logit covariances ``[M, C, C]``.
        scale: :math:`\lambda` (the probit's :math:`\pi / 8`).

    Returns:
        ``[M, C]``, normalized.
    """
    marginal = torch.diagonal(f_var, dim1=-2, dim2=-1)
    diff_var = marginal[:, :, None] + marginal[:, None, :] - 2 * f_var
    gap = f_mu[:, :, None] - f_mu[:, None, :]
    exponent = -gap / torch.sqrt(1 + scale * diff_var.clamp_min(0))
    own = torch.eye(f_mu.shape[1], dtype=torch.bool, device=f_mu.device)
    probs = 1 / (1 + exponent.masked_fill(own, -math.inf).exp().sum(-1))
    return probs / probs.sum(-1, keepdim=True)


def pyro_outputs(la: BaseLaplace, x: Tensor, fitted: Fitted) -> Tensor:
    """Network outputs at Laplace draws through Pyro's ``Predictive``, ``[S, M, K]``."""
    model, guide = to_pyro(la)
    pyro.set_rng_seed(fitted.seed)
    predictive = Predictive(
        model,
        guide=guide,
        num_samples=fitted.n_samples,
        parallel=True,
        return_sites=["f"],
    )
    return predictive(x)["f"]


def map_prediction(fitted: Fitted, x: Tensor) -> Prediction:
    """The MAP network ``nets[0]`` (no weight uncertainty)."""
    with torch.no_grad():
        outputs = fitted.nets[0](x)[None]
    return Prediction.from_outputs(outputs, fitted.problem.likelihood)


ENSEMBLE_SIZE = 5


def ensemble_prediction(fitted: Fitted, x: Tensor) -> Prediction:
    """A deep ensemble: the average of the MAPs of 5 initializations."""
    with torch.no_grad():
        outputs = torch.stack([net(x) for net in fitted.nets[:ENSEMBLE_SIZE]])
    return Prediction.from_outputs(outputs, fitted.problem.likelihood)


Method = Callable[[Fitted, Tensor], Prediction]

DEFAULT = {
    "classification": LaplaceVariant("last_layer", "kron", "evidence", "glm", "probit"),
    "regression": LaplaceVariant("last_layer", "kron", "evidence", "glm"),
}
"""The library's documented default: last-layer KFAC, evidence-tuned prior, probit."""
RECOMMENDED = LaplaceVariant("all", "kron", "evidence", "glm", "bridge_norm", 0.2)
"""The recipe docs/laplace.md recommends for classification (a cold posterior)."""


def laplace_variants(
    likelihood: str, n_train: int | None = None, n_outputs: int = 1
) -> list[LaplaceVariant]:
    """Every subset x structure x prior x predictive, and the recommended recipe.

    ``nn`` only on all weights in weight space: on the last layer the network is
    linear in the weights, so ``nn`` is ``glm`` with Monte Carlo, and the GP has no
    weight samples. The GP rows come once per :data:`GP_SUBSETS` entry.

    Args:
        likelihood: ``"classification"`` or ``"regression"``.
        n_train: Training points of the problem: keep only the variants that
            apply to it (:meth:`LaplaceVariant.applies`); ``None``: all variants.
        n_outputs: Network outputs of the problem.
    """
    variants = []
    for subset in SUBSETS:
        for structure in STRUCTURES:
            for n_subset in GP_SUBSETS if structure == "gp" else (None,):
                for prior in PRIORS:
                    for link in LINKS[likelihood]:
                        variants.append(
                            LaplaceVariant(
                                subset, structure, prior, "glm", link, 1.0, n_subset
                            )
                        )
                    if subset == "all" and structure != "gp":
                        variants.append(LaplaceVariant(subset, structure, prior, "nn"))
    if likelihood == "classification":
        variants.append(RECOMMENDED)
    if n_train is None:
        return variants
    return [v for v in variants if v.applies(n_train, n_outputs)]


def methods(
    likelihood: str, n_train: int | None = None, n_outputs: int = 1
) -> dict[str, Method]:
    """All methods of the study by label: MAP, the deep ensemble, every variant.

    ``n_train`` and ``n_outputs`` as in :func:`laplace_variants`.
    """
    table: dict[str, Method] = {
        "MAP": map_prediction,
        f"deep ensemble ({ENSEMBLE_SIZE})": ensemble_prediction,
    }
    variants = laplace_variants(likelihood, n_train, n_outputs)
    table.update({variant.name: variant for variant in variants})
    return table
