"""Link approximations against their definitions and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from bayescurv.laplace.enums import Likelihood, LinkApprox
from bayescurv.laplace.predict.links import (
    add_observation_noise,
    covariance_root,
    glm_link,
    laplace_bridge,
    probit_scale,
    sample_outputs,
)
from tests.conftest import assert_close

Z_MAX = 5.0  # largest accepted Monte Carlo error in standard errors
PROBIT_LOGISTIC_ERROR = 0.02
"""Largest gap between E[sigmoid(f)] and its probit approximation (MacKay 1992)."""
LOOSE_SAMPLES, TIGHT_SAMPLES = 20_000, 400_000
COVARIANCE_TOL = 0.05  # relative, for 20,000 draws


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


F64 = {"dtype": torch.float64}


def _problem() -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[4, 3]`` and covariances ``[4, 3, 3]``."""
    mu = torch.randn(4, 3, generator=_gen(1), **F64)
    root = torch.randn(4, 3, 3, generator=_gen(2), **F64)
    return mu, root @ root.mT + 0.1 * torch.eye(3, **F64)


def _mc_error(draws: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """Error of a mean in standard errors of the draws ``[S, ...]``."""
    standard = draws.std(0) / math.sqrt(draws.shape[0])
    return (estimate - draws.mean(0)).abs() / standard


# ---------------------------------------------------------------------- probit
def _probit_identity(samples: int) -> None:
    r"""E[Φ(λ f)] = Φ(λ μ κ) exactly, κ the probit scale with λ² = π / 8."""
    mu = torch.tensor([[-2.0, 0.3, 1.5]], **F64)
    var = torch.tensor([[0.5, 2.0, 4.0]], **F64)
    lam, normal = math.sqrt(math.pi / 8), Normal(0.0, 1.0)
    draws = normal.cdf(lam * sample_outputs(mu, var, samples, _gen()))
    closed = normal.cdf(lam * probit_scale(var) * mu)
    assert _mc_error(draws, closed).max() < Z_MAX


def test_probit_scale_is_exact_for_the_gaussian_cdf():
    _probit_identity(LOOSE_SAMPLES)


@pytest.mark.montecarlo
def test_probit_scale_is_exact_for_the_gaussian_cdf_tight():
    _probit_identity(TIGHT_SAMPLES)


def test_probit_approximates_the_expected_sigmoid():
    mu = torch.tensor([[-2.0, 0.3, 1.5]], **F64)
    var = torch.tensor([[0.5, 2.0, 4.0]], **F64)
    probit = glm_link(Likelihood.BINARY, mu, var, LinkApprox.PROBIT)
    mc = glm_link(Likelihood.BINARY, mu, var, LinkApprox.MC, LOOSE_SAMPLES, _gen())
    assert (probit - mc).abs().max() < PROBIT_LOGISTIC_ERROR
    assert_close(probit, torch.sigmoid(mu / (1 + math.pi / 8 * var).sqrt()), "sigmoid")


def test_probit_softmax_by_hand():
    mu, cov = _problem()
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * cov.diagonal(dim1=1, dim2=2))
    expected = torch.softmax(kappa * mu, -1)
    assert_close(
        glm_link(Likelihood.CLASSIFICATION, mu, cov, LinkApprox.PROBIT),
        expected,
        "probit",
    )


# ---------------------------------------------------------------------- bridge
def test_bridge_two_classes_by_hand():
    mu = torch.tensor([[1.0, -0.5]], **F64)
    cov = torch.tensor([[[0.5, 0.1], [0.1, 0.3]]], **F64)
    # Sigma 1 = (0.6, 0.4), 1'Sigma 1 = 1, 1'mu = 0.5: mu' = (0.7, -0.7) and
    # Sigma'_kk = (0.5 - 0.36, 0.3 - 0.16) = (0.14, 0.14); with K = 2,
    # alpha_k = e^{mu'_k} (e^{-0.7} + e^{0.7}) / (4 * 0.14), so the mean is
    # softmax(mu') = (sigmoid(1.4), sigmoid(-1.4)).
    alpha = [math.exp(m) * (math.exp(-0.7) + math.exp(0.7)) / 0.56 for m in (0.7, -0.7)]
    expected = torch.tensor([[a / sum(alpha) for a in alpha]], **F64)
    assert_close(laplace_bridge(mu, cov), expected, "bridge K=2")
    assert math.isclose(expected[0, 0].item(), 1 / (1 + math.exp(-1.4)))


def _bridge_reference(mu, cov, normalized=False):
    """The published formulas, evaluated directly (no log space)."""
    classes = mu.shape[-1]
    row = cov.sum(-1)
    total = row.sum(-1, keepdim=True)
    mu = mu - row * mu.sum(-1, keepdim=True) / total
    var = cov.diagonal(dim1=1, dim2=2) - row.square() / total
    if normalized:
        scale = var.mean(-1, keepdim=True) / math.sqrt(classes / 2)
        mu, var = mu / scale.sqrt(), var / scale
    alpha = (
        1 - 2 / classes + mu.exp() / classes**2 * (-mu).exp().sum(-1, keepdim=True)
    ) / var
    return alpha / alpha.sum(-1, keepdim=True)


@pytest.mark.parametrize("normalized", [False, True], ids=["bridge", "bridge_norm"])
def test_bridge_matches_the_formula(normalized):
    mu, cov = _problem()
    link = LinkApprox.BRIDGE_NORM if normalized else LinkApprox.BRIDGE
    actual = glm_link(Likelihood.CLASSIFICATION, mu, cov, link)
    assert_close(actual, _bridge_reference(mu, cov, normalized), link.value)


def test_bridge_diagonal_input_is_a_diagonal_covariance():
    mu, cov = _problem()
    var = cov.diagonal(dim1=1, dim2=2)
    assert_close(
        laplace_bridge(mu, var), laplace_bridge(mu, torch.diag_embed(var)), "diag"
    )


def test_bridge_large_logits_and_degenerate_covariance():
    mu = torch.tensor([[300.0, 0.0, -300.0]], **F64)
    probs = laplace_bridge(mu, torch.eye(3, **F64)[None])
    assert torch.isfinite(probs).all()
    assert_close(probs.sum(-1), torch.ones(1, **F64), "normalized")
    # 1' Sigma 1 = 0: the Gaussian already lives on shifts of the sum-zero plane;
    # the logits are centered and the variances kept
    ones = torch.ones(3, **F64)
    centering = torch.eye(3, **F64) - torch.outer(ones, ones) / 3
    mu = torch.tensor([[1.0, 2.0, 4.0]], **F64)
    expected = _bridge_formula_centered(mu - mu.mean(), centering.diagonal())
    assert_close(laplace_bridge(mu, centering[None]), expected, "degenerate")


def _bridge_formula_centered(mu, var):
    alpha = (1 - 2 / 3 + mu.exp() / 9 * (-mu).exp().sum(-1, keepdim=True)) / var
    return alpha / alpha.sum(-1, keepdim=True)


def test_bridge_needs_two_classes():
    with pytest.raises(ValueError, match=r"at least 2 classes, got 1"):
        laplace_bridge(torch.zeros(2, 1), torch.ones(2, 1))
    with pytest.raises(ValueError, match=r"for 'binary' use one of 'probit', 'mc'"):
        glm_link(
            Likelihood.BINARY, torch.zeros(2, 2), torch.ones(2, 2), LinkApprox.BRIDGE
        )


# -------------------------------------------------------------------------- mc
def test_mc_link_is_the_mean_softmax_of_samples():
    mu, cov = _problem()
    probs = glm_link(Likelihood.CLASSIFICATION, mu, cov, LinkApprox.MC, 50, _gen(3))
    draws = sample_outputs(mu, cov, 50, _gen(3)).softmax(-1)
    assert_close(probs, draws.mean(0), "mc")


def test_samples_have_the_covariance():
    mu, cov = _problem()
    draws = sample_outputs(mu, cov, LOOSE_SAMPLES, _gen(4))
    assert _mc_error(draws, mu).max() < Z_MAX
    centered = draws - mu
    empirical = torch.einsum("snc,snd->ncd", centered, centered) / LOOSE_SAMPLES
    scale = cov.diagonal(dim1=1, dim2=2).sqrt()
    error = (empirical - cov) / (scale[:, :, None] * scale[:, None, :])
    assert error.abs().max() < COVARIANCE_TOL


def test_diagonal_samples_equal_samples_of_the_diagonal_covariance():
    mu, cov = _problem()
    var = cov.diagonal(dim1=1, dim2=2)
    assert_close(
        sample_outputs(mu, var, 7, _gen(5)),
        sample_outputs(mu, torch.diag_embed(var), 7, _gen(5)),
        "diagonal",
    )


def test_covariance_root_of_singular_matrices():
    _, cov = _problem()
    ones = torch.ones(3, **F64)
    singular = (
        cov
        - (cov @ ones)[:, :, None]
        * (cov @ ones)[:, None, :]
        / (ones @ cov @ ones)[:, None, None]
    )  # conditioned on the sum: rank 2
    stacked = torch.cat([cov, singular])
    root = covariance_root(stacked)
    assert_close(root @ root.mT, stacked, "R Rᵀ")


def test_observation_noise():
    sigma = torch.tensor([0.5, 2.0], **F64)
    cov = torch.eye(2, **F64).expand(3, 2, 2)
    noisy = add_observation_noise(cov, sigma, joint=False)
    assert_close(noisy, cov + torch.diag(sigma.square()), "[N, K, K]")
    variances = add_observation_noise(torch.ones(3, 2, **F64), sigma, joint=False)
    assert_close(variances, 1 + sigma.square().expand(3, 2), "[N, K]")
    joint = add_observation_noise(torch.zeros(6, 6, **F64), sigma, joint=True)
    assert_close(joint.diagonal(), sigma.square().repeat(3), "joint")
    scalar = add_observation_noise(torch.zeros(6, 6, **F64), torch.tensor(0.5), True)
    assert_close(scalar, 0.25 * torch.eye(6, **F64), "scalar sigma")
