"""The approximations beyond all data: convergence, bounds, optimality, memory."""

from __future__ import annotations

import pytest
import torch

from bayescurv import Laplace
from bayescurv.engine import reference
from tests.laplace.function_space.conftest import dense_reference, make_problem


def gp(problem, **kwargs):
    la = Laplace(problem.model, problem.likelihood, "all", "gp", **kwargs)
    la.fit(problem.loader())
    return la


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_subset_of_data_converges_to_all_data(likelihood):
    """Mean error over seeds falls as the subset grows, and vanishes with all data."""
    problem = make_problem(likelihood, hidden=16, n=40)
    ref = dense_reference(problem, "all", 0.5)
    means = []
    for size in (10, 20, 30, 40):
        errs = []
        for seed in range(6):
            la = gp(problem, n_subset=size, seed=seed, prior_precision=0.5)
            f_var = la.glm_moments(problem.x_test)[1]
            errs.append((f_var - ref.f_var).abs().max().item())
        means.append(sum(errs) / len(errs))
    assert means == sorted(means, reverse=True)
    assert means[-1] < 1e-9


def test_subset_evidence_estimates_all_data():
    """Each of M points stands for N / M: the evidence is within a few nats."""
    problem = make_problem("classification", hidden=16, n=40)
    ref = dense_reference(problem, "all", 0.5)
    la = gp(problem, n_subset=30, prior_precision=0.5)
    assert abs(la.log_marginal_likelihood().item() - ref.evidence.item()) < 5.0
    assert la.n_data == 40
    assert la.state.n_subset == 30


def test_nystrom_bound_rises_with_rank_to_the_exact_evidence():
    """Titsias' bound: below the exact evidence, monotone in nested feature spaces."""
    problem = make_problem("classification", hidden=16, n=20)
    exact = gp(problem, prior_precision=0.5).log_marginal_likelihood().item()
    bounds = []
    for rank in (5, 15, 30, None):
        la = gp(
            problem,
            functional_approximation="nystrom",
            n_subset=10,
            n_eigenvalues=rank,
            prior_precision=0.5,
        )
        bounds.append(la.log_marginal_likelihood().item())
    assert bounds == sorted(bounds)
    assert bounds[-1] <= exact + 1e-9


def test_nystrom_predictive_is_the_collapsed_variational_one():
    r"""Fewer landmarks: Titsias' optimal q(u) and its predictive, densely.

    .. math::
        S_u = K_{ZZ} (K_{ZZ} + K_{ZX} W K_{XZ})^{-1} K_{ZZ}, \\
        \operatorname{Cov} = K_{**} - K_{*Z} K_{ZZ}^{-1} K_{Z*}
        + K_{*Z} K_{ZZ}^{-1} S_u K_{ZZ}^{-1} K_{Z*}
    """
    problem = make_problem("regression", hidden=16, n=20)
    prior = 0.5
    la = gp(
        problem, functional_approximation="nystrom", n_subset=8, prior_precision=prior
    )
    params = la.num_params
    jac = reference.jacobian(problem.model, problem.x).reshape(-1, params)
    landmarks = reference.jacobian(problem.model, la.state.anchor_inputs)
    landmarks = landmarks.reshape(-1, params)
    k_zz, k_zx = landmarks @ landmarks.T / prior, landmarks @ jac.T / prior
    s_u = k_zz @ torch.linalg.solve(k_zz + k_zx @ k_zx.T, k_zz)  # W = I
    expected = []
    for rows in reference.jacobian(problem.model, problem.x_test):
        k_ss, k_sz = rows @ rows.T / prior, rows @ landmarks.T / prior
        a = torch.linalg.solve(k_zz, k_sz.T)
        expected.append(k_ss - k_sz @ a + a.T @ s_u @ a)
    f_var = la.glm_moments(problem.x_test)[1]
    torch.testing.assert_close(f_var, torch.stack(expected), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_variational_optimum_is_nystrom_with_the_same_points(likelihood):
    """Natural gradients over one epoch reach the collapsed optimum (conjugate)."""
    problem = make_problem(likelihood, hidden=16, n=20)
    kwargs = {"n_subset": 8, "seed": 3, "prior_precision": 0.5}
    nystrom = gp(problem, functional_approximation="nystrom", **kwargs)
    variational = gp(problem, functional_approximation="variational", **kwargs)
    for a, b in zip(
        nystrom.glm_moments(problem.x_test),
        variational.glm_moments(problem.x_test),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(
        nystrom.log_marginal_likelihood(),
        variational.log_marginal_likelihood(),
        rtol=1e-7,
        atol=1e-7,
    )


def test_variational_minibatches_average_to_the_full_batch_step():
    """Steps of size B_t / sum B_s over one epoch: the same optimum as one batch."""
    problem = make_problem("classification", hidden=16, n=20)
    kwargs = {"functional_approximation": "variational", "prior_precision": 0.5}
    one = gp(problem, batch_size=20, **kwargs)
    many = gp(problem, batch_size=3, **kwargs)
    for a, b in zip(
        one.glm_moments(problem.x_test), many.glm_moments(problem.x_test), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8)


def test_recomputed_anchors_give_the_same_posterior():
    """A memory budget below the anchors' rows recomputes them per use."""
    problem = make_problem("classification", hidden=16)
    kept = gp(problem, prior_precision=0.5)
    tight = gp(problem, prior_precision=0.5, memory_budget=2_000)
    assert kept.state.posterior.anchors.kept
    assert not tight.state.posterior.anchors.kept
    for a, b in zip(
        kept.glm_moments(problem.x_test), tight.glm_moments(problem.x_test), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_nystrom_features_from_directions_or_kernels_agree():
    """J(x) Σ0 J_Lᵀ T (few weights) and K(x, L) T (a tiny budget) are one feature."""
    problem = make_problem("classification", hidden=4, n=20)  # P = 31 < L C = 36
    kwargs = {"functional_approximation": "nystrom", "n_subset": 12}
    primal = gp(problem, **kwargs)
    dual = gp(problem, memory_budget=64, **kwargs)
    assert primal.state.posterior.components[0].directions is not None
    assert dual.state.posterior.components[0].directions is None
    for a, b in zip(
        primal.glm_moments(problem.x_test),
        dual.glm_moments(problem.x_test),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(
        primal.log_marginal_likelihood(), dual.log_marginal_likelihood()
    )
