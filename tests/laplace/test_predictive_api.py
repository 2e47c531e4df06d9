"""``la(x, ...)``: options, output shapes, noise, gradients, randomness, errors."""

from __future__ import annotations

import math

import pytest
import torch

from bayescurv import Laplace
from bayescurv.laplace import NotFittedError
from tests.conftest import assert_close
from tests.laplace.conftest import fitted, make_problem

FD_STEP = 1e-6
FD_TOL = 1e-6  # central differences in float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("sigma", [0.5, (0.5, 2.0)], ids=["scalar", "per_output"])
def test_regression_noise(sigma):
    sigma = torch.tensor(sigma, dtype=torch.float64)
    la, x = fitted("regression", "all", "diag", sigma_noise=sigma)
    noise = sigma.square().expand(2)
    f_mu, f_var = la(x)
    assert f_mu.shape == (12, 2)
    assert f_var.shape == (12, 2, 2)
    assert_close(la(x, noise=True)[1], f_var + torch.diag(noise), "[N, K, K]")
    _, variances = la(x, diagonal_output=True, noise=True)
    assert_close(variances, f_var.diagonal(dim1=1, dim2=2) + noise, "[N, K]")
    joint_mu, joint = la(x, joint=True)
    assert joint_mu.shape == (24,)
    assert_close(
        la(x, joint=True, noise=True)[1], joint + torch.diag(noise.repeat(12)), "joint"
    )


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_joint_blocks_are_the_per_sample_covariances(subset):
    la, x = fitted("regression", subset, "full")
    f_mu, f_var = la(x)
    joint_mu, joint = la(x, joint=True)
    assert_close(joint_mu, f_mu.flatten(), "mean")
    blocks = joint.reshape(12, 2, 12, 2).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    assert_close(blocks, f_var, "blocks")


@pytest.mark.parametrize("link", ["probit", "bridge", "bridge_norm", "mc"])
def test_classification_links_give_distributions(link):
    la, x = fitted("classification", "all", "kron")
    probs = la(x, link_approx=link, generator=_gen())
    assert probs.shape == (12, 3)
    assert_close(probs.sum(-1), torch.ones(12, dtype=torch.float64), link)
    assert (probs > 0).all()


def test_diagonal_output_drops_the_covariances():
    la, x = fitted("classification", "all", "full")
    f_mu, f_var = la.glm_moments(x)
    variances = f_var.diagonal(dim1=1, dim2=2)
    mc = la(x, link_approx="mc", diagonal_output=True, n_samples=9, generator=_gen(3))
    expected = torch.softmax(
        f_mu
        + variances.sqrt()
        * torch.randn(9, 12, 3, generator=_gen(3), dtype=torch.float64),
        -1,
    )
    assert_close(mc, expected.mean(0), "independent draws")
    bridge = la(x, link_approx="bridge", diagonal_output=True)
    full = la(x, link_approx="bridge")
    assert not torch.allclose(bridge, full)


def test_binary_probit_and_mc():
    la, x = fitted("binary", "all", "diag")
    f_mu, f_var = la.glm_moments(x)
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * f_var.diagonal(dim1=1, dim2=2))
    assert_close(la(x), torch.sigmoid(kappa * f_mu), "probit")
    samples = la.predictive_samples(x, n_samples=6, generator=_gen(1))
    assert_close(
        la(x, link_approx="mc", n_samples=6, generator=_gen(1)), samples.mean(0), "mc"
    )
    assert ((samples > 0) & (samples < 1)).all()


@pytest.mark.parametrize("pred_type", ["glm", "nn"])
def test_generator_reproducibility(pred_type):
    la, x = fitted("classification", "all", "kron")
    link = "mc"
    first = la(x, pred_type, link_approx=link, n_samples=5, generator=_gen(9))
    again = la(x, pred_type, link_approx=link, n_samples=5, generator=_gen(9))
    other = la(x, pred_type, link_approx=link, n_samples=5, generator=_gen(10))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    samples = la.predictive_samples(x, pred_type, 5, generator=_gen(9))
    assert samples.shape == (5, 12, 3)
    assert_close(first, samples.mean(0), "samples")


def _finite_difference(fn, x):
    grad = torch.zeros_like(x)
    for index in range(x.numel()):
        step = torch.zeros_like(x).flatten()
        step[index] = FD_STEP
        step = step.reshape(x.shape)
        grad.view(-1)[index] = (fn(x + step) - fn(x - step)) / (2 * FD_STEP)
    return grad


@pytest.mark.parametrize("subset", ["all", "last_layer", "subnetwork"])
@pytest.mark.parametrize("structure", ["kron", "full"])
def test_enable_backprop_gradients(subset, structure):
    if subset == "subnetwork" and structure == "kron":
        structure = "diag"  # kron needs whole tensors
    la, x = fitted("classification", subset, structure, enable_backprop=True)
    x = x[:3].clone()

    def objective(inputs):
        return la(inputs, link_approx="probit")[:, 0].log().sum()

    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(leaf), leaf)
    with torch.no_grad():
        expected = _finite_difference(objective, x)
    torch.testing.assert_close(grad, expected, rtol=FD_TOL, atol=FD_TOL)
    plain, _ = fitted("classification", subset, structure)
    assert_close(la(x).detach(), plain(x), "same values")
    assert not plain(leaf).requires_grad


def test_enable_backprop_nn_and_regression():
    la, x = fitted("regression", "all", "diag", enable_backprop=True)
    leaf = x[:3].clone().requires_grad_(True)
    f_mu, f_var = la(leaf)
    (grad,) = torch.autograd.grad(f_var.sum() + f_mu.sum(), leaf)
    assert grad.abs().sum() > 0
    samples = la.functional_samples(leaf, "nn", 2, generator=_gen())
    (grad,) = torch.autograd.grad(samples.sum(), leaf)
    assert grad.abs().sum() > 0


CALL_ERRORS = [
    ({"pred_type": "gp"}, r"unknown pred_type='gp'; valid values: 'glm', 'nn'"),
    (
        {"link_approx": "logit"},
        r"unknown link_approx='logit'; valid values: 'probit', 'mc', "
        r"'bridge', 'bridge_norm'",
    ),
    ({"pred_type": "nn"}, r"pred_type='nn' averages .* pass link_approx='mc'"),
    (
        {"joint": True},
        r"joint=True gives the joint .* likelihood='classification'",
    ),
    ({"noise": True}, r"noise=True adds the regression noise"),
    ({"n_samples": 0}, r"n_samples must be a positive int, got 0"),
    ({"n_samples": 2.5}, r"n_samples must be a positive int, got 2.5"),
    ({"n_samples": True}, r"n_samples must be a positive int, got True"),
    ({"generator": "0"}, r"generator must be a torch.Generator, an int seed or None"),
]
"""``la(x, **kwargs)`` on a fitted classification posterior, and the message."""


@pytest.fixture(scope="module")
def classifier():
    problem = make_problem("classification")
    la = Laplace(problem.model, "classification", hessian_structure="diag")
    la.fit(problem.loader())
    return la, problem.x


@pytest.mark.parametrize(
    ("kwargs", "message"), CALL_ERRORS, ids=[str(k) for k, _ in CALL_ERRORS]
)
def test_call_errors(classifier, kwargs, message):
    la, x = classifier
    with pytest.raises(ValueError, match=message):
        la(x, **kwargs)


def test_predictive_errors(classifier):
    problem = make_problem("classification")
    unfitted = Laplace(problem.model, "classification", hessian_structure="diag")
    with pytest.raises(NotFittedError, match=r"call fit\(train_loader\) first"):
        unfitted(problem.x)
    with pytest.raises(
        NotFittedError, match=r"(functional|predictive)_samples needs a fitted"
    ):
        unfitted.predictive_samples(problem.x)
    la, x = classifier
    with pytest.raises(TypeError, match=r"\['scale'\]: keyword arguments of the model"):
        la(x, scale=2.0)
    with pytest.raises(ValueError, match=r"unknown pred_type='gp'"):
        la.functional_samples(x, "gp")
    assert la(x, fitting=True).shape == (12, 3)  # reward modeling only


def test_regression_and_binary_errors():
    la, x = fitted("regression", "all", "diag")
    joint = la(x, joint=True)[1]  # as laplace-torch: joint ignores diagonal_output
    assert torch.equal(la(x, joint=True, diagonal_output=True)[1], joint)
    with pytest.raises(
        ValueError, match=r"pred_type='nn' with likelihood='regression'"
    ):
        la(x, "nn", link_approx="mc", joint=True)
    binary, x = fitted("binary", "all", "diag")
    with pytest.raises(ValueError, match=r"for 'binary' use one of 'probit', 'mc'"):
        binary(x, link_approx="bridge_norm")
