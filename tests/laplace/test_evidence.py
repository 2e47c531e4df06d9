"""Evidence tuning: decreases the negative evidence, finds the dense optimum, O(P)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from scipy.optimize import minimize

from bayescurv.curvature import NotPositiveDefiniteError
from bayescurv.laplace.state import data_scale
from bayescurv.laplace.tune import evidence, prior, spectral
from bayescurv.laplace.tune.spectral import SpectralEvidence
from tests.laplace.conftest import (
    dense_evidence,
    dense_ggn,
    fit_laplace,
    make_problem,
)

LOG_TOL = 1e-3  # |log(tuned) - log(optimum)|
STRUCTURES = ["full", "diag", "kron", "lowrank"]


def fitted(problem, structure="full", subset="all", **kwargs):
    return fit_laplace(problem, subset, structure, **kwargs)


def test_marglik_finds_the_dense_optimum():
    problem = make_problem("classification")
    la = fitted(problem)
    ggn = dense_ggn(problem)
    size = ggn.shape[0]

    def negative(log_prior: float) -> float:
        prior = torch.full((size,), math.exp(log_prior), dtype=torch.float64)
        precision = ggn + torch.diag(prior)
        return -dense_evidence(problem, precision, la.mean, prior).item()

    optimum = minimize(lambda v: negative(v[0]), [0.0], tol=1e-12).x[0]
    history = la.optimize_prior_precision(method="marglik", n_steps=300, lr=0.1)
    assert history[-1] < history[0]
    assert abs(la.prior_precision.log().item() - optimum) < LOG_TOL
    assert la.prior_precision.shape == (1,)  # laplace-torch's scalar shape


def test_joint_noise_tuning_finds_the_dense_optimum():
    problem = make_problem("regression")
    la = fitted(problem, sigma_noise=1.0)
    ggn = dense_ggn(problem)
    size = ggn.shape[0]

    def negative(v) -> float:
        prior = torch.full((size,), math.exp(v[0]), dtype=torch.float64)
        sigma = math.exp(v[1])
        precision = ggn / sigma**2 + torch.diag(prior)
        return -dense_evidence(problem, precision, la.mean, prior, sigma).item()

    optimum = minimize(negative, [0.0, 0.0], tol=1e-12).x
    history = la.optimize_prior_precision(n_steps=400, lr=0.05, tune_sigma_noise=True)
    assert history[-1] < history[0]
    assert abs(la.prior_precision.log().item() - optimum[0]) < LOG_TOL
    assert abs(la.sigma_noise.log().item() - optimum[1]) < LOG_TOL


def test_per_output_noise_is_tuned_by_a_common_factor():
    problem = make_problem("regression")
    la = fitted(problem, "diag", sigma_noise=torch.tensor([0.5, 1.0]))
    la.optimize_prior_precision(n_steps=50, tune_sigma_noise=True)
    ratio = la.sigma_noise[1] / la.sigma_noise[0]
    assert ratio.item() == pytest.approx(2.0)
    assert la.sigma_noise[0].item() != pytest.approx(0.5)


# KronBlocks rejects per-parameter priors (tested in test_errors)
PRIOR_CASES = [
    (structure, prior)
    for structure in STRUCTURES
    for prior in ("scalar", "layerwise", "diag")
    if (structure, prior) != ("kron", "diag")
]


@pytest.mark.parametrize(("structure", "prior_structure"), PRIOR_CASES)
def test_every_prior_structure_decreases_the_negative_evidence(
    structure, prior_structure
):
    problem = make_problem("binary")
    la = fitted(problem, structure)
    history = la.optimize_prior_precision(
        n_steps=20, prior_structure=prior_structure, init_prior_prec=3.0
    )
    assert history[-1] < history[0]
    shapes = {"scalar": (1,), "layerwise": (4,), "diag": (la.num_params,)}
    assert la.prior_precision.shape == shapes[prior_structure]
    assert -la.log_marginal_likelihood().item() == pytest.approx(history[-1], rel=0.05)


@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
def test_each_evaluation_reuses_the_decomposition(structure, decomposition_sizes):
    """After the first evaluation, new priors/noises need no new decomposition."""
    problem = make_problem("regression")
    la = fitted(problem, structure)
    la.log_marginal_likelihood()
    decomposition_sizes.clear()
    la.optimize_prior_precision(n_steps=5, tune_sigma_noise=True)
    if structure != "full":
        la.optimize_prior_precision(n_steps=5, prior_structure="layerwise")
    assert decomposition_sizes == []


def test_gridsearch_picks_the_best_validation_loss():
    problem = make_problem("classification")
    la = fitted(problem, "diag")
    val = make_problem("classification", seed=1)
    grid_losses = []
    for value in torch.logspace(-2, 2, 5).tolist():
        la.prior_precision = value
        probs = la(val.x)
        nll = -probs.gather(1, val.y[:, None]).log().mean().item()
        grid_losses.append((nll, value))
    la.optimize_prior_precision(
        method="gridsearch",
        val_loader=val.loader(),
        log_prior_prec_min=-2,
        log_prior_prec_max=2,
        grid_size=5,
    )
    assert la.prior_precision.item() == pytest.approx(min(grid_losses)[1])


def test_gridsearch_regression_and_custom_loss():
    problem = make_problem("regression")
    la = fitted(problem, "kron", subset="last_layer")
    calls = []

    def loss(prediction, y):
        _, f_var = prediction
        calls.append(f_var.shape)
        return f_var.diagonal(dim1=1, dim2=2).sum()  # smallest variance: largest prior

    la.optimize_prior_precision(
        method="gridsearch", val_loader=problem.loader(), grid_size=3, loss=loss
    )
    assert la.prior_precision.item() == pytest.approx(1e4)
    assert len(calls) == 3 * len(problem.loader())
    val = make_problem("regression", seed=1)
    brute = []
    for value in (1e-4, 1.0, 1e4):
        la.prior_precision = value
        f_mu, f_var = la(val.x, diagonal_output=True)
        var = f_var + 1.0  # sigma_noise = 1
        nll = 0.5 * (var.log() + (val.y - f_mu).square() / var).sum(1).mean()
        brute.append((nll.item(), value))
    la.optimize_prior_precision(
        method="gridsearch", val_loader=val.loader(), grid_size=3
    )
    assert la.prior_precision.item() == pytest.approx(min(brute)[1])


def test_adam_matches_torch_optim():

    ours = torch.tensor([1.0, -2.0], dtype=torch.float64)
    theirs = ours.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([theirs], lr=0.1)
    mine = prior.Adam([ours], 0.1)
    for _ in range(20):
        optimizer.zero_grad()
        (theirs**4).sum().backward()
        optimizer.step()
        mine.step([4 * ours**3])
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-12, atol=1e-12)


SPECTRAL_CASES = [
    ("classification", "full", "all"),
    ("classification", "kron", "all"),
    ("classification", "diag", "last_layer"),
    ("regression", "full", "last_layer"),
    ("regression", "kron", "all"),
    ("regression", "diag", "all"),
    ("binary", "full", "all"),
]


PER_BLOCK_CASES = [
    ("classification", "kron", "all"),
    ("regression", "kron", "all"),
    ("regression", "diag", "all"),
    ("classification", "kron", "last_layer"),
    ("binary", "diag", "all"),
]
CASES = [(*case, False) for case in SPECTRAL_CASES]
CASES += [(*case, True) for case in PER_BLOCK_CASES]


@pytest.mark.parametrize(("likelihood", "structure", "subset", "per_block"), CASES)
def test_spectral_evidence_equals_the_structure_evidence(
    likelihood, structure, subset, per_block
):
    """The fast form (scalar or per-block prior) against the structure evidence.

    Value and gradients in the prior and sigma.
    """
    regression = likelihood == "regression"
    noise = {"sigma_noise": 0.7} if regression else {}
    la = fitted(make_problem(likelihood), structure, subset, **noise)
    fast = SpectralEvidence.of(la.state, la.prior_mean, la.temperature, per_block)
    assert fast is not None
    blocks = la.state.curvature.num_blocks
    assert blocks > 1 or subset == "last_layer"
    generator = torch.Generator().manual_seed(0)
    for value in (0.05, 1.0, 30.0):
        prior = torch.tensor(value, dtype=torch.float64)
        if per_block:
            prior = value * (0.2 + torch.rand(blocks, generator=generator)).double()
        _assert_equals_structure_evidence(la, fast, prior, regression)


def _assert_equals_structure_evidence(la, fast, prior, regression):
    """``fast(prior, sigma)``: the structure evidence's value and gradients."""
    prior.requires_grad_(True)
    sigma = torch.tensor(
        0.9 if regression else 1.0, dtype=torch.float64, requires_grad=True
    )
    values = la.hyperparameters.with_(prior_precision=prior, sigma_noise=sigma)
    got = fast(prior, sigma)
    expected = evidence.log_marginal_likelihood(la.state, values)
    assert math.isclose(got.item(), expected.item(), rel_tol=1e-10)
    grads = torch.autograd.grad(got, (prior, sigma), allow_unused=True)
    refs = torch.autograd.grad(expected, (prior, sigma), allow_unused=True)
    for grad, ref in zip(grads, refs, strict=True):
        if ref is None:  # sigma does not enter a classification evidence
            assert grad is None or grad.abs().max().item() == 0
            continue
        torch.testing.assert_close(grad, ref, rtol=1e-8, atol=1e-12)


def test_lowrank_with_remainder_has_no_spectral_form():
    la = fitted(make_problem("classification"), "lowrank")
    assert SpectralEvidence.of(la.state, la.prior_mean, la.temperature) is None


@pytest.mark.parametrize("tune_sigma", [False, True])
@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_tuning_with_and_without_the_spectral_form_agree(
    structure, tune_sigma, monkeypatch
):
    """Closed-form gradient (prior only) and autograd (with sigma) agree."""
    problem = make_problem("regression")
    fast = fitted(problem, structure, sigma_noise=0.8)
    fast_history = fast.optimize_prior_precision(
        n_steps=50, tune_sigma_noise=tune_sigma
    )
    slow = fitted(problem, structure, sigma_noise=0.8)
    monkeypatch.setattr(SpectralEvidence, "of", lambda *args: None)
    slow_history = slow.optimize_prior_precision(
        n_steps=50, tune_sigma_noise=tune_sigma
    )
    assert torch.allclose(torch.tensor(fast_history), torch.tensor(slow_history))
    assert torch.allclose(fast.prior_precision, slow.prior_precision)
    assert torch.allclose(fast.sigma_noise, slow.sigma_noise)


def test_spectral_evidence_raises_where_the_structure_would():
    """A negative eigenvalue not lifted by the prior: NotPositiveDefiniteError."""
    la = fitted(make_problem("classification"), "diag")
    values = torch.tensor([-0.5, 1.0], dtype=torch.float64)
    fast = SpectralEvidence(la.state, la.prior_mean, la.temperature, values)
    prior = torch.tensor(0.4, dtype=torch.float64)
    with pytest.raises(NotPositiveDefiniteError, match="not positive definite"):
        fast(prior, torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(NotPositiveDefiniteError, match=r"smallest eigenvalue -0\.1"):
        fast.prior_objective(torch.tensor(1.0, dtype=torch.float64))(prior.log())
    assert torch.isfinite(fast(prior + 0.2, torch.tensor(1.0, dtype=torch.float64)))


def test_zero_eigenvalues_are_counted_not_summed():
    """Exact zeros enter as a count (NOTE [Evidence from the spectrum]).

    Value and closed-form gradient against the sum over every eigenvalue.
    """
    la = fitted(make_problem("classification"), "diag")
    values = torch.tensor([0.0, 2.0, 0.0, -0.0, 0.5, 0.0], dtype=torch.float64)
    fast = SpectralEvidence(la.state, la.prior_mean, la.temperature, values)
    assert fast.zeros == 4
    assert fast.eigenvalues.tolist() == [2.0, 0.5]
    sigma = torch.tensor(1.0, dtype=torch.float64)
    scale = data_scale(la.state, sigma, la.temperature)
    fit = evidence.log_likelihood(la.state, sigma, la.temperature)
    objective = fast.prior_objective(sigma)
    for value in (0.05, 1.0, 30.0):
        log_prior = torch.tensor(math.log(value), dtype=torch.float64)
        log_prior.requires_grad_(True)
        prior = log_prior.exp()
        every = (scale * values + prior).log().sum() - len(values) * log_prior
        expected = fit - 0.5 * (every + prior * fast.squared_distance)
        got = fast(prior, sigma)
        assert math.isclose(got.item(), expected.item(), rel_tol=1e-12)
        (slope,) = torch.autograd.grad(-expected, log_prior)
        neg, grad = objective(log_prior.detach())
        assert math.isclose(neg.item(), -expected.item(), rel_tol=1e-12)
        assert math.isclose(grad.item(), slope.item(), rel_tol=1e-12)


def test_per_block_needs_a_blockwise_spectrum():
    """``full`` decomposes all blocks together: no per-block fast form."""
    la = fitted(make_problem("classification"), "full")
    assert la.state.curvature.num_blocks > 1
    assert SpectralEvidence.of(la.state, la.prior_mean, la.temperature) is not None
    assert SpectralEvidence.of(la.state, la.prior_mean, la.temperature, True) is None


def test_per_block_zeros_are_counted_per_block():
    """Zeros and the positivity check per block, against the sum over every value."""
    la = fitted(make_problem("classification"), "diag")
    values = torch.tensor([0.0, 2.0, -0.0, 0.5, 0.0, 0.0, 3.0], dtype=torch.float64)
    sizes = [3, 1, 3]
    mean = torch.arange(7, dtype=torch.float64) / 7
    state = dataclasses.replace(la.state, mean=mean)
    fast = SpectralEvidence(
        state, torch.zeros(7, dtype=torch.float64), la.temperature, values, sizes
    )
    sigma = torch.tensor(1.0, dtype=torch.float64)
    scale = data_scale(state, sigma, la.temperature)
    fit = evidence.log_likelihood(state, sigma, la.temperature)
    index = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    distances = torch.zeros(3, dtype=torch.float64).index_add_(0, index, mean.square())
    assert fast.blocks.kept.tolist() == [1, 1, 1]
    for spread in (0.05, 1.0, 30.0):
        log_prior = torch.tensor([0.1, -0.4, 0.7], dtype=torch.float64) + math.log(
            spread
        )
        log_prior.requires_grad_(True)
        prior = log_prior.exp()
        every = (scale * values + prior[index]).log().sum()
        every = every - (torch.tensor(sizes) * log_prior).sum()
        expected = fit - 0.5 * (every + (prior * distances).sum())
        got = fast(prior, sigma)
        assert math.isclose(got.item(), expected.item(), rel_tol=1e-12)
        (slope,) = torch.autograd.grad(expected, log_prior)
        (mine,) = torch.autograd.grad(fast(log_prior.exp(), sigma), log_prior)
        torch.testing.assert_close(mine, slope, rtol=1e-12, atol=1e-14)
    negative = values.clone()
    negative[3] = -0.5  # block 1: lifted by a prior above 0.5 only
    fast = SpectralEvidence(state, la.prior_mean, la.temperature, negative, sizes)
    lifted = torch.tensor([0.01, 0.6, 0.01], dtype=torch.float64)
    assert torch.isfinite(fast(lifted, sigma))
    with pytest.raises(NotPositiveDefiniteError, match=r"smallest eigenvalue -0\.1"):
        fast(torch.tensor([5.0, 0.4, 5.0], dtype=torch.float64), sigma)


@pytest.mark.parametrize("tune_sigma", [False, True])
@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_layerwise_tuning_with_and_without_the_spectral_form_agree(
    structure, tune_sigma, monkeypatch
):
    problem = make_problem("regression")
    fast = fitted(problem, structure, sigma_noise=0.8)
    kwargs = {"n_steps": 50, "tune_sigma_noise": tune_sigma}
    kwargs["prior_structure"] = "layerwise"
    calls = []
    original = SpectralEvidence.of.__func__

    def counted(cls, *args):
        found = original(cls, *args)
        calls.append(found is not None)
        return found

    monkeypatch.setattr(SpectralEvidence, "of", classmethod(counted))
    fast_history = fast.optimize_prior_precision(**kwargs)
    assert calls == [True]
    slow = fitted(problem, structure, sigma_noise=0.8)
    monkeypatch.setattr(SpectralEvidence, "of", lambda *args: None)
    slow_history = slow.optimize_prior_precision(**kwargs)
    assert fast.prior_precision.shape == (fast.state.curvature.num_blocks,)
    assert torch.allclose(torch.tensor(fast_history), torch.tensor(slow_history))
    assert torch.allclose(fast.prior_precision, slow.prior_precision)
    assert torch.allclose(fast.sigma_noise, slow.sigma_noise)


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_layerwise_spectral_tuning_of_a_float32_model(structure, monkeypatch):
    """float32 weights, float64 eigenvalues: the same steps as the structure path.

    ``full`` on the last layer takes the dominant-block form.
    """
    problem = make_problem("classification")
    problem = dataclasses.replace(
        problem, model=problem.model.float(), x=problem.x.float()
    )
    subset = "last_layer" if structure == "full" else "all"
    fast = fitted(problem, structure, subset)
    fast_history = fast.optimize_prior_precision(
        n_steps=30, prior_structure="layerwise"
    )
    slow = fitted(problem, structure, subset)
    monkeypatch.setattr(SpectralEvidence, "of", lambda *args: None)
    monkeypatch.setattr(spectral.DominantBlockEvidence, "of", lambda *args: None)
    slow_history = slow.optimize_prior_precision(
        n_steps=30, prior_structure="layerwise"
    )
    torch.testing.assert_close(
        torch.tensor(fast_history), torch.tensor(slow_history), rtol=1e-6, atol=0
    )
    torch.testing.assert_close(fast.prior_precision, slow.prior_precision)


def _dominant_problem():
    """A regression MLP 12-8-2 whose first weight (96 of 122) dominates."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Linear(12, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)
    ).double()
    x = torch.randn(15, 12, dtype=torch.float64)
    y = torch.randn(15, 2, dtype=torch.float64)
    return dataclasses.replace(make_problem("regression"), model=model.eval(), x=x, y=y)


DOMINANT_CASES = [
    (make_problem, "classification", "last_layer", {}),
    (make_problem, "regression", "last_layer", {"sigma_noise": 0.7}),
    (make_problem, "binary", "last_layer", {}),
    (None, "regression", "all", {"sigma_noise": 0.7}),
]


@pytest.mark.parametrize(("make", "likelihood", "subset", "kwargs"), DOMINANT_CASES)
def test_dominant_block_evidence_equals_the_structure_evidence(
    make, likelihood, subset, kwargs
):
    """``full`` under a per-block prior: value and gradients, priors on both sides."""
    problem = make(likelihood) if make else _dominant_problem()
    la = fitted(problem, "full", subset, **kwargs)
    fast = spectral.DominantBlockEvidence.of(la.state, la.prior_mean, la.temperature)
    assert fast is not None
    blocks = la.state.curvature.num_blocks
    generator = torch.Generator().manual_seed(1)
    regression = likelihood == "regression"
    for spread in (0.05, 1.0, 30.0):
        prior = spread * (0.05 + 3 * torch.rand(blocks, generator=generator))
        _assert_equals_structure_evidence(la, fast, prior.double(), regression)


def test_dominant_block_needs_a_dominant_block_and_memory(monkeypatch):
    la = fitted(make_problem("classification"), "full")  # blocks 12, 4, 12, 3
    assert spectral.DominantBlockEvidence.of(la.state, la.prior_mean, 1.0) is None
    kron = fitted(make_problem("classification"), "kron", "last_layer")
    assert spectral.DominantBlockEvidence.of(kron.state, kron.prior_mean, 1.0) is None
    last = fitted(make_problem("classification"), "full", "last_layer")
    assert spectral.DominantBlockEvidence.of(last.state, last.prior_mean, 1.0)
    monkeypatch.setattr(spectral, "resolve_budget", lambda *args: (100, "test"))
    assert spectral.DominantBlockEvidence.of(last.state, last.prior_mean, 1.0) is None


@pytest.mark.parametrize("tune_sigma", [False, True])
@pytest.mark.parametrize("n_steps", [2, 40])
def test_dominant_block_tuning_agrees_with_the_structure_path(
    n_steps, tune_sigma, monkeypatch
):
    """The same steps as the Cholesky path; the eigh only from EIGH_STEPS steps."""
    problem = _dominant_problem()
    kwargs = {"n_steps": n_steps, "tune_sigma_noise": tune_sigma}
    kwargs["prior_structure"] = "layerwise"
    calls = []
    original = spectral.DominantBlockEvidence.of.__func__

    def counted(cls, *args):
        found = original(cls, *args)
        calls.append(found is not None)
        return found

    monkeypatch.setattr(spectral.DominantBlockEvidence, "of", classmethod(counted))
    fast = fitted(problem, "full", sigma_noise=0.8)
    fast_history = fast.optimize_prior_precision(**kwargs)
    assert calls == ([True] if n_steps >= prior.EIGH_STEPS else [])
    monkeypatch.setattr(spectral.DominantBlockEvidence, "of", lambda *args: None)
    slow = fitted(problem, "full", sigma_noise=0.8)
    slow_history = slow.optimize_prior_precision(**kwargs)
    torch.testing.assert_close(
        torch.tensor(fast_history), torch.tensor(slow_history), rtol=1e-9, atol=0
    )
    torch.testing.assert_close(fast.prior_precision, slow.prior_precision)
    torch.testing.assert_close(fast.sigma_noise, slow.sigma_noise)
