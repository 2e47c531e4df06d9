"""Inputs checked once at the Laplace boundary; -100 targets and empty batches skipped.

Every bad input raises an error naming the argument (``train_loader batch i`` or
``x``) before any model call; the skipping policies are checked against a fit on the
data with the skipped samples removed, and per-position -100 targets against a dense
``torch.func`` GGN of the masked loss.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from bayescurv import Laplace
from bayescurv.engine import reference
from bayescurv.laplace import InputTypeError, ModelCallError
from tests.conftest import assert_close
from tests.laplace.conftest import make_problem

F64 = torch.float64
SUBSETS = ["last_layer", "all"]
STRUCTURES = ["full", "kron", "diag", "lowrank"]


def _with(tensor: Tensor, index: tuple, value: float) -> Tensor:
    out = tensor.clone()
    out[index] = value
    return out


class Wrapped(nn.Module):
    """The problem's MLP returning a tuple or a dict."""

    def __init__(self, model: nn.Module, kind: str) -> None:
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, x: Tensor) -> object:
        out = self.model(x)
        return (out, x) if self.kind == "tuple" else {"logits": out}


def _bad_fits():
    """(id, likelihood, batch from the problem's (x, y), error type, message)."""
    c = make_problem("classification")
    r = make_problem("regression")
    b = make_problem("binary")
    nan_x, inf_x = _with(c.x, (1, 2), float("nan")), _with(c.x, (0, 0), float("inf"))
    return [
        ("nan-x", c, (nan_x, c.y), ValueError, r"batch 0: inputs contains NaN"),
        ("inf-x", c, (inf_x, c.y), ValueError, r"inputs contains NaN or inf.*1 inf"),
        (
            "nan-y",
            r,
            (r.x, _with(r.y, (3, 1), float("nan"))),
            ValueError,
            r"batch 0: targets contains NaN or inf values.*index \(3, 1\)",
        ),
        (
            "binary-2",
            b,
            (b.x, _with(b.y, (0, 0), 2.0)),
            ValueError,
            r"likelihood='binary' needs targets in \[0, 1\].*got 2.0",
        ),
        (
            "binary-neg",
            b,
            (b.x, _with(b.y, (2, 1), -0.5)),
            ValueError,
            r"needs targets in \[0, 1\].*got -0.5 at index \(2, 1\)",
        ),
        (
            "class-C",
            c,
            (c.x, _with(c.y, (4,), 3)),
            ValueError,
            r"class(-index)? targets must lie in \[0, C=3\)",
        ),
        (
            "class-neg",
            c,
            (c.x, _with(c.y, (4,), -2)),
            ValueError,
            r"targets must lie in \[0, C\) or equal -100.*got -2 at index \(4,\)",
        ),
        ("class-float", c, (c.x, c.y.double()), ValueError, r"targets.long\(\)"),
        ("class-bool", c, (c.x, c.y > 0), ValueError, r"got torch.bool"),
        ("class-int32", c, (c.x, c.y.int()), ValueError, r"got torch.int32"),
        ("numpy-x", c, (c.x.numpy(), c.y), InputTypeError, r"inputs must be a torch"),
        ("numpy-y", c, (c.x, c.y.numpy()), InputTypeError, r"targets must be a torch"),
        ("list-x", c, (c.x.tolist(), c.y), InputTypeError, r"inputs\[0\] must be"),
        ("meta-x", c, (c.x.to("meta"), c.y), ValueError, r"inputs is a meta tensor"),
        ("meta-y", c, (c.x, c.y.to("meta")), ValueError, r"targets is a meta tensor"),
        ("dtype-x", c, (c.x.float(), c.y), InputTypeError, r"torch.float32, the mod"),
        ("length", c, (c.x, c.y[:5]), ValueError, r"the inputs hold 12 samples"),
        ("scalar-y", c, (c.x, c.y[0]), ValueError, r"targets have shape \[\]"),
    ]


BAD_FITS = _bad_fits()


@pytest.mark.parametrize("subset", SUBSETS)
@pytest.mark.parametrize(
    ("problem", "batch", "error", "match"),
    [case[1:] for case in BAD_FITS],
    ids=[case[0] for case in BAD_FITS],
)
def test_bad_batches_raise_naming_the_batch(subset, problem, batch, error, match):
    la = Laplace(problem.model, problem.likelihood, subset, "full")
    good = (problem.x, problem.y)
    with pytest.raises(error, match=match):
        la.fit([good, batch] if "batch 0" not in match else [batch])
    assert not la.is_fitted


def test_the_batch_index_is_named():
    c = make_problem("classification")
    la = Laplace(c.model, "classification", "all", "diag")
    bad = (_with(c.x, (0, 0), float("nan")), c.y)
    with pytest.raises(ValueError, match=r"train_loader batch 2: inputs contains"):
        la.fit([(c.x, c.y), (c.x, c.y), bad])


@pytest.mark.parametrize("kind", ["tuple", "dict"])
@pytest.mark.parametrize("subset", SUBSETS)
def test_tuple_and_dict_outputs(subset, kind):
    c = make_problem("classification")
    la = Laplace(Wrapped(c.model, kind), "classification", subset, "diag")
    with pytest.raises(TypeError, match=rf"The model returned a {kind}"):
        la.fit([(c.x, c.y)])


@pytest.mark.parametrize("subset", SUBSETS)
def test_bad_predictive_inputs_name_x(subset):
    c = make_problem("classification")
    la = Laplace(c.model, "classification", subset, "full")
    la.fit(c.loader())
    nan_x = _with(c.x, (0, 1), float("nan"))
    cases = [
        (nan_x, ValueError, r"^x contains NaN or inf values: 1 NaN"),
        (c.x.numpy(), InputTypeError, r"^x must be a torch.Tensor"),
        (c.x.tolist(), InputTypeError, r"^x\[0\] must be a torch.Tensor"),
        (c.x[:0], ValueError, r"^x has no samples \(shape \[0, 3\]\)"),
        (c.x.to("meta"), ValueError, r"^x is a meta tensor"),
        (c.x.float(), InputTypeError, r"^x is torch.float32"),
    ]
    for x, error, match in cases:
        for call in (la, la.glm_moments, la.predictive_samples):
            with pytest.raises(error, match=match):
                call(x)
    with pytest.raises(ValueError, match=r"x contains NaN"):
        la(nan_x, pred_type="nn", link_approx="mc", n_samples=2)


def _fitted(problem, subset, structure, loader):
    kwargs = {}
    if subset == "subnetwork":  # the hidden layer's weight and the head's bias
        kwargs["subnetwork_indices"] = torch.cat(
            [torch.arange(12), torch.arange(28, 31)]
        )
    la = Laplace(problem.model, problem.likelihood, subset, structure, **kwargs)
    la.fit(loader)
    return la


def _assert_same_posterior(la, expected, what):
    assert la.n_data == expected.n_data, what
    assert_close(la.loss, expected.loss, f"{what}: loss")
    assert_close(la.log_marginal_likelihood(), expected.log_marginal_likelihood(), what)
    assert_close(la.posterior_variance, expected.posterior_variance, what)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("subset", [*SUBSETS, "subnetwork"])
def test_ignored_targets_are_skipped_like_removed_samples(subset, structure):
    """Samples with target -100 count nowhere: as if they were not in the data."""
    c = make_problem("classification")
    ignored = torch.tensor([1, 4, 5, 9])
    y = c.y.clone()
    y[ignored] = -100
    keep = y != -100
    loader = [(c.x[:5], y[:5]), (c.x[5:], y[5:])]
    la = _fitted(c, subset, structure, loader)
    reference_la = _fitted(c, subset, structure, [(c.x[keep], c.y[keep])])
    _assert_same_posterior(la, reference_la, f"{subset}/{structure}")
    assert la.n_data == 8


def test_ignored_targets_in_dict_batches_and_all_ignored_batches():
    """Dict entries are sliced with the targets; a batch of -100 only is skipped."""

    class DictModel(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, batch: dict) -> Tensor:
            return self.model(batch["input_ids"] * batch["scale"])

    c = make_problem("classification")
    model = DictModel(c.model)
    y = c.y.clone()
    y[[0, 3]] = -100
    scale = torch.linspace(0.5, 1.5, len(y), dtype=F64)[:, None]
    batch = {"input_ids": c.x, "scale": scale, "labels": y}
    only_ignored = {"input_ids": c.x[:2], "scale": scale[:2], "labels": y[:2] * 0 - 100}
    la = Laplace(model, "classification", "all", "full")
    la.fit([only_ignored, batch])
    keep = y != -100
    expected = Laplace(model, "classification", "all", "full")
    expected.fit([{"input_ids": c.x[keep], "scale": scale[keep], "labels": c.y[keep]}])
    _assert_same_posterior(la, expected, "dict batches")


def test_ignored_positions_of_per_position_targets_match_the_masked_ggn():
    """[N, C, T] outputs: positions with target -100 drop out of loss and GGN."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 1)).double()
    x = torch.randn(4, 2, 5, dtype=F64)
    y = torch.randint(0, 3, (4, 5))
    y[0, 1] = y[2, 4] = y[3, 0] = -100
    la = Laplace(model, "classification", "all", "full")
    la.fit([(x, y)])
    loss = nn.CrossEntropyLoss(reduction="sum")  # ignore_index=-100
    with torch.no_grad():
        expected_loss = loss(model(x), y)
    assert_close(
        la.posterior_precision,
        reference.ggn(model, loss, x, y) + torch.eye(la.n_params, dtype=F64),
        "masked GGN",
    )
    assert_close(la.loss, expected_loss, "masked loss")
    assert la.n_data == 4


@pytest.mark.parametrize("subset", SUBSETS)
def test_empty_batches_are_skipped(subset):
    c = make_problem("classification")
    la = _fitted(c, subset, "full", [(c.x[:0], c.y[:0]), *c.loader()])
    expected = _fitted(c, subset, "full", c.loader())
    _assert_same_posterior(la, expected, "empty batch")
    with pytest.raises(ValueError, match=r"no batches with samples"):
        la.fit([(c.x[:0], c.y[:0])])
    with pytest.raises(ValueError, match=r"no batches with samples"):
        la.fit([(c.x[:2], torch.full((2,), -100))])
    _assert_same_posterior(la, expected, "kept after a failed fit")


def test_an_int_seed_is_a_generator():
    c = make_problem("classification")
    la = _fitted(c, "all", "full", c.loader())

    def gen(seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    assert_close(la.sample(4, generator=123), la.sample(4, generator=gen(123)), "seed")
    mc = la(c.x, link_approx="mc", n_samples=5, generator=7)
    assert_close(mc, la(c.x, link_approx="mc", n_samples=5, generator=gen(7)), "mc")
    nn_samples = la.predictive_samples(c.x, "nn", 3, generator=2)
    assert_close(
        nn_samples, la.predictive_samples(c.x, "nn", 3, generator=gen(2)), "nn"
    )
    for bad in ("123", 1.5, True):
        with pytest.raises(InputTypeError, match=r"an int seed or None, got"):
            la.sample(2, generator=bad)


@pytest.mark.parametrize("subset", SUBSETS)
def test_inputs_the_model_cannot_take_name_their_shapes(subset):
    """The model's own error, re-raised naming the inputs; still its kind."""
    c = make_problem("classification")
    la = Laplace(c.model, "classification", subset, "full")
    with pytest.raises(ModelCallError, match=r"inputs .*Tensor\[12, 5\] float64"):
        la.fit([(torch.randn(12, 5, dtype=F64), c.y)])
    la.fit(c.loader())
    wrong = torch.randn(4, 5, dtype=F64)
    for call in (la, la.glm_moments):
        with pytest.raises(RuntimeError, match=r"the model raised RuntimeError"):
            call(wrong)
    with pytest.raises(ModelCallError, match=r"linear\(\).*must be Tensor, not dict"):
        la({"input_ids": c.x})
    with pytest.raises(ModelCallError) as raised:
        la(c.x.long())
    assert isinstance(raised.value.__cause__, RuntimeError)


def test_sampled_networks_check_the_outputs_per_sample():
    """An x without a batch axis: a Linear maps it to one output per feature."""
    c = make_problem("classification")
    la = Laplace(c.model, "classification", "all", "full")
    la.fit(c.loader())
    with pytest.raises(ValueError, match=r"x: the model gives 1 outputs per sample"):
        la(c.x[0], pred_type="nn", link_approx="mc", n_samples=3)


def test_meta_and_frozen_last_layer_models_are_refused_up_front():
    c = make_problem("classification")
    with pytest.raises(ValueError, match=r"parameters are on the meta device"):
        Laplace(nn.Linear(3, 2, device="meta"), "classification")
    frozen = make_problem("classification").model
    frozen[2].weight.requires_grad_(False)
    la = Laplace(frozen, "classification")
    with pytest.raises(ValueError, match=r"the last nn.Linear layer called, '2', has"):
        la.fit(c.loader())
