"""The GLM predictive against dense Jacobians from torch.func."""

from __future__ import annotations

import math

import pytest
import torch

from bayescurv import Laplace
from bayescurv.engine import reference
from tests.conftest import assert_close
from tests.laplace.conftest import make_problem, positions

MC_SAMPLES = 20_000
Z_MAX = 5.5
SUBSETS = ["all", "last_layer", "subnetwork"]
SUBNET = torch.tensor([1, 4, 9, 16, 20, 25])


def fitted(problem, subset, structure="full", **kwargs):
    if subset == "subnetwork":
        kwargs["subnetwork_indices"] = SUBNET
    la = Laplace(
        problem.model,
        problem.likelihood,
        subset_of_weights=subset,
        hessian_structure=structure,
        prior_precision=0.5,
        **kwargs,
    )
    la.fit(problem.loader())
    return la


def index_of(problem, subset):
    if subset == "all":
        return None
    if subset == "last_layer":
        return positions(problem.model, ["2.weight", "2.bias"])
    return SUBNET


@pytest.mark.parametrize("subset", SUBSETS)
def test_functional_variance_is_j_sigma_jt(problem, subset):
    la = fitted(problem, subset, memory_budget=2_000)  # forces sample chunks
    x = problem.x[:7]
    jac = reference.jacobian(problem.model, x)
    index = index_of(problem, subset)
    if index is not None:
        jac = jac[..., index]
    expected = jac @ la.posterior_covariance @ jac.mT
    f_mu, f_var = la.glm_moments(x)
    assert_close(f_mu, problem.model(x).detach(), "f_mu")
    assert_close(f_var, expected, "f_var")
    joint = la.glm_moments(x, joint=True)[1]
    flat = jac.reshape(-1, jac.shape[-1])
    assert_close(joint, flat @ la.posterior_covariance @ flat.T, "joint")


@pytest.mark.parametrize(
    ("subset", "structure"),
    [("last_layer", "kron"), ("all", "kron"), ("all", "diag"), ("all", "lowrank")],
)
def test_probit_classification(subset, structure):
    """The probit link reads only the variances (formed without the covariances)."""
    problem = make_problem("classification")
    la = fitted(problem, subset, structure)
    f_mu, f_var = la.glm_moments(problem.x)
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * f_var.diagonal(dim1=1, dim2=2))
    assert_close(la(problem.x), torch.softmax(kappa * f_mu, -1), "probit")


def test_probit_binary():
    problem = make_problem("binary")
    la = fitted(problem, "all", "diag")
    f_mu, f_var = la.glm_moments(problem.x)
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * f_var.diagonal(dim1=1, dim2=2))
    assert_close(la(problem.x), torch.sigmoid(kappa * f_mu), "probit")


def test_mc_link_is_the_expected_softmax():
    problem = make_problem("classification")
    la = fitted(problem, "last_layer", "full")
    x = problem.x[:3]
    probs = la(
        x,
        link_approx="mc",
        n_samples=MC_SAMPLES,
        generator=torch.Generator().manual_seed(0),
    )
    f_mu, f_var = la.glm_moments(x)
    torch.manual_seed(1)
    draws = torch.distributions.MultivariateNormal(f_mu, f_var)
    samples = draws.sample((MC_SAMPLES,)).softmax(-1)
    error = (probs - samples.mean(0)).abs()
    standard = samples.std(0) * math.sqrt(2 / MC_SAMPLES)
    assert (error / standard).max() < Z_MAX


def test_regression_outputs():
    problem = make_problem("regression")
    la = fitted(problem, "all", "kron", sigma_noise=0.5)
    f_mu, f_var = la(problem.x)
    assert f_mu.shape == (12, 2)
    assert f_var.shape == (12, 2, 2)
    _, variances = la(problem.x, diagonal_output=True)
    assert_close(variances, f_var.diagonal(dim1=1, dim2=2), "diagonal output")
    _, joint = la(problem.x, joint=True)
    assert joint.shape == (24, 24)
    assert_close(
        joint.reshape(12, 2, 12, 2).diagonal(dim1=0, dim2=2).permute(2, 0, 1),
        f_var,
        "joint blocks",
    )


def test_last_layer_predictive_backpropagates():
    problem = make_problem("classification")
    la = fitted(problem, "last_layer", "kron", enable_backprop=True)
    x = problem.x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(la(x)[:, 0].sum(), x)
    assert grad.abs().sum() > 0
    assert not fitted(problem, "last_layer", "kron")(x).requires_grad


class _PositionsModel(torch.nn.Module):
    """A 3x3 conv on 2x2 maps (zero padding) and a linear layer on [N, T, in]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)
        self.seq = torch.nn.Linear(3, 2)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).flatten(2).transpose(1, 2)  # [N, T=4, 3]
        return self.head(torch.tanh(self.seq(h)).flatten(1))


@pytest.mark.parametrize("structure", ["kron", "diag"])
@pytest.mark.parametrize("budget", [2**28, 3_000])  # one chunk; sized from the first
def test_layers_at_several_positions_stay_factored(structure, budget):
    """Conv patches and sequence positions: f_var is J Σ Jᵀ, in chunks or not."""
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = _PositionsModel().double().eval()
    x = torch.randn(9, 2, 2, 2, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=gen)
    la = Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure=structure,
        prior_precision=0.5,
        memory_budget=budget,
    )
    la.fit([(x[:5], y[:5]), (x[5:], y[5:])])
    jac = reference.jacobian(model, x)
    f_mu, f_var = la.glm_moments(x)
    assert_close(f_mu, model(x).detach(), "f_mu")
    assert_close(f_var, jac @ la.posterior_covariance @ jac.mT, "f_var")
