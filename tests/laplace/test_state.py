"""The fitted state: immutable, replaced atomically, saved as copies, checked."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from bayescurv import Laplace
from bayescurv.laplace import FittedState, Hyperparameters, serialization
from tests.conftest import assert_close
from tests.laplace.conftest import fit_laplace, make_problem

STRUCTURES = ["full", "kron", "diag", "lowrank"]
SUBSETS = ["all", "last_layer"]


def fitted(problem, subset="all", structure="full", **kwargs):
    return fit_laplace(problem, subset, structure, **kwargs)


class Interrupted:
    """A loader that raises ``error`` after yielding ``good`` batches."""

    def __init__(self, batches: list, good: int, error: BaseException) -> None:
        self.batches, self.good, self.error = batches, good, error

    def __iter__(self):
        yield from self.batches[: self.good]
        raise self.error


def test_state_and_hyperparameters_are_immutable():
    la = fitted(make_problem("classification"))
    assert isinstance(la.state, FittedState)
    assert isinstance(la.hyperparameters, Hyperparameters)
    with pytest.raises(dataclasses.FrozenInstanceError):
        la.state.n_data = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        la.hyperparameters.temperature = 2.0
    before = la.hyperparameters
    la.prior_precision = 3.0  # a new object, the old one unchanged
    assert la.hyperparameters is not before
    assert before.prior_precision.item() == 1.0


@pytest.mark.parametrize("error", [RuntimeError("disk"), KeyboardInterrupt()])
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("subset", SUBSETS)
def test_an_interrupted_fit_keeps_the_previous_posterior(subset, structure, error):
    problem = make_problem("regression")
    la = fitted(problem, subset, structure, sigma_noise=0.8)
    state, evidence = la.state, la.log_marginal_likelihood()
    variance = la(problem.x)[1]
    for override in (True, False) if structure != "lowrank" else (True,):
        with pytest.raises(type(error)):
            la.fit(Interrupted(problem.loader(), 2, error), override=override)
        assert la.state is state
        assert_close(la.log_marginal_likelihood(), evidence, "evidence kept")
        assert_close(la(problem.x)[1], variance, "predictive kept")


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_a_saved_state_is_not_changed_by_a_later_fit(structure):
    """fit(override=False) adds to private copies, never to a saved state."""
    problem = make_problem("classification")
    la = fitted(problem, "all", structure)
    saved = la.state_dict()
    before = la.posterior_variance.clone()
    la.fit(problem.loader(), override=False)  # twice the data
    fresh = Laplace(
        problem.model,
        "classification",
        subset_of_weights="all",
        hessian_structure=structure,
    )
    fresh.load_state_dict(saved)
    assert_close(fresh.posterior_variance, before, "restored posterior")
    assert not torch.allclose(la.posterior_variance, before)


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_an_earlier_state_keeps_its_sums_and_curvature(subset, structure):
    """The sums handed to a state are never added to: a later fit absorbs them."""
    problem = make_problem("classification")
    la = fitted(problem, subset, structure)
    earlier = la.state
    sums = [t.clone() for t in _tensors(earlier.sums)]
    dense = earlier.curvature.dense().clone()
    la.fit(problem.loader(), override=False)
    assert la.state is not earlier
    for kept, copy in zip(_tensors(earlier.sums), sums, strict=True):
        assert torch.equal(kept, copy)
    assert torch.equal(earlier.curvature.dense(), dense)
    assert_close(la.state.curvature.dense(), 2 * dense, "twice the data")


def _tensors(sums: dict) -> list[torch.Tensor]:
    if "factors" in sums:
        return [f for fs in sums["factors"] for f in fs]
    return [sums["total"]]


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_the_saved_state_is_flat_and_nested_states_load(subset):
    """laplace-torch's check: values are tensors, numbers, strings, lists or None."""
    problem = make_problem("regression")
    la = fitted(problem, subset, "kron")
    saved = la.state_dict()
    plain = (list, tuple, int, float, str, bool, torch.Tensor, type(None))
    assert all(isinstance(value, plain) for value in saved.values())
    nested = serialization.unflatten(saved)
    assert isinstance(nested["curvature"], dict)
    for state in (saved, nested):  # the nested form of earlier saves loads too
        fresh = Laplace(problem.model, "regression", subset, "kron")
        fresh.load_state_dict(state)
        assert_close(fresh(problem.x)[1], la(problem.x)[1], "restored predictive")


def test_flatten_escapes_separators_in_names():
    tree = {"a/b": {"c%2F": 1, "d": {}}, "e": torch.ones(2)}
    flat = serialization.flatten(tree)
    assert set(flat) == {"a%2Fb/c%252F", "a%2Fb/d/", "e"}
    assert serialization.unflatten(flat) == {
        "a/b": {"c%2F": 1, "d": {}},
        "e": flat["e"],
    }


def test_loading_into_another_architecture_raises():
    """A 3-20-2 state must not load into a 3-25-2 model (names equal, shapes not)."""
    torch.manual_seed(0)
    x, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    small = nn.Sequential(nn.Linear(3, 20), nn.Tanh(), nn.Linear(20, 2))
    wide = nn.Sequential(nn.Linear(3, 25), nn.Tanh(), nn.Linear(25, 2))
    for subset in SUBSETS:
        la = Laplace(small, "classification", subset_of_weights=subset)
        la.fit([(x, y)])
        other = Laplace(wide, "classification", subset_of_weights=subset)
        with pytest.raises(ValueError, match=r"'[02]\.weight' had shape \[\d+, \d+\]"):
            other.load_state_dict(la.state_dict())
        assert not other.is_fitted


def test_loading_over_other_weights_warns():
    problem = make_problem("classification")
    model = problem.model
    la = fitted(problem, "last_layer", "kron")
    saved = la.state_dict()
    with torch.no_grad():
        model[2].weight.add_(0.5)
    try:
        fresh = Laplace(model, "classification")
        with pytest.warns(UserWarning, match="differ from the MAP"):
            fresh.load_state_dict(saved)
    finally:
        with torch.no_grad():
            model[2].weight.sub_(0.5)


def test_not_a_saved_state_raises():
    la = Laplace(make_problem("classification").model, "classification")
    with pytest.raises(ValueError, match="not a state of this bayescurv version"):
        la.load_state_dict({"mean": torch.zeros(3)})


@pytest.mark.parametrize("subset", SUBSETS)
def test_predictions_run_in_eval_mode_and_restore_the_mode(subset):
    """A model switched back to train mode (dropout) still predicts the posterior."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 2)
    ).double()
    x = torch.randn(30, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (30,))
    la = Laplace(model, "classification", subset_of_weights=subset)
    la.fit([(x, y)])
    expected = la(x)
    model.train()
    assert_close(la(x), expected, "train mode")
    assert_close(la.glm_moments(x)[1], la.glm_moments(x)[1], "deterministic")
    assert model.training
    assert model[2].training
    model[2].eval()  # mixed modes come back module by module
    assert_close(la(x), expected, "mixed modes")
    assert [m.training for m in model] == [True, True, False, True]
