"""With all data the GP posterior is the weight-space GGN Laplace (Woodbury, Sylvester).

Every approximation with all training points as anchors (the exact GP, Nyström
with every point a landmark, the variational GP with every point inducing) must
give the dense weight-space predictive and evidence in float64, for every
likelihood (the softmax's singular output Hessian included), both subsets, both
regimes (fewer and more weights than training outputs), scalar and per-tensor
priors, noise and temperature.
"""

from __future__ import annotations

import pytest
import torch

from bayescurv import Laplace
from tests.laplace.function_space.conftest import OUTPUTS, dense_reference, make_problem

APPROXIMATIONS = ["sod", "nystrom", "variational"]
SUBSETS = ["all", "last_layer"]
# The variational fit goes through gpytorch's ELBO and Cholesky factors: round-off
# of the natural parameters, far below any statistical meaning.
TOLERANCE = {"sod": 1e-9, "nystrom": 1e-8, "variational": 1e-7}


def gp(problem, subset="all", approximation="sod", **kwargs):
    la = Laplace(
        problem.model,
        problem.likelihood,
        subset,
        "gp",
        functional_approximation=approximation,
        **kwargs,
    )
    la.fit(problem.loader())
    return la


def check(la, problem, ref, tol, joint=True):
    f_mu, f_var = la.glm_moments(problem.x_test)
    torch.testing.assert_close(f_mu, ref.f_mu, rtol=tol, atol=tol)
    torch.testing.assert_close(f_var, ref.f_var, rtol=tol, atol=tol)
    torch.testing.assert_close(
        la.log_marginal_likelihood(), ref.evidence, rtol=tol, atol=tol
    )
    if joint:
        _, cov = la.glm_moments(problem.x_test, joint=True)
        torch.testing.assert_close(cov, ref.joint, rtol=tol, atol=tol)


@pytest.mark.parametrize("approximation", APPROXIMATIONS)
@pytest.mark.parametrize("subset", SUBSETS)
@pytest.mark.parametrize("likelihood", list(OUTPUTS))
def test_all_data_is_the_weight_space_laplace(likelihood, subset, approximation):
    problem = make_problem(likelihood, hidden=4)  # P < N C
    la = gp(problem, subset, approximation, prior_precision=0.7)
    check(la, problem, dense_reference(problem, subset, 0.7), TOLERANCE[approximation])


@pytest.mark.parametrize("likelihood", list(OUTPUTS))
def test_more_weights_than_outputs(likelihood):
    problem = make_problem(likelihood, hidden=16)  # P > N C: K_XX has full rank
    la = gp(problem, prior_precision=0.7)
    check(la, problem, dense_reference(problem, "all", 0.7), 1e-9)


@pytest.mark.parametrize("likelihood", list(OUTPUTS))
def test_the_weight_space_full_laplace_agrees(likelihood):
    problem = make_problem(likelihood)
    la = gp(problem, prior_precision=0.7)
    full = Laplace(problem.model, likelihood, "all", "full", prior_precision=0.7)
    full.fit(problem.loader())
    tol = 1e-9
    pairs = [
        *zip(
            la.glm_moments(problem.x_test),
            full.glm_moments(problem.x_test),
            strict=True,
        ),
        (la.log_marginal_likelihood(), full.log_marginal_likelihood()),
    ]
    if likelihood != "regression":
        for link in ("probit", "bridge"):
            if likelihood == "classification" or link == "probit":
                pairs.append(
                    (
                        la(problem.x_test, link_approx=link),
                        full(problem.x_test, link_approx=link),
                    )
                )
    for ours, theirs in pairs:
        torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)


@pytest.mark.parametrize("approximation", ["sod", "nystrom"])
@pytest.mark.parametrize("likelihood", list(OUTPUTS))
def test_independent_outputs_are_one_posterior_per_output(likelihood, approximation):
    problem = make_problem(likelihood, hidden=16)
    la = gp(
        problem,
        approximation=approximation,
        prior_precision=0.7,
        independent_outputs=True,
    )
    ref = dense_reference(problem, "all", 0.7, independent=True)
    check(la, problem, ref, 1e-8, joint=False)


@pytest.mark.parametrize("subset", SUBSETS)
def test_per_tensor_prior(subset):
    problem = make_problem("classification")
    blocks = 4 if subset == "all" else 2
    prior = torch.linspace(0.5, 2.0, blocks, dtype=torch.float64)
    la = gp(problem, subset, prior_precision=prior)
    check(la, problem, dense_reference(problem, subset, prior), 1e-9)
    la.prior_precision = 3 * prior  # a common factor: no refit
    check(la, problem, dense_reference(problem, subset, 3 * prior), 1e-9)


def test_noise_and_temperature():
    problem = make_problem("regression")
    la = gp(problem, sigma_noise=0.6, temperature=0.5, prior_precision=0.7)
    check(
        la,
        problem,
        dense_reference(problem, "all", 0.7, sigma=0.6, temperature=0.5),
        1e-9,
    )
    la.sigma_noise, la.prior_precision = 1.3, 0.2  # after fit: closed forms
    check(
        la,
        problem,
        dense_reference(problem, "all", 0.2, sigma=1.3, temperature=0.5),
        1e-9,
    )


def test_nystrom_with_all_landmarks_has_no_trace_gap():
    problem = make_problem("classification", hidden=16)
    la = gp(problem, approximation="nystrom")
    assert la.state.posterior.trace_gap.abs().item() < 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("approximation", APPROXIMATIONS)
def test_cnn_with_explicit_rows_is_the_weight_space_laplace(approximation):
    """Convolutions get explicit Jacobian rows; linear layers factored ones."""
    problem = make_problem("classification", n=24)
    torch.manual_seed(1)
    problem.model = torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 3)),
        torch.nn.Conv1d(1, 4, 2),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 3),
    ).double()
    la = gp(
        problem, approximation=approximation, prior_precision=0.7, memory_budget=4096
    )
    check(la, problem, dense_reference(problem, "all", 0.7), TOLERANCE[approximation])


@pytest.mark.slow
@pytest.mark.parametrize("likelihood", list(OUTPUTS))
def test_wider_networks_and_more_data(likelihood):
    problem = make_problem(likelihood, hidden=32, n=60)
    for approximation in APPROXIMATIONS:
        la = gp(problem, approximation=approximation, prior_precision=0.3)
        ref = dense_reference(problem, "all", 0.3)
        check(la, problem, ref, 10 * TOLERANCE[approximation])
