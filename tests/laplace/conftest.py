"""Fixtures of the Laplace tests: small float64 problems and dense references.

Every posterior is compared with a dense computation from
:mod:`bayescurv.engine.reference` (``torch.func``), never only with itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from bayescurv import Laplace
from bayescurv.engine import reference
from bayescurv.laplace import BaseLaplace
from tests.curvature.conftest import decomposition_sizes  # noqa: F401 (fixture)

N = 12  # training points
D_IN, HIDDEN = 3, 4


@dataclass
class Problem:
    """A small model at some parameters, with data, in float64."""

    likelihood: str
    model: nn.Module
    x: Tensor
    y: Tensor

    def loader(self, batch_size: int = 5) -> list[tuple[Tensor, Tensor]]:
        """Uneven batches (5, 5, 2)."""
        return [
            (self.x[i : i + batch_size], self.y[i : i + batch_size])
            for i in range(0, len(self.x), batch_size)
        ]


OUTPUTS = {"classification": 3, "regression": 2, "binary": 2}


def make_problem(likelihood: str, seed: int = 0) -> Problem:
    """A tanh MLP ``3 -> 4 -> C`` with random data for a likelihood."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    out = OUTPUTS[likelihood]
    model = nn.Sequential(
        nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, out)
    ).double()
    x = torch.randn(N, D_IN, generator=gen, dtype=torch.float64)
    if likelihood == "classification":
        y = torch.randint(0, out, (N,), generator=gen)
    elif likelihood == "binary":
        y = torch.randint(0, 2, (N, out), generator=gen).double()
    else:
        y = torch.randn(N, out, generator=gen, dtype=torch.float64)
    return Problem(likelihood, model.eval(), x, y)


SUBNET = torch.tensor([1, 4, 9, 16, 20, 25])


def fitted(
    likelihood: str, subset: str = "last_layer", structure: str = "kron", **kwargs
) -> tuple[BaseLaplace, Tensor]:
    """A Laplace posterior (prior precision 0.5) fitted on ``make_problem``'s data.

    Returns:
        The posterior and the problem's inputs ``[N, 3]``.
    """
    problem = make_problem(likelihood)
    if subset == "subnetwork":
        kwargs["subnetwork_indices"] = SUBNET
    la = Laplace(
        problem.model,
        likelihood,
        subset_of_weights=subset,
        hessian_structure=structure,
        prior_precision=0.5,
        **kwargs,
    )
    la.fit(problem.loader())
    return la, problem.x


@pytest.fixture(scope="session", params=list(OUTPUTS), ids=list(OUTPUTS))
def problem(request: pytest.FixtureRequest) -> Problem:
    """One problem per likelihood."""
    return make_problem(request.param)


def unit_loss(likelihood: str) -> tuple[nn.Module, float]:
    """The sum-reduced torch loss and the factor to the unit loss's GGN."""
    if likelihood == "classification":
        return nn.CrossEntropyLoss(reduction="sum"), 1.0
    if likelihood == "binary":
        return nn.BCEWithLogitsLoss(reduction="sum"), 1.0
    return nn.MSELoss(reduction="sum"), 0.5


positions = reference.positions


# the problem is kept with its GGN: a freed problem's id could be reused by another
_GGN_CACHE: dict[int, tuple[Problem, Tensor]] = {}


def dense_ggn(problem: Problem, index: Tensor | None = None) -> Tensor:
    """The unit loss's GGN over all trainable weights (or ``index``), float64.

    Cached per problem object (the models are never changed by a Laplace fit).
    """
    key = id(problem)
    if key not in _GGN_CACHE:
        loss, factor = unit_loss(problem.likelihood)
        _GGN_CACHE[key] = (
            problem,
            factor * reference.ggn(problem.model, loss, problem.x, problem.y),
        )
    ggn = _GGN_CACHE[key][1]
    if index is None:
        return ggn
    return ggn[index][:, index]


def dense_evidence(
    problem: Problem,
    precision: Tensor,
    mean: Tensor,
    prior: Tensor,
    sigma: float = 1.0,
) -> Tensor:
    """The Laplace evidence from a dense precision and per-parameter prior ``[P]``."""
    with torch.no_grad():
        output = problem.model(problem.x)
    if problem.likelihood == "regression":
        sse = (output - problem.y).square().sum()
        log_lik = -sse / (2 * sigma**2) - output.numel() * math.log(
            sigma * math.sqrt(2 * math.pi)
        )
    else:
        loss, _ = unit_loss(problem.likelihood)
        log_lik = -loss(output, problem.y)
    log_det_ratio = torch.logdet(precision) - prior.log().sum()
    return log_lik - 0.5 * (log_det_ratio + (prior * mean.square()).sum())


def layer_inputs(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """Inputs of every Linear layer, by module name (forward hooks)."""
    seen: dict[str, Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, a[0]))
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def fit_laplace(problem: Problem, subset: str, structure: str = "full", **kwargs):
    """A Laplace approximation of ``problem`` fitted over its uneven batches.

    Args:
        problem: The problem (model at some weights, data).
        subset: ``subset_of_weights``.
        structure: ``hessian_structure``.
        **kwargs: Further options of ``Laplace`` (priors, noise, indices, ...).
    """
    la = Laplace(
        problem.model,
        problem.likelihood,
        subset_of_weights=subset,
        hessian_structure=structure,
        **kwargs,
    )
    la.fit(problem.loader())
    return la
