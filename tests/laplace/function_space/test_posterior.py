"""FunctionalLaplace / FunctionalLLLaplace: laplace-torch's surface, tuning, saving."""

from __future__ import annotations

import io
import math

import gpytorch
import pytest
import torch

from bayescurv import (
    FullLaplace,
    FunctionalLaplace,
    FunctionalLLLaplace,
    Laplace,
    LLLaplace,
    ParametricLaplace,
    marglik_training,
)
from bayescurv.engine import reference
from bayescurv.laplace import AllWeightsLaplace
from bayescurv.laplace.function_space import PriorChangeError, encode_rows
from tests.laplace.function_space.conftest import (
    dense_reference,
    make_problem,
    train_to_map,
)


@pytest.fixture(scope="module")
def classification():
    return make_problem("classification", hidden=16)


def fitted(problem, subset="all", **kwargs):
    la = Laplace(problem.model, problem.likelihood, subset, "gp", **kwargs)
    la.fit(problem.loader())
    return la


def test_factory_and_class_names(classification):
    model = classification.model
    la = Laplace(model, "classification", "all", "gp", n_subset=5)
    assert type(la) is FunctionalLaplace
    last = Laplace(model, "classification", "last_layer", "gp")
    assert type(last) is FunctionalLLLaplace
    assert isinstance(last, FunctionalLaplace)  # as in laplace-torch
    assert not isinstance(la, ParametricLaplace)
    assert not isinstance(la, FullLaplace)
    assert not isinstance(last, LLLaplace)
    # laplace-torch's positional arguments: (model, likelihood, n_subset, ...)
    positional = FunctionalLaplace(model, "classification", 5, 1.0, 2.0)
    assert positional.n_subset == 5
    assert positional.prior_precision.shape == (1,)
    assert FunctionalLaplace(
        model, "classification", diagonal_kernel=True
    ).independent_outputs


def test_laplace_torch_pred_type_gp(classification):
    la = fitted(classification)
    x = classification.x_test
    torch.testing.assert_close(la(x, pred_type="gp"), la(x, pred_type="glm"))
    samples = la.predictive_samples(x, "gp", n_samples=3)
    assert samples.shape == (3, 5, 3)
    assert torch.allclose(samples.sum(-1), torch.ones(3, 5, dtype=torch.float64))


def test_marglik_finds_the_weight_space_optimum(classification):
    la = fitted(classification)
    full = Laplace(classification.model, "classification", "all", "full")
    full.fit(classification.loader())
    history = la.optimize_prior_precision(n_steps=200, lr=0.1)
    full.optimize_prior_precision(n_steps=200, lr=0.1)
    assert history[-1] < history[0]
    torch.testing.assert_close(
        la.prior_precision, full.prior_precision, rtol=1e-8, atol=0
    )


def test_noise_tuning_matches_the_dense_optimum():
    problem = make_problem("regression", hidden=16)
    la = fitted(problem)
    la.optimize_prior_precision(n_steps=300, lr=0.05, tune_sigma_noise=True)
    best = la.log_marginal_likelihood().item()
    for prior in (0.9, 1.1):
        for sigma in (0.9, 1.1):
            ref = dense_reference(
                problem,
                "all",
                la.prior_precision.item() * prior,
                la.sigma_noise.item() * sigma,
            )
            assert ref.evidence.item() < best


def test_gridsearch_picks_the_weight_space_choice(classification):
    val = [(classification.x_test, torch.tensor([0, 1, 2, 0, 1]))]
    la = fitted(classification)
    full = Laplace(classification.model, "classification", "all", "full")
    full.fit(classification.loader())
    for posterior in (la, full):
        posterior.optimize_prior_precision(
            method="gridsearch", val_loader=val, grid_size=9
        )
    torch.testing.assert_close(la.prior_precision, full.prior_precision)


def test_prior_changes_only_by_a_common_factor():
    problem = make_problem("classification")
    la = fitted(problem, prior_precision=torch.tensor([1.0, 2.0, 1.0, 2.0]))
    la.prior_precision = torch.tensor([3.0, 6.0, 3.0, 6.0])
    la(problem.x_test)
    la.prior_precision = torch.tensor([1.0, 1.0, 1.0, 1.0])
    with pytest.raises(PriorChangeError, match="common factor"):
        la(problem.x_test)
    with pytest.raises(ValueError, match="prior_structure='scalar'"):
        la.optimize_prior_precision(prior_structure="layerwise")


def test_state_dict_round_trip(classification):
    la = fitted(classification, functional_approximation="nystrom", n_subset=6)
    la.prior_precision = 0.3
    buffer = io.BytesIO()
    torch.save(la.state_dict(), buffer)
    buffer.seek(0)
    other = Laplace(
        classification.model,
        "classification",
        "all",
        "gp",
        functional_approximation="nystrom",
    )
    other.load_state_dict(torch.load(buffer, weights_only=True))
    x = classification.x_test
    torch.testing.assert_close(other(x), la(x))
    torch.testing.assert_close(
        other.log_marginal_likelihood(), la.log_marginal_likelihood()
    )
    wrong = Laplace(classification.model, "classification", "all", "gp")
    with pytest.raises(ValueError, match="functional_approximation"):
        wrong.load_state_dict(la.state_dict())


def test_last_layer_state_dict_round_trip(classification):
    la = fitted(classification, "last_layer")
    saved = la.state_dict()
    assert not any(isinstance(v, dict) for v in saved.values())  # flat, as laplace's
    other = FunctionalLLLaplace(classification.model, "classification")
    other.load_state_dict(saved)
    torch.testing.assert_close(other(classification.x_test), la(classification.x_test))
    assert other.last_layer is classification.model[2]


def test_exact_gpytorch_gp_at_the_map():
    """Gpytorch's exact MLL and predictive of the linearized network equal ours."""
    problem = make_problem("regression", hidden=16)
    train_to_map(problem, prior=0.7, sigma=0.8)
    la = fitted(problem, prior_precision=0.7, sigma_noise=0.8)
    model, likelihood = la.gpytorch_model()
    rows = model.train_inputs[0]
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    evidence = mll(model(rows), model.train_targets) * len(rows)
    torch.testing.assert_close(
        evidence, la.log_marginal_likelihood(), rtol=1e-8, atol=1e-8
    )
    model.eval()
    test_rows = encode_rows(problem.x_test, 2)
    posterior = model(test_rows)
    f_mu, f_var = la(problem.x_test)
    torch.testing.assert_close(posterior.mean.reshape(5, 2), f_mu, rtol=1e-6, atol=1e-7)
    blocks = posterior.covariance_matrix.reshape(5, 2, 5, 2)
    blocks = torch.stack([blocks[n, :, n] for n in range(5)])
    torch.testing.assert_close(blocks, f_var, rtol=1e-8, atol=1e-10)


def test_inputs_gradient_matches_weight_space():
    problem = make_problem("regression")
    kwargs = {"enable_backprop": True, "prior_precision": 0.7}
    la = fitted(problem, **kwargs)
    full = Laplace(problem.model, "regression", "all", "full", **kwargs)
    full.fit(problem.loader())
    grads = []
    for posterior in (la, full):
        x = problem.x_test.clone().requires_grad_(True)
        posterior(x)[1].sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-8)


def test_functional_samples_have_the_predictive_covariance(classification):
    la = fitted(classification)
    gen = torch.Generator().manual_seed(0)
    x = classification.x_test[:2]
    samples = la.functional_samples(x, n_samples=4000, generator=gen)
    f_mu, f_var = la.glm_moments(x)
    centered = samples - f_mu
    empirical = torch.einsum("snc,snd->ncd", centered, centered) / len(samples)
    assert (empirical - f_var).abs().max().item() < 0.1 * f_var.abs().max().item()
    joint = la.functional_samples(x, n_samples=2, generator=gen, joint=True)
    assert joint.shape == (2, 2, 3)


def test_nn_samples_are_the_gp_samples_with_a_warning(classification):
    la = fitted(classification)
    x = classification.x_test[:2]
    glm = la.functional_samples(
        x, n_samples=3, generator=torch.Generator().manual_seed(1)
    )
    with pytest.warns(UserWarning, match="pred_type='nn' has no weight samples"):
        nn = la.functional_samples(
            x, "nn", n_samples=3, generator=torch.Generator().manual_seed(1)
        )
    torch.testing.assert_close(nn, glm)


def test_functional_variance_of_given_jacobians(classification):
    la = fitted(classification)
    jac = reference.jacobian(classification.model, classification.x_test)
    torch.testing.assert_close(
        la.functional_variance(jac), la.glm_moments(classification.x_test)[1]
    )
    cov = la.functional_covariance(jac)
    assert cov.shape == (15, 15)


def test_log_det_posterior_precision(classification):
    la = fitted(classification, prior_precision=0.7)
    ref = dense_reference(classification, "all", 0.7)
    log_lik = la.log_likelihood
    expected = -2 * (ref.evidence - log_lik) - la.scatter + la.log_det_prior_precision
    torch.testing.assert_close(la.log_det_posterior_precision, expected)
    assert math.isfinite(la.log_det_ratio.item())


ERRORS = [
    ({"pred_type": "nn", "link_approx": "mc"}, ValueError, "pred_type='nn'"),
    ({"link_approx": "nope"}, ValueError, "unknown link_approx"),
    ({"joint": True}, ValueError, "joint=True"),
]


@pytest.mark.parametrize(("options", "error", "match"), ERRORS)
def test_prediction_errors(classification, options, error, match):
    la = fitted(classification)
    with pytest.raises(error, match=match):
        la(classification.x_test, **options)


def test_construction_and_fit_errors(classification):
    model = classification.model
    with pytest.raises(ValueError, match="subnetwork"):
        Laplace(
            model,
            "classification",
            "subnetwork",
            "gp",
            subnetwork_indices=torch.tensor([0]),
        )
    with pytest.raises(ValueError, match="exact GGN"):
        FunctionalLaplace(model, "classification", curvature="ef")
    with pytest.raises(ValueError, match="n_subset"):
        FunctionalLaplace(model, "classification", n_subset=0)
    with pytest.raises(ValueError, match="reward_modeling"):
        FunctionalLaplace(model, "reward_modeling")
    with pytest.raises(ValueError, match="one per parameter"):
        FunctionalLaplace(model, "classification", prior_precision=torch.ones(115))
    with pytest.raises(ValueError, match="is the function-space posterior"):
        AllWeightsLaplace(model, "classification", hessian_structure="gp")
    la = FunctionalLaplace(model, "classification", n_subset=50)
    with pytest.raises(ValueError, match="exceeds the 12 training points"):
        la.fit(classification.loader())
    with pytest.raises(ValueError, match="override=False"):
        la.fit(classification.loader(), override=False)
    variational = FunctionalLaplace(
        model,
        "classification",
        independent_outputs=True,
        functional_approximation="variational",
    )
    with pytest.raises(ValueError, match="independent_outputs"):
        variational.fit(classification.loader())
    once = FunctionalLaplace(
        model, "classification", functional_approximation="nystrom"
    )
    with pytest.raises(ValueError, match="re-iterable"):
        once.fit(iter(classification.loader()))


@pytest.mark.parametrize(
    "member", ["posterior_covariance", "posterior_precision", "precision", "H"]
)
def test_weight_space_members_raise(classification, member):
    la = fitted(classification)
    with pytest.raises(AttributeError, match="not of its weights"):
        getattr(la, member)
    with pytest.raises(AttributeError, match="not of its weights"):
        la.sample(3)


@pytest.mark.slow  # torch.optim imports torch._dynamo: ~15 s in a fresh process
def test_marglik_training_with_a_scalar_prior():
    """The GP posterior's evidence drives marglik training (one common factor)."""
    problem = make_problem("regression", hidden=16)
    la, _, margliks, _ = marglik_training(
        problem.model,
        problem.loader(),
        "regression",
        hessian_structure="gp",
        n_epochs=2,
        n_hypersteps=5,
        prior_structure="scalar",
    )
    assert type(la) is FunctionalLaplace
    assert margliks[-1] < margliks[0]
