r"""Small float64 problems and dense weight-space references for the GP posterior.

The reference of every function-space quantity is the weight-space GGN Laplace
computed densely with ``torch.func`` Jacobians (:mod:`bayescurv.engine.reference`):
:math:`\Lambda = \operatorname{diag}(\pi) + s \sum_n J_n^\top W_n J_n`, the
predictive covariance :math:`J_* \Lambda^{-1} J_*^\top` and the Laplace evidence.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bayescurv.engine import reference
from bayescurv.laplace.enums import Likelihood
from bayescurv.laplace.likelihoods import LikelihoodModel
from experiments.function_space_laplace_torch import train_to_map as fit_map
from tests.laplace import conftest as laplace_conftest

N, D_IN = 12, 3
OUTPUTS = {"classification": 3, "regression": 2, "binary": 2}


@dataclass
class Problem(laplace_conftest.Problem):
    """A tanh MLP with data and test inputs (not at the MAP unless trained)."""

    x_test: Tensor


def make_problem(
    likelihood: str, hidden: int = 4, seed: int = 0, n: int = N
) -> Problem:
    """A ``3 -> hidden -> C`` tanh MLP with random data.

    ``hidden=4`` has fewer weights than training outputs (``P < N C``), ``hidden=16``
    more.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    out = OUTPUTS[likelihood]
    model = nn.Sequential(nn.Linear(D_IN, hidden), nn.Tanh(), nn.Linear(hidden, out))
    model = model.double().eval()
    x = torch.randn(n, D_IN, generator=gen, dtype=torch.float64)
    if likelihood == "classification":
        y = torch.randint(0, out, (n,), generator=gen)
    elif likelihood == "binary":
        y = torch.randint(0, 2, (n, out), generator=gen).double()
    else:
        y = torch.randn(n, out, generator=gen, dtype=torch.float64)
    x_test = 2 * torch.randn(5, D_IN, generator=gen, dtype=torch.float64)
    return Problem(likelihood, model, x, y, x_test)


def subset_model(model: nn.Module, subset: str) -> nn.Module:
    """A copy whose trainable parameters are the subset's (last layer: the last)."""
    if subset == "all":
        return model
    frozen = copy.deepcopy(model)
    for p in frozen[0].parameters():
        p.requires_grad_(False)
    return frozen


@dataclass
class Reference:
    """Dense weight-space results."""

    f_mu: Tensor  # [M, C]
    f_var: Tensor  # [M, C, C]
    joint: Tensor  # [M C, M C]
    evidence: Tensor  # 0-d


def dense_reference(
    problem: Problem,
    subset: str = "all",
    prior: float | Tensor = 1.0,
    sigma: float = 1.0,
    temperature: float = 1.0,
    independent: bool = False,
) -> Reference:
    """The weight-space Laplace of the problem, densely (module doc).

    Args:
        problem: The problem.
        subset: ``"all"`` or ``"last_layer"``.
        prior: Scalar, or per parameter tensor of the subset ``[B]``.
        sigma: Regression noise.
        temperature: :math:`T`.
        independent: A separate posterior per output (diagonal :math:`W_n`,
            no covariance between outputs), laplace-torch's independent outputs.
    """
    model = subset_model(problem.model, subset)
    params = [p for p in model.parameters() if p.requires_grad]
    prior = torch.as_tensor(prior, dtype=torch.float64)
    if prior.ndim == 1:
        prior = torch.repeat_interleave(
            prior, torch.tensor([p.numel() for p in params])
        )
    else:
        prior = prior.expand(sum(p.numel() for p in params))
    jac = reference.jacobian(model, problem.x)
    jac_test = reference.jacobian(model, problem.x_test)
    with torch.no_grad():
        output, f_mu = model(problem.x), model(problem.x_test)
    like = LikelihoodModel(Likelihood(problem.likelihood))
    hessians = like.output_hessian(output)
    scale = 1 / (temperature * (sigma**2 if problem.likelihood == "regression" else 1))
    theta = torch.cat([p.detach().flatten() for p in params])
    log_lik = like.log_likelihood(
        like.loss_terms(output, problem.y),
        len(problem.x),
        output.shape[1],
        torch.tensor(sigma, dtype=torch.float64),
        temperature,
    )
    if independent:
        return _independent(jac, jac_test, hessians, f_mu, prior, scale, log_lik, theta)
    precision = torch.diag(prior) + scale * torch.einsum(
        "nap,nab,nbq->pq", jac, hessians, jac
    )
    flat = jac_test.reshape(-1, jac_test.shape[-1])
    joint = flat @ torch.linalg.solve(precision, flat.T)
    f_var = torch.einsum(
        "ncp,pq,ndq->ncd", jac_test, torch.linalg.inv(precision), jac_test
    )
    ratio = torch.logdet(precision) - prior.log().sum()
    evidence = log_lik - 0.5 * (ratio + (prior * theta.square()).sum())
    return Reference(f_mu, f_var, joint, evidence)


def _independent(
    jac, jac_test, hessians, f_mu, prior, scale, log_lik, theta
) -> Reference:
    classes = jac.shape[1]
    variances, ratio = [], 0.0
    for c in range(classes):
        weights = scale * hessians[:, c, c]
        precision = torch.diag(prior) + (jac[:, c].T * weights) @ jac[:, c]
        cov = jac_test[:, c] @ torch.linalg.solve(precision, jac_test[:, c].T)
        variances.append(cov.diagonal())
        ratio = ratio + torch.logdet(precision) - prior.log().sum()
    f_var = torch.stack(variances, 1).diag_embed()
    evidence = log_lik - 0.5 * (ratio + (prior * theta.square()).sum())
    return Reference(f_mu, f_var, torch.empty(0), evidence)


def train_to_map(problem: Problem, prior: float, sigma: float = 1.0) -> None:
    """Train the problem's model to the MAP of its likelihood and the prior."""
    fit_map(problem.model, problem.x, problem.y, problem.likelihood, prior, sigma)
