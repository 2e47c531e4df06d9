"""Laplace posteriors in Pyro: the model's conventions, the guide, Predictive, evidence.

* The Pyro model is the one the Laplace fit approximates: where the network is
  linear in the Bayesian weights (last layer), the Hessian of its negative log joint
  *is* the Laplace precision (prior, likelihood, ``sigma_noise``, temperature).
* The guide reproduces ``la(x, pred_type="nn", link_approx="mc")`` in expectation,
  and its draws are the networks at the drawn weights, for every subset.
* On a linear-Gaussian model the Laplace posterior is exact: importance sampling
  with the guide and the ELBO of the warm-started guide return the Laplace evidence
  with zero variance.
"""

from __future__ import annotations

import copy
import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Importance, Predictive, Trace_ELBO
from torch import Tensor, nn
from torch.nn.utils import vector_to_parameters

from bayescurv import Laplace
from bayescurv.laplace import NotFittedError
from bayescurv.laplace.pyro import (
    BayesianNetwork,
    bayesian_network,
    posterior_distribution,
    to_pyro,
    warm_start_guide,
)
from tests.conftest import assert_close
from tests.laplace.conftest import fit_laplace, make_problem, positions

SUBNET = torch.tensor([0, 3, 5, 7, 9, 13, 17, 22])
SAMPLES = 4_000
Z_MAX = 5.0


@pytest.fixture(autouse=True)
def fresh_pyro() -> None:
    """Autoguides keep their parameters in Pyro's global store: start empty."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fitted(problem, subset: str, structure: str = "full", **kwargs):
    if subset == "subnetwork":
        kwargs["subnetwork_indices"] = SUBNET
    return fit_laplace(problem, subset, structure, **kwargs)


def log_joint(model: BayesianNetwork, weights: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """The model's (tempered) log joint at ``weights``, from a Pyro trace."""
    conditioned = poutine.condition(model, data={"weights": weights})
    return poutine.trace(conditioned).get_trace(x, y).log_prob_sum()


HYPER = {  # per likelihood: a noise, a temperature, a layerwise prior and a mean
    "classification": {"temperature": 2.0},
    "regression": {"temperature": 0.5, "sigma_noise": 0.7},
    "binary": {"temperature": 1.5},
}


@pytest.mark.parametrize("likelihood", list(HYPER))
def test_log_joint_hessian_is_the_laplace_precision(likelihood: str) -> None:
    """The last layer enters linearly: the exact Hessian equals the GGN precision."""
    problem = make_problem(likelihood)
    prior = torch.tensor([0.5, 2.0], dtype=torch.float64)
    la = fitted(
        problem,
        "last_layer",
        prior_precision=prior,
        prior_mean=0.3,
        **HYPER[likelihood],
    )
    model = bayesian_network(la)
    hessian = torch.autograd.functional.hessian(
        lambda w: -log_joint(model, w, problem.x, problem.y), la.mean
    )
    assert_close(hessian, la.precision.dense(), "Hessian = precision")


@pytest.mark.parametrize("likelihood", list(HYPER))
def test_log_joint_value(likelihood: str) -> None:
    """Prior and tempered likelihood at random weights, from their formulas."""
    problem = make_problem(likelihood)
    la = fitted(problem, "all", "diag", prior_precision=1.5, **HYPER[likelihood])
    model = bayesian_network(la)
    weights = la.mean + 0.1 * torch.randn(
        la.mean.shape, generator=_gen(1), dtype=torch.float64
    )
    network = copy.deepcopy(problem.model)
    vector_to_parameters(weights, network.parameters())
    f = network(problem.x).detach()
    if likelihood == "classification":
        log_lik = -nn.functional.cross_entropy(f, problem.y, reduction="sum")
    elif likelihood == "binary":
        log_lik = -nn.functional.binary_cross_entropy_with_logits(
            f, problem.y, reduction="sum"
        )
    else:
        sigma = HYPER[likelihood]["sigma_noise"]
        log_lik = -(f - problem.y).square().sum() / (
            2 * sigma**2
        ) - f.numel() * math.log(sigma * math.sqrt(2 * math.pi))
    log_prior = -0.5 * 1.5 * weights.square().sum() + 0.5 * len(weights) * math.log(
        1.5 / (2 * math.pi)
    )
    expected = log_prior + log_lik / HYPER[likelihood]["temperature"]
    assert_close(log_joint(model, weights, problem.x, problem.y), expected, "joint")
    assert_close(model.log_joint(weights, problem.x, problem.y), expected, "direct")
    batched = torch.stack([weights, la.mean])
    assert_close(model.log_joint(batched, problem.x, problem.y)[0], expected, "batched")


class PerPosition(nn.Module):
    """Logits ``[N, C, T]`` of ``T = 2`` positions (as a segmentation model's)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 6).double()

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x).reshape(len(x), 3, 2)


@pytest.mark.parametrize(
    ("likelihood", "net", "targets"),
    [
        ("classification", PerPosition(), torch.tensor([[0, 2], [1, 1], [2, 0]])),
        ("reward_modeling", nn.Linear(3, 2).double(), torch.tensor([0, 1, 1])),
    ],
    ids=["per_position", "reward_modeling"],
)
def test_categorical_likelihoods(likelihood: str, net: nn.Module, targets) -> None:
    """Per-position logits [N, C, *T] and reward modeling's pairs: cross-entropy."""
    model = BayesianNetwork(net, likelihood, prior_precision=2.0)
    x = torch.randn(3, 3, generator=_gen(2), dtype=torch.float64)
    weights = model.map_weights()
    log_prior = model.prior().log_prob(weights)
    expected = log_prior - nn.functional.cross_entropy(net(x), targets, reduction="sum")
    assert_close(model.log_joint(weights, x, targets), expected, "direct")
    assert_close(log_joint(model, weights, x, targets), expected, "trace")


@pytest.mark.parametrize("subset", ["all", "last_layer", "subnetwork"])
def test_guide_draws_are_networks_at_drawn_weights(subset: str) -> None:
    problem = make_problem("classification")
    la = fitted(problem, subset, "diag" if subset == "all" else "full")
    model, guide = to_pyro(la)
    draws = Predictive(model, guide=guide, num_samples=3, parallel=True)(problem.x)
    weights = draws["weights"]
    assert weights.shape == (3, 1, la.state.num_params)  # Pyro pads a plate dim
    assert draws["f"].shape == (3, len(problem.x), 3)
    index = {
        "all": None,
        "last_layer": positions(problem.model, ["2.weight", "2.bias"]),
        "subnetwork": SUBNET,
    }[subset]
    flat = torch.cat([p.detach().flatten() for p in problem.model.parameters()])
    for draw, f in zip(weights[:, 0], draws["f"], strict=True):
        vector = draw if index is None else flat.index_put((index,), draw)
        network = copy.deepcopy(problem.model)
        vector_to_parameters(vector, network.parameters())
        assert_close(f, network(problem.x).detach(), f"{subset} draw")
    sequential = Predictive(model, guide=guide, num_samples=2)(problem.x)
    assert sequential["f"].shape == (2, len(problem.x), 3)
    # the distribution is over the subset's own entries (a subnetwork's only)
    own = la.mean_subnet if subset == "subnetwork" else la.mean
    assert_close(posterior_distribution(la).mean, own, f"{subset} mean")


@pytest.mark.parametrize("structure", ["full", "kron", "diag", "lowrank"])
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_predictive_reproduces_nn_predictive_classification(
    subset: str, structure: str
) -> None:
    problem = make_problem("classification")
    la = fitted(problem, subset, structure, rank=3)
    model, guide = to_pyro(la)
    f = Predictive(model, guide=guide, num_samples=SAMPLES, parallel=True)(problem.x)
    probs = f["f"].softmax(-1)
    expected = la(
        problem.x, "nn", link_approx="mc", n_samples=SAMPLES, generator=_gen(3)
    )
    standard = (2 * probs.var(0) / SAMPLES).sqrt()
    assert ((probs.mean(0) - expected).abs() / standard).max() < Z_MAX


@pytest.mark.montecarlo
def test_predictive_reproduces_nn_predictive_tight() -> None:
    """50x the draws: a 7x smaller standard error catches smaller biases."""
    problem = make_problem("classification")
    la = fitted(problem, "all", "kron")
    model, guide = to_pyro(la)
    draws = 50 * SAMPLES
    f = Predictive(model, guide=guide, num_samples=draws, parallel=True)(problem.x)
    probs = f["f"].softmax(-1)
    expected = la(problem.x, "nn", link_approx="mc", n_samples=draws, generator=_gen(3))
    standard = (2 * probs.var(0) / draws).sqrt()
    assert ((probs.mean(0) - expected).abs() / standard).max() < Z_MAX


def test_predictive_reproduces_nn_predictive_regression() -> None:
    problem = make_problem("regression")
    la = fitted(problem, "all", "kron", sigma_noise=0.5)
    model, guide = to_pyro(la)
    draws = Predictive(model, guide=guide, num_samples=SAMPLES, parallel=True)(
        problem.x
    )
    mean, var = la(
        problem.x, "nn", link_approx="mc", n_samples=SAMPLES, generator=_gen(3)
    )
    f = draws["f"]
    assert ((f.mean(0) - mean).abs() / (2 * var / SAMPLES).sqrt()).max() < Z_MAX
    assert ((f.var(0) / var - 1).abs()).max() < Z_MAX * math.sqrt(4 / SAMPLES)
    # the sampled targets add the noise variance sigma^2
    noise = draws["obs"] - f
    assert abs(noise.var().item() / 0.25 - 1) < Z_MAX * math.sqrt(2 / noise.numel())


def ridge_problem(temperature: float = 1.0, subset: str = "all"):
    """A linear model at its exact MAP under a Gaussian prior and noise."""
    sigma, prior, mean = 0.5, 2.0, 0.3
    gen = _gen(7)
    x = torch.randn(15, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(15, 2, generator=gen, dtype=torch.float64)
    model = nn.Linear(3, 2).double()
    features = torch.cat([x, torch.ones(15, 1, dtype=torch.float64)], 1)
    scale = 1 / (temperature * sigma**2)
    lhs = scale * features.mT @ features + prior * torch.eye(4, dtype=torch.float64)
    solution = torch.linalg.solve(lhs, scale * features.mT @ y + prior * mean)
    with torch.no_grad():
        model.weight.copy_(solution[:3].mT)
        model.bias.copy_(solution[3])
    la = Laplace(
        model,
        "regression",
        subset_of_weights=subset,
        hessian_structure="full",
        sigma_noise=sigma,
        prior_precision=prior,
        prior_mean=mean,
        temperature=temperature,
    )
    la.fit([(x, y)])
    return la, x, y


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_importance_sampling_with_the_guide_gives_the_evidence(subset: str) -> None:
    la, x, y = ridge_problem(subset=subset)
    model, guide = to_pyro(la)
    importance = Importance(model, guide=guide, num_samples=20).run(x, y)
    log_weights = torch.stack(importance.log_weights)
    assert log_weights.std() < 1e-8  # the Laplace posterior is exact here
    assert_close(
        importance.get_log_normalizer(), la.log_marginal_likelihood(), "evidence"
    )


def test_tempered_posterior_is_the_models() -> None:
    """With T != 1 the guide is still the model's exact posterior."""
    la, x, y = ridge_problem(temperature=2.0)
    model, guide = to_pyro(la)
    importance = Importance(model, guide=guide, num_samples=20).run(x, y)
    assert torch.stack(importance.log_weights).std() < 1e-8


def test_warm_start_multivariate_elbo_is_the_evidence() -> None:
    la, x, y = ridge_problem()
    model = bayesian_network(la)
    guide = warm_start_guide(la, model, x, y, family="multivariate")
    posterior = guide.get_posterior()
    assert_close(posterior.mean, la.mean, "mean")
    assert_close(posterior.covariance_matrix, la.posterior_covariance, "covariance")
    loss = Trace_ELBO(num_particles=5).loss(model, guide, x, y)
    assert math.isclose(-loss, la.log_marginal_likelihood().item(), rel_tol=1e-9)


def test_warm_start_normal_is_trainable() -> None:
    la, x, y = ridge_problem()
    model = bayesian_network(la)
    guide = warm_start_guide(la, model, x, y)
    assert_close(guide.locs.weights.detach(), la.mean, "loc")
    assert_close(guide.scales.weights.detach(), la.posterior_variance.sqrt(), "scale")
    elbo = Trace_ELBO(num_particles=200)
    # a factorized guide of a correlated posterior: strictly below the evidence
    assert -elbo.loss(model, guide, x, y) < la.log_marginal_likelihood().item()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    before = guide.locs.weights.detach().clone()
    assert math.isfinite(svi.step(x, y))
    assert not torch.equal(guide.locs.weights.detach(), before)


def test_every_structure_gives_its_posterior() -> None:
    problem = make_problem("regression")
    for structure in ("full", "kron", "diag", "lowrank"):
        la = fitted(problem, "all", structure, rank=3)
        d = posterior_distribution(la)
        assert d.precision is la.precision
        assert_close(d.variance, la.posterior_variance, structure)


def test_float32_network_with_float64_curvature() -> None:
    """Draws of the float64 posterior run the float32 network in its own dtype."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(10, 2), torch.randint(0, 3, (10,))
    la = Laplace(net, "classification", subset_of_weights="all")
    la.fit([(x, y)])
    model, guide = to_pyro(la)
    draws = Predictive(model, guide=guide, num_samples=5, parallel=True)(x)
    assert draws["f"].dtype == torch.float32
    assert torch.equal(model.outputs(la.mean.double(), x), net(x))


def test_errors_name_the_problem() -> None:
    problem = make_problem("classification")
    la = fitted(problem, "last_layer")
    with pytest.raises(ValueError, match="family must be one of"):
        warm_start_guide(la, bayesian_network(la), problem.x, family="flow")
    net = problem.model
    with pytest.raises(ValueError, match="needs sigma_noise=1"):
        BayesianNetwork(net, "classification", sigma_noise=0.5)
    with pytest.raises(ValueError, match="distinct names of net's parameters"):
        BayesianNetwork(net, "classification", parameters=["nope"])
    with pytest.raises(ValueError, match=r"lie in \[0, 12\)"):
        BayesianNetwork(
            net, "classification", parameters=["2.weight"], indices=torch.tensor([12])
        )
    with pytest.raises(ValueError, match="prior_precision must be positive"):
        BayesianNetwork(net, "classification", prior_precision=0.0)
    with pytest.raises(ValueError, match="temperature must be positive"):
        BayesianNetwork(net, "classification", temperature=0.0)
    model = BayesianNetwork(net, "classification")
    with pytest.raises(ValueError, match=r"weights of shape \[\.\.\., 31\]"):
        model.outputs(torch.zeros(30, dtype=torch.float64), problem.x)
    unfitted = Laplace(net, "classification", subset_of_weights="all")
    with pytest.raises(NotFittedError, match=r"call fit\(train_loader\) first"):
        to_pyro(unfitted)
    other = make_problem("classification")
    la_other = fitted(other, "last_layer")
    with torch.no_grad():
        other.model[2].bias.add_(1.0)
    with pytest.raises(ValueError, match="changed since fit"):
        bayesian_network(la_other)
