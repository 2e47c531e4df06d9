"""Closed forms: Bayesian linear regression and logistic regression (and Pyro)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian

from bayescurv import Laplace
from tests.conftest import assert_close

N, D, K = 15, 3, 2
PRIOR = 0.6
SIGMAS = torch.tensor([0.5, 1.5], dtype=torch.float64)


def design(x: Tensor) -> Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)


def gaussian_log_density(y: Tensor, cov: Tensor) -> Tensor:
    return torch.distributions.MultivariateNormal(torch.zeros_like(y), cov).log_prob(y)


@pytest.fixture(scope="module")
def linear_gaussian() -> tuple[nn.Linear, Tensor, Tensor]:
    """nn.Linear(3, 2) at the exact posterior mean of Bayesian linear regression."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    y = torch.randn(N, K, generator=gen, dtype=torch.float64)
    xt = design(x)
    model = nn.Linear(D, K).double()
    with torch.no_grad():
        for k in range(K):
            precision = xt.T @ xt / SIGMAS[k] ** 2 + PRIOR * torch.eye(D + 1).double()
            theta = torch.linalg.solve(precision, xt.T @ y[:, k] / SIGMAS[k] ** 2)
            model.weight[k], model.bias[k] = theta[:D], theta[D]
    return model, x, y


def exact_precision(x: Tensor) -> Tensor:
    """Posterior precision over (row-major weight [K, D], bias [K])."""
    xt = design(x)
    size = K * (D + 1)
    blocks = torch.block_diag(*[xt.T @ xt / SIGMAS[k] ** 2 for k in range(K)])
    # block_diag is in (k, [w_k, b_k]) order; move to (weights, biases) order
    aug = [k * (D + 1) + i for k in range(K) for i in range(D)] + [
        k * (D + 1) + D for k in range(K)
    ]
    return blocks[aug][:, aug] + PRIOR * torch.eye(size, dtype=torch.float64)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_linear_gaussian_evidence_and_covariance_are_exact(linear_gaussian, subset):
    model, x, y = linear_gaussian
    la = Laplace(
        model,
        "regression",
        subset_of_weights=subset,
        hessian_structure="full",
        sigma_noise=SIGMAS,
        prior_precision=PRIOR,
    )
    la.fit([(x[:6], y[:6]), (x[6:], y[6:])])
    xt = design(x)
    evidence = sum(
        gaussian_log_density(
            y[:, k], SIGMAS[k] ** 2 * torch.eye(N).double() + xt @ xt.T / PRIOR
        )
        for k in range(K)
    )
    assert_close(la.log_marginal_likelihood(), evidence, "evidence")
    covariance = torch.linalg.inv(exact_precision(x))
    assert_close(la.posterior_covariance, covariance, "posterior covariance")


def test_evidence_gradients_match_the_dense_formula(linear_gaussian):
    """Evidence gradients in (prior, sigma) against the dense formula's autograd.

    A scalar noise on the linear-Gaussian model.
    """
    model, x, y = linear_gaussian
    xt = design(x)
    la = Laplace(model, "regression", subset_of_weights="all", hessian_structure="full")
    la.fit([(x, y)])
    theta = la.mean
    resid_sq = (model(x) - y).detach().square().sum()
    blocks = torch.kron(torch.eye(K).double(), xt.T @ xt)
    aug = [k * (D + 1) + i for k in range(K) for i in range(D)] + [
        k * (D + 1) + D for k in range(K)
    ]
    ggn = blocks[aug][:, aug]

    def dense(prior: Tensor, sigma: Tensor) -> Tensor:
        precision = ggn / sigma**2 + prior * torch.eye(len(theta)).double()
        log_lik = -resid_sq / (2 * sigma**2) - N * K * torch.log(
            sigma * math.sqrt(2 * math.pi)
        )
        log_det_ratio = torch.logdet(precision) - len(theta) * prior.log()
        return log_lik - 0.5 * (log_det_ratio + prior * theta.square().sum())

    def grads(function) -> tuple[Tensor, Tensor, Tensor]:
        prior = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
        sigma = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
        value = function(prior, sigma)
        return (value, *torch.autograd.grad(value, [prior, sigma]))

    for actual, expected, what in zip(
        grads(la.log_marginal_likelihood),
        grads(dense),
        ["value", "d/dprior", "d/dsigma"],
        strict=True,
    ):
        assert_close(actual, expected, what)
    assert la.sigma_noise.item() == pytest.approx(1.3)  # stored, as in laplace-torch


def logistic_problem(likelihood: str) -> tuple[nn.Linear, Tensor, Tensor, nn.Module]:
    """A (binary or multiclass) logistic regression at its regularized MAP."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    out = 1 if likelihood == "binary" else 3
    model = nn.Linear(D, out).double()
    if likelihood == "binary":
        y = torch.randint(0, 2, (N, 1), generator=gen).double()
        loss = nn.BCEWithLogitsLoss(reduction="sum")
    else:
        y = torch.randint(0, out, (N,), generator=gen)
        loss = nn.CrossEntropyLoss(reduction="sum")
    optimizer = torch.optim.LBFGS(
        model.parameters(),
        max_iter=500,
        tolerance_grad=1e-14,
        tolerance_change=0,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        penalty = sum(p.square().sum() for p in model.parameters())
        value = loss(model(x), y) + 0.5 * PRIOR * penalty
        value.backward()
        return value

    optimizer.step(closure)
    return model, x, y, loss


def regularized_hessian(model: nn.Module, x: Tensor, y: Tensor, loss) -> Tensor:
    params = {n: p.detach() for n, p in model.named_parameters()}
    shapes = {n: p.shape for n, p in params.items()}
    sizes = [p.numel() for p in params.values()]

    def objective(flat: Tensor) -> Tensor:
        theta = {
            n: c.reshape(shapes[n])
            for n, c in zip(params, flat.split(sizes), strict=True)
        }
        output = functional_call(model, theta, (x,))
        return loss(output, y) + 0.5 * PRIOR * flat.square().sum()

    flat = torch.cat([p.flatten() for p in params.values()])
    return hessian(objective)(flat)


@pytest.mark.parametrize("likelihood", ["binary", "classification"])
def test_logistic_precision_is_the_regularized_hessian(likelihood):
    model, x, y, loss = logistic_problem(likelihood)
    la = Laplace(
        model,
        likelihood,
        subset_of_weights="all",
        hessian_structure="full",
        prior_precision=PRIOR,
    )
    la.fit([(x, y)])
    expected = regularized_hessian(model, x, y, loss)
    assert_close(la.precision.dense(), expected, "precision vs Hessian")


def test_logistic_covariance_matches_pyro_laplace():
    pyro = pytest.importorskip("pyro")
    from pyro import distributions as dist  # noqa: PLC0415
    from pyro.infer.autoguide import AutoLaplaceApproximation  # noqa: PLC0415

    model, x, y, _ = logistic_problem("binary")
    scale = torch.tensor(PRIOR**-0.5, dtype=torch.float64)
    zero = torch.tensor(0.0, dtype=torch.float64)

    def pyro_model(x: Tensor, y: Tensor) -> None:
        w = pyro.sample("w", dist.Normal(zero, scale).expand([D]).to_event(1))
        b = pyro.sample("b", dist.Normal(zero, scale))
        logits = x @ w + b
        pyro.sample("y", dist.Bernoulli(logits=logits).to_event(1), obs=y[:, 0])

    pyro.clear_param_store()
    guide = AutoLaplaceApproximation(pyro_model)
    guide(x, y)  # sets up the latent layout (w, then b)
    theta = torch.cat([model.weight.detach().flatten(), model.bias.detach()])
    with torch.no_grad():
        guide.loc.copy_(theta)
    gaussian = guide.laplace_approximation(x, y)
    root = gaussian.scale[:, None] * gaussian.scale_tril
    pyro_cov = root @ root.T

    la = Laplace(
        model,
        "binary",
        subset_of_weights="all",
        hessian_structure="full",
        prior_precision=PRIOR,
    )
    la.fit([(x, y)])
    assert_close(la.mean, theta, "mean")
    assert_close(la.posterior_covariance, pyro_cov, "covariance vs Pyro")
