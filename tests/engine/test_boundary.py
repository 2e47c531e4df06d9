"""Bad arguments at the engine's boundary raise errors that name the problem.

Every entry point (backprop, ggn_matrix, the products, the operators) runs the same
checks before computing anything.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from bayescurv import engine


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


X = torch.randn(5, 3)
Y = torch.randn(5, 2)
LOSS = nn.MSELoss()

ENTRY_POINTS = {
    "backprop": lambda m, x, y, **kw: engine.backprop(
        m, LOSS, x, y, [engine.DiagGGNExact()], **kw
    ),
    "ggn_matrix": lambda m, x, y, **kw: engine.ggn_matrix(m, LOSS, x, y, **kw),
    "ggn_vector_product": lambda m, x, y, **kw: engine.ggn_vector_product(
        m, LOSS, x, y, torch.ones(26), **kw
    ),
    "GGNOperator": lambda m, x, y, **kw: (
        engine.GGNOperator(m, LOSS, [(x, y)], **kw) @ torch.ones(26)
    ),
}


@pytest.fixture(params=list(ENTRY_POINTS), ids=list(ENTRY_POINTS))
def call(request):
    return ENTRY_POINTS[request.param]


class Tupled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _model()

    def forward(self, x):
        return self.net(x), x


class Dicted(Tupled):
    def forward(self, x):
        return {"logits": self.net(x), "hidden": x}


@pytest.mark.parametrize(
    ("inputs", "error", "match"),
    [
        (X[:0], ValueError, r"inputs has an empty batch \(shape \(0, 3\)\)"),
        ({"x": X}, TypeError, r"inputs is a dict with keys \['x'\].*positional"),
        (X.numpy(), TypeError, r"must be a torch.Tensor.*got ndarray.*as_tensor"),
        (X.tolist(), TypeError, r"inputs\[0\] is a list; every model input must be"),
        (torch.empty(5, 3, device="meta"), ValueError, r"inputs is a meta tensor"),
    ],
    ids=["empty", "dict", "numpy", "list", "meta"],
)
def test_bad_inputs(call, inputs, error, match):
    with pytest.raises(error, match=match):
        call(_model(), inputs, Y)


def test_nan_and_inf_inputs_are_counted(call):
    x = X.clone()
    x[1, 2], x[3, 0], x[4, 1] = float("nan"), float("inf"), float("nan")
    with pytest.raises(
        ValueError,
        match=r"inputs contains NaN or inf values: 2 NaN and 1 inf of 15 entries, "
        r"the first at index \(1, 2\)",
    ):
        call(_model(), x, Y)


def test_nan_weights_are_reported_as_such(call):
    model = _model()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(
        ValueError, match=r"model output contains NaN.*inputs are finite.*weights"
    ):
        call(model, X, Y)


@pytest.mark.parametrize(
    ("targets", "error", "match"),
    [
        (Y.numpy(), TypeError, r"targets must be a torch.Tensor, got ndarray"),
        (torch.full((5, 2), float("nan")), ValueError, r"targets contains NaN"),
    ],
    ids=["numpy", "nan"],
)
def test_bad_targets(call, targets, error, match):
    with pytest.raises(error, match=match):
        call(_model(), X, targets)


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (Tupled(), r"returned a tuple of 2 items.*one tensor.*output\[0\]"),
        (Dicted(), r"returned a dict with keys \['logits', 'hidden'\].*\['logits'\]"),
    ],
    ids=["tuple", "dict"],
)
def test_tuple_and_dict_outputs(call, model, match):
    with pytest.raises(TypeError, match=match):
        call(model, X, Y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_are_refused(call, dtype):
    with pytest.raises(TypeError, match=rf"'0.weight' has dtype {dtype}.*float32"):
        call(_model().to(dtype), X.to(dtype), Y.to(dtype))


def test_half_precision_parameters_outside_the_selection_are_fine():
    model = _model()
    model[0].to(torch.float16).requires_grad_(False)  # a frozen, half base layer
    model[0].float()
    res = engine.backprop(
        model, LOSS, X, Y, [engine.DiagGGNExact()], params=["2.weight"]
    )
    assert res["diag_ggn_exact"]["2.weight"].dtype == torch.float32


def test_meta_parameters_are_refused(call):
    with torch.device("meta"):
        model = _model()
    with pytest.raises(ValueError, match=r"'0.weight' is on the meta device.*to_empty"):
        call(model, X, Y)


@pytest.mark.parametrize("generator", [123, "seed", np.random.default_rng(0)])
def test_generator_of_a_wrong_type(generator):
    model = _model()
    match = r"generator must be a torch.Generator or None, got .*manual_seed"
    with pytest.raises(TypeError, match=match):
        engine.backprop(model, LOSS, X, Y, [engine.DiagGGNMC()], generator=generator)
    with pytest.raises(TypeError, match=match):
        engine.ggn_vector_product(
            model, LOSS, X, Y, torch.ones(26), mc_samples=1, generator=generator
        )
    with pytest.raises(TypeError, match=match):
        engine.GGNOperator(model, LOSS, [(X, Y)], mc_samples=1, generator=generator)


def test_checks_do_not_change_valid_results():
    model = _model()
    res = engine.backprop(copy.deepcopy(model), LOSS, (X,), Y, [engine.DiagGGNExact()])[
        "diag_ggn_exact"
    ]
    dense = engine.ggn_matrix(model, LOSS, [X], Y)
    diag = torch.cat([v.flatten() for v in res.values()])
    torch.testing.assert_close(diag, dense.diagonal())


@pytest.mark.parametrize("bad", [2, -1, -7])
def test_class_targets_out_of_range(bad):
    """A class index outside [0, C) (other than ignore_index) names it and where."""
    targets = torch.tensor([0, 1, bad, 1, 0])
    loss = nn.CrossEntropyLoss()
    for call in (
        lambda: engine.backprop(_model(), loss, X, targets, [engine.DiagGGNExact()]),
        lambda: engine.ggn_matrix(_model(), loss, X, targets),
    ):
        with pytest.raises(
            ValueError, match=rf"lie in \[0, C=2\).*got {bad} at \(2,\)"
        ):
            call()
    ignored = torch.tensor([0, 1, -100, 1, 0])
    engine.ggn_matrix(_model(), loss, X, ignored)  # ignore_index is fine
