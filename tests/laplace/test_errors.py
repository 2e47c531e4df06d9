"""Every error path raises a clear error naming the problem."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bayescurv import Laplace
from bayescurv.engine import MemoryBudgetError
from bayescurv.laplace import (
    AllWeightsLaplace,
    LastLayerLaplace,
    NonFiniteCurvatureError,
    NotFittedError,
)
from tests.laplace.conftest import make_problem


@pytest.fixture
def problem():
    return make_problem("classification")


@pytest.mark.parametrize(
    "access",
    [
        lambda la: la.posterior_precision,
        lambda la: la.posterior_covariance,
        lambda la: la.posterior_variance,
        lambda la: la.log_marginal_likelihood(),
        lambda la: la.log_det_ratio,
        lambda la: la.scatter,
        lambda la: la.log_likelihood,
        lambda la: la.sample(2),
        lambda la: la(torch.zeros(2, 3)),
        lambda la: la.optimize_prior_precision(),
        lambda la: la.state_dict(),
    ],
)
def test_unfitted_use_raises(problem, access):
    la = Laplace(problem.model, "classification")
    with pytest.raises(NotFittedError, match=r"call fit\(train_loader\) first"):
        access(la)


@pytest.mark.parametrize(
    ("option", "value", "match"),
    [
        (
            "likelihood",
            "poisson",
            r"unknown likelihood='poisson'; valid values: "
            r"'classification', 'regression', 'binary'",
        ),
        ("subset_of_weights", "first_layer", r"unknown subset_of_weights"),
        ("hessian_structure", "banded", r"unknown hessian_structure='banded'"),
    ],
)
def test_unknown_options_list_the_valid_ones(problem, option, value, match):
    kwargs = {"likelihood": "classification", option: value}
    with pytest.raises(ValueError, match=match):
        Laplace(problem.model, **kwargs)


def test_gp_and_unknown_kwargs(problem):
    with pytest.raises(ValueError, match=r"'gp' is the function-space"):
        AllWeightsLaplace(problem.model, "classification", hessian_structure="gp")
    with pytest.raises(TypeError, match=r"unknown options \['n_components'\]"):
        Laplace(problem.model, "classification", n_components=3)


@pytest.mark.parametrize(
    ("prior", "match"),
    [
        (
            torch.ones(3),
            r"prior_precision must be a scalar, \[1\], per parameter "
            r"tensor \[2\] or per parameter \[15\]; got shape \[3\]",
        ),
        (torch.ones(2, 2), r"prior_precision must be"),
        (-1.0, r"prior_precision must be finite and positive"),
        (float("nan"), r"prior_precision must be finite and positive"),
        ("big", r"prior_precision must be a number or a tensor"),
    ],
)
def test_bad_prior_precision(problem, prior, match):
    la = Laplace(problem.model, "classification", hessian_structure="diag")
    la.fit(problem.loader())
    error = TypeError if isinstance(prior, str) else ValueError
    with pytest.raises(error, match=match):
        la.prior_precision = prior
    with pytest.raises(error, match=match):
        la.log_marginal_likelihood(prior_precision=prior)


def test_bad_prior_shape_before_fit_is_checked_at_fit(problem):
    la = Laplace(
        problem.model,
        "classification",
        hessian_structure="diag",
        prior_precision=torch.ones(3),
    )
    with pytest.raises(ValueError, match=r"got shape \[3\]"):
        la.fit(problem.loader())


def test_kron_rejects_a_diagonal_prior(problem):
    la = Laplace(problem.model, "classification", hessian_structure="kron")
    la.fit(problem.loader())
    with pytest.raises(ValueError, match=r"'kron' takes a scalar or per-layer"):
        la.log_marginal_likelihood(prior_precision=torch.ones(15))
    size = sum(p.numel() for p in problem.model.parameters())
    with pytest.raises(ValueError, match=rf"got one per weight \(\[{size}\]\)"):
        Laplace(  # checked at construction where the weights are known
            problem.model,
            "classification",
            "all",
            "kron",
            prior_precision=torch.ones(size),
        )


def test_bad_prior_mean(problem):
    with pytest.raises(ValueError, match=r"prior_mean must be a scalar or of shape"):
        Laplace(problem.model, "classification", prior_mean=torch.ones(2, 2))


def test_wrong_likelihood_for_the_targets(problem):
    la = Laplace(
        problem.model, "regression", subset_of_weights="all", hessian_structure="diag"
    )
    with pytest.raises(
        ValueError,
        match=r"likelihood='regression' needs "
        r"floating-point targets",
    ):
        la.fit(problem.loader())
    ll = Laplace(problem.model, "binary", hessian_structure="full")
    with pytest.raises(ValueError, match=r"likelihood='binary' needs"):
        ll.fit(problem.loader())
    classes = Laplace(problem.model, "classification")
    y_float = [(x, torch.zeros(len(x), 3, dtype=x.dtype)) for x, _ in problem.loader()]
    with pytest.raises(ValueError, match=r"needs integer class targets"):
        classes.fit(y_float)


def test_sigma_noise_errors(problem):
    with pytest.raises(ValueError, match=r"sigma_noise is a regression parameter"):
        Laplace(problem.model, "classification", sigma_noise=0.5)
    with pytest.raises(ValueError, match=r"sigma_noise must be finite and positive"):
        Laplace(problem.model, "regression", sigma_noise=0.0)
    regression = make_problem("regression")
    la = Laplace(
        regression.model,
        "regression",
        hessian_structure="full",
        sigma_noise=torch.tensor([0.5, 1.0]),
    )
    la.fit(regression.loader())
    la.sigma_noise = torch.tensor([1.0, 2.0])  # a common factor is fine
    with pytest.raises(ValueError, match=r"may only change by a common factor"):
        la.sigma_noise = torch.tensor([1.0, 1.0])
    with pytest.raises(ValueError, match=r"per output \[2\], got shape \[3\]"):
        la.sigma_noise = torch.ones(3)
    wrong = Laplace(regression.model, "regression", sigma_noise=torch.ones(3))
    with pytest.raises(ValueError, match=r"per-output sigma_noise of 3 entries"):
        wrong.fit(regression.loader())


@pytest.mark.parametrize(("dtype", "weight"), [(torch.float64, 1e200)])
def test_nan_curvature(problem, dtype, weight):
    """Feature products overflow while the output stays finite (zero weights).

    A float32 model with features of 3e30 has a finite float64 curvature (1e61):
    the curvature is accumulated in float64, so only float64 overflow is tested.
    """
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 3)).to(dtype)
    with torch.no_grad():
        model[0].weight.fill_(weight)
        model[1].weight.zero_()
    x = torch.ones(4, 3, dtype=dtype)
    y = torch.zeros(4, dtype=torch.long)
    la = Laplace(model, "classification", hessian_structure="full")
    with pytest.raises(NonFiniteCurvatureError, match=r"curvature of batch 1 contains"):
        la.fit([(x / weight, y), (x, y)])
    assert not la.is_fitted


def test_empty_loader(problem):
    la = Laplace(
        problem.model,
        "classification",
        subset_of_weights="all",
        hessian_structure="diag",
    )
    with pytest.raises(ValueError, match=r"train_loader yielded no batches"):
        la.fit([])
    la.fit(problem.loader())
    before = la.log_marginal_likelihood()
    with pytest.raises(ValueError, match=r"yielded no batches"):
        la.fit([])
    torch.testing.assert_close(la.log_marginal_likelihood(), before)  # unchanged


def test_bad_batches(problem):
    la = Laplace(problem.model, "classification")
    with pytest.raises(ValueError, match=r"an \(inputs, targets\) pair or a dict"):
        la.fit([problem.x])
    with pytest.raises(KeyError, match=r"dict batch lacks the keys \['labels'\]"):
        la.fit([{"input_ids": problem.x}])
    pair = (problem.x, problem.y)
    for loader, index in (([None], 0), ([pair, None, pair], 1)):  # not skipped
        with pytest.raises(ValueError, match=rf"batch {index}: .* got NoneType"):
            la.fit(loader)


def test_last_layer_errors(problem):
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = problem.model

        def forward(self, x):
            return 2 * self.inner(x)

    la = Laplace(Scaled(), "classification")
    with pytest.raises(
        ValueError,
        match=r"the model output is not the output of its "
        r"last nn.Linear layer 'inner.2'",
    ):
        la.fit(problem.loader())
    with pytest.raises(ValueError, match=r"last_layer_name='head' is not a module"):
        LastLayerLaplace(problem.model, "classification", last_layer_name="head")
    with pytest.raises(ValueError, match=r"is a Tanh; the last-layer Laplace needs"):
        LastLayerLaplace(problem.model, "classification", last_layer_name="1")
    with pytest.raises(ValueError, match=r"found no trainable nn.Linear"):
        Laplace(nn.Sequential(nn.Tanh()), "classification").fit(problem.loader())


def test_subnetwork_errors(problem):
    def make(indices, structure="full"):
        return Laplace(
            problem.model,
            "classification",
            subset_of_weights="subnetwork",
            hessian_structure=structure,
            subnetwork_indices=indices,
        )

    with pytest.raises(TypeError, match=r"subnetwork_indices"):  # as laplace-torch
        Laplace(problem.model, "classification", subset_of_weights="subnetwork")
    with pytest.raises(ValueError, match=r"must be a 1-D integer tensor"):
        make(None)
    with pytest.raises(ValueError, match=r"must be a 1-D integer tensor"):
        make(torch.tensor([0.5]))
    with pytest.raises(ValueError, match=r"non-empty and without repeats"):
        make(torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 31\)"):
        make(torch.tensor([31]))
    with pytest.raises(
        ValueError, match=r"'kron' needs subnetwork_indices that select"
    ):
        make(torch.tensor([0, 1]), "kron")


def test_tuning_errors(problem):
    la = Laplace(problem.model, "classification", hessian_structure="diag")
    la.fit(problem.loader())
    with pytest.raises(ValueError, match=r"unknown method='bayes'"):
        la.optimize_prior_precision(method="bayes")
    with pytest.raises(ValueError, match=r"unknown prior_structure='blocks'"):
        la.optimize_prior_precision(prior_structure="blocks")
    with pytest.raises(ValueError, match=r"method='gridsearch' needs a val_loader"):
        la.optimize_prior_precision(method="gridsearch")
    with pytest.raises(
        ValueError,
        match=r"tune_sigma_noise=True needs "
        r"likelihood='regression'",
    ):
        la.optimize_prior_precision(tune_sigma_noise=True)
    with pytest.raises(ValueError, match=r"n_steps must be a positive int"):
        la.optimize_prior_precision(n_steps=0)


def test_state_errors(problem):
    la = Laplace(problem.model, "classification", hessian_structure="diag")
    la.fit(problem.loader())
    state = la.state_dict()
    other = Laplace(problem.model, "classification", hessian_structure="full")
    with pytest.raises(
        ValueError,
        match=r"saved with hessian_structure='diag', this "
        r"approximation has hessian_structure='full'",
    ):
        other.load_state_dict(state)
    everything = Laplace(
        problem.model,
        "classification",
        subset_of_weights="all",
        hessian_structure="diag",
    )
    with pytest.raises(ValueError, match=r"subset='last_layer'"):
        everything.load_state_dict(state)


def test_lowrank_needs_all_data_at_once(problem):
    la = Laplace(problem.model, "classification", hessian_structure="lowrank")
    la.fit(problem.loader())
    with pytest.raises(ValueError, match=r"cannot add to an earlier fit"):
        la.fit(problem.loader(), override=False)
    with pytest.raises(ValueError, match=r"needs a re-iterable train_loader"):
        la.fit(iter(problem.loader()))


def test_memory_checked_before_allocating():
    """A 1M-weight full structure names its size and alternatives up front."""
    model = nn.Sequential(nn.Linear(1000, 1000), nn.Linear(1000, 2))
    x, y = torch.randn(4, 1000), torch.tensor([0, 1, 0, 1])
    la = Laplace(model, "classification", "all", "full")
    with pytest.raises(MemoryBudgetError, match=r"hessian_structure='full'.*kron"):
        la.fit([(x, y)])
    assert not la.is_fitted
    la = Laplace(model, "classification", "all", "kron", max_memory=10_000)
    with pytest.raises(MemoryBudgetError, match=r"'kron'.*max_memory"):
        la.fit([(x, y)])


def test_memory_checked_for_dense_results(problem):
    la = Laplace(problem.model, "classification", "all", "diag")
    la.fit(problem.loader())
    la.max_memory = 100
    with pytest.raises(MemoryBudgetError, match=r"posterior_covariance"):
        _ = la.posterior_covariance
    la.max_memory = None
    assert la.posterior_covariance.shape == (la.n_params, la.n_params)
