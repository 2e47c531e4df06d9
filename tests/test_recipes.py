"""``bayescurv.recipes.calibrated``: a Laplace recipe chosen by the data it is given."""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import pytest
import torch
from torch import Tensor, nn

from bayescurv import recipes

TEMPERATURES = (1.0, 0.1, 0.01)
"""A short explicit grid that keeps most tests fast."""
N_TRAIN, N_VAL, N_TEST = 150, 60, 40


class Problem(NamedTuple):
    """A trained tiny model and its data splits (lists of one batch each)."""

    model: nn.Module
    train: list[tuple[Tensor, Tensor]]
    val: list[tuple[Tensor, Tensor]]
    test: tuple[Tensor, Tensor]


def _train(model: nn.Module, x: Tensor, y: Tensor, loss: nn.Module) -> nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(300):
        optimizer.zero_grad()
        loss(model(x), y).backward()
        optimizer.step()
    return model.eval()


def _split(x: Tensor, y: Tensor) -> tuple[list, list, tuple[Tensor, Tensor]]:
    a, b = N_TRAIN, N_TRAIN + N_VAL
    return [(x[:a], y[:a])], [(x[a:b], y[a:b])], (x[b:], y[b:])


def _problem(x: Tensor, y: Tensor, model: nn.Module, loss: nn.Module) -> Problem:
    train, val, test = _split(x, y)
    _train(model, *train[0], loss)
    return Problem(model, train, val, test)


@pytest.fixture(scope="module")
def blobs() -> Problem:
    """Three Gaussian classes in 4-D and a trained 4-16-3 MLP."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (N_TRAIN + N_VAL + N_TEST,), generator=gen)
    centers = torch.randn(3, 4, generator=gen) * 3
    x = centers[y] + torch.randn(len(y), 4, generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    return _problem(x, y, model, nn.CrossEntropyLoss())


@pytest.fixture(scope="module")
def noisy_line() -> Problem:
    """``y = 2 x_0 - x_1 + 0.1 eps`` and a trained 2-16-1 MLP."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N_TRAIN + N_VAL + N_TEST, 2, generator=gen)
    y = (2 * x[:, :1] - x[:, 1:]) + 0.1 * torch.randn(len(x), 1, generator=gen)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1))
    return _problem(x, y, model, nn.MSELoss())


@pytest.fixture(scope="module")
def post(blobs: Problem) -> recipes.CalibratedLaplace:
    return recipes.calibrated(
        blobs.model, blobs.train, blobs.val, temperatures=TEMPERATURES
    )


def test_predicts_probabilities_with_the_chosen_options(blobs, post):
    x, _ = blobs.test
    probs = post(x)
    assert probs.shape == (N_TEST, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(N_TEST))
    choices = post.choices
    expected = post.la(x, link_approx=choices.link)
    torch.testing.assert_close(probs, expected)
    assert choices.chosen_by == "validation"
    assert choices.n_val == N_VAL
    assert choices.temperature in TEMPERATURES
    assert choices.link in recipes.LINKS
    assert choices.structure == post.la.hessian_structure.value
    assert post.la.temperature == choices.temperature
    assert choices.prior_precision == pytest.approx(post.la.prior_precision.item())


def test_structure_is_the_one_with_the_largest_evidence(post):
    evidence = post.choices.evidence
    assert set(evidence) == set(recipes.STRUCTURES)
    assert post.choices.structure == max(evidence, key=evidence.__getitem__)


def test_choice_is_the_warmest_within_one_paired_standard_error(post):
    candidates = post.choices.candidates
    assert len(candidates) == len(TEMPERATURES) * len(recipes.LINKS)
    best = min(candidates, key=lambda c: c.val_nll)
    assert best.paired_se == 0
    admissible = [c for c in candidates if c.val_nll - best.val_nll <= c.paired_se]
    warmest = max(c.temperature for c in admissible)
    assert post.choices.temperature == warmest
    chosen = [c for c in admissible if c.temperature == warmest]
    assert post.choices.val_nll == min(c.val_nll for c in chosen)


def test_repr_shows_every_choice_and_its_source(post):
    text = repr(post)
    choices = post.choices
    for part in (
        f"structure={choices.structure!r}",
        f"temperature={choices.temperature:.3g}",
        f"link={choices.link!r}",
        f"prior_precision={choices.prior_precision:.4g}",
        "evidence at T=1",
        f"validation NLL {choices.val_nll:.4f} on {N_VAL} samples",
    ):
        assert part in text


def test_choices_come_only_from_train_and_validation_data(blobs, post):
    x_test, _ = blobs.test
    other_test = torch.randn(25, 4, generator=torch.Generator().manual_seed(9))
    again = recipes.calibrated(
        blobs.model, blobs.train, blobs.val, temperatures=TEMPERATURES
    )
    again(other_test)  # predicting other test inputs first changes nothing
    assert again.choices == post.choices
    torch.testing.assert_close(again(x_test), post(x_test), rtol=0, atol=0)


def test_validation_labels_decide_the_temperature(blobs, post):
    x_val, y_val = blobs.val[0]
    scrambled = (y_val + 1 + torch.arange(N_VAL) % 2) % 3  # every label wrong
    wrong = recipes.calibrated(
        blobs.model, blobs.train, [(x_val, scrambled)], temperatures=TEMPERATURES
    )
    assert wrong.choices.val_nll > post.choices.val_nll
    assert wrong.choices.temperature == max(TEMPERATURES) > post.choices.temperature


def test_without_validation_data_the_evidence_decides(blobs):
    before = copy.deepcopy(blobs.model.state_dict())
    post = recipes.calibrated(blobs.model, blobs.train)
    choices = post.choices
    assert (choices.chosen_by, choices.temperature, choices.link) == (
        "evidence", 1.0, "probit",
    )  # fmt: skip
    assert choices.candidates == ()
    assert choices.val_nll is None
    assert "no validation data" in repr(post)
    for name, value in blobs.model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed"


def test_default_grid_spans_quarter_decades_from_one_to_a_thousandth(blobs):
    post = recipes.calibrated(blobs.model, blobs.train, blobs.val, links=("probit",))
    scored = {c.temperature for c in post.choices.candidates}
    for k in range(13):
        assert any(math.isclose(t, 10 ** (-k / 4)) for t in scored)


def test_regression_predicts_target_moments(noisy_line):
    post = recipes.calibrated(
        noisy_line.model, noisy_line.train, noisy_line.val, "regression",
        temperatures=TEMPERATURES,
    )  # fmt: skip
    x, y = noisy_line.test
    mean, var = post(x)
    assert mean.shape == var.shape == (N_TEST, 1)
    assert bool((var >= post.choices.sigma_noise**2 * (1 - 1e-6)).all())
    assert post.choices.link is None
    assert post.choices.sigma_noise == pytest.approx(0.1, rel=0.5)
    assert "sigma_noise=" in repr(post)
    assert (y - mean).abs().max() < 5 * var.sqrt().max()


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"likelihood": "binary"}, ValueError, "'classification' with two outputs"),
        ({"model": "not a model"}, TypeError, "model must be an nn.Module"),
        ({"structures": ()}, ValueError, "structures must name"),
        ({"links": ()}, ValueError, "links must name"),
        ({"temperatures": (1.0, 0.0)}, ValueError, "temperatures must be positive"),
        ({"val_loader": []}, ValueError, "fewer than 2 samples"),
        ({"train_loader": 3}, TypeError, "train_loader must be a re-iterable"),
        ({"val_loader": iter([])}, ValueError, "val_loader is an iterator"),
        ({"val_loader": [torch.zeros(3, 4)]}, ValueError, r"\(inputs, targets\)"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_input_raises_a_clear_error(blobs, change, error, match):
    arguments = {
        "model": blobs.model,
        "train_loader": blobs.train,
        "val_loader": blobs.val,
        "temperatures": TEMPERATURES,
    } | change
    with pytest.raises(error, match=match):
        recipes.calibrated(**arguments)


@pytest.mark.parametrize(
    ("targets", "match"),
    [
        (torch.full((N_VAL,), 3), r"must lie in \[0, 3\)"),
        (torch.zeros(N_VAL), "class indices"),
    ],
    ids=["out-of-range", "float"],
)
def test_bad_validation_targets_are_named(blobs, targets, match):
    x_val, _ = blobs.val[0]
    with pytest.raises(ValueError, match=match):
        recipes.calibrated(
            blobs.model, blobs.train, [(x_val, targets)], temperatures=(1.0,)
        )
