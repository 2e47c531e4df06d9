"""Loss options, chunking, weight tying, frozen/unused layers and user rules."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from bayescurv import engine
from bayescurv.engine import reference
from tests.cases import MODELS, make_problem
from tests.conftest import assert_close
from tests.engine.checks import assert_same_results

backprop_module = importlib.import_module("bayescurv.engine.backprop")

GGN_EXTS = [engine.BatchGrad(), engine.DiagGGNExact(), engine.BatchDiagGGNExact()]


def _check_against_reference(model, loss_func, x, y):
    """grad_batch, diag_ggn_exact and its per-sample version against dense."""
    res = engine.backprop(model, loss_func, x, y, GGN_EXTS)
    grads = reference.per_sample_gradients(model, loss_func, x, y)
    blocks = reference.per_sample_ggn(model, loss_func, x, y)
    diag = reference.split_vector(model, torch.diagonal(blocks, dim1=1, dim2=2))
    for name in grads:
        assert_close(res["grad_batch"][name], grads[name], f"grad_batch {name}")
        assert_close(res["diag_ggn_exact_batch"][name], diag[name], f"batch {name}")
        assert_close(res["diag_ggn_exact"][name], diag[name].sum(0), f"diag {name}")
    return res


def _mlp(out: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, out)).double()


X = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"weight": torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)},
        {"ignore_index": 1},
        {"label_smoothing": 0.2},
        {
            "weight": torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64),
            "ignore_index": 2,
            "label_smoothing": 0.1,
        },
    ],
    ids=["weight", "ignore_index", "label_smoothing", "all"],
)
def test_cross_entropy_options(kwargs, reduction):
    y = torch.tensor([0, 1, 2, 1, 0, 2])
    _check_against_reference(
        _mlp(), nn.CrossEntropyLoss(reduction=reduction, **kwargs), X, y
    )


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_cross_entropy_probability_targets(smoothing):
    y = torch.rand(6, 3, dtype=torch.float64).softmax(1)
    _check_against_reference(
        _mlp(), nn.CrossEntropyLoss(label_smoothing=smoothing), X, y
    )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bce_weight_and_pos_weight(reduction):
    loss = nn.BCEWithLogitsLoss(
        reduction=reduction,
        weight=torch.tensor([1.0, 3.0], dtype=torch.float64),
        pos_weight=torch.tensor([2.0, 0.5], dtype=torch.float64),
    )
    y = torch.randint(0, 2, (6, 2)).double()
    _check_against_reference(_mlp(2), loss, X, y)


def test_mse_on_extra_output_dimensions():
    model = nn.Sequential(nn.Unflatten(1, (5, 1)), nn.Linear(1, 2)).double()
    _check_against_reference(model, nn.MSELoss(), X, torch.randn(6, 5, 2).double())


def test_linear_l2_on_long_sequences_uses_exact_formula():
    """Both branches of Linear's batch_l2 (Gram trick and per-sample) agree."""
    for seq in (2, 40):
        model = nn.Sequential(nn.Linear(3, 2), nn.Flatten()).double()
        x = torch.randn(4, seq, 3, dtype=torch.float64)
        y = torch.randn(4, seq * 2, dtype=torch.float64)
        res = engine.backprop(model, nn.MSELoss(), x, y, [engine.BatchL2Grad()])
        grads = reference.per_sample_gradients(model, nn.MSELoss(), x, y)
        for name, g in grads.items():
            assert_close(res["batch_l2"][name], g.flatten(1).square().sum(1), name)


@pytest.mark.parametrize(
    "case", [MODELS[1], MODELS[5], MODELS[-1]], ids=lambda m: m.name
)
def test_chunked_columns_equal_unchunked(case):
    p = make_problem(case, "ce", "mean")
    args = (p.model, p.loss_func, p.inputs, p.targets)
    exts = [engine.DiagGGNExact(), engine.SqrtGGNExact(), engine.BatchDiagGGNExact()]
    full = engine.backprop(*args, exts)
    for chunked in (
        engine.backprop(*args, exts, chunk_size=1),
        engine.backprop(*args, exts, memory_budget=1),
    ):
        for ext in exts:
            for name, value in full[ext.savefield].items():
                assert_close(
                    chunked[ext.savefield][name], value, f"{ext.savefield} {name}"
                )


@pytest.mark.parametrize(
    "case", ["cnn", "residual_cnn", "weight_shared", "conv3d_bn", "deconv"]
)
def test_transient_chunks_equal_one_chunk(case: str, monkeypatch: pytest.MonkeyPatch):
    """Rules fed one column at a time give the results of all columns at once.

    See NOTE [Transient per-sample vectors in small chunks].
    """
    p = make_problem(next(m for m in MODELS if m.name == case), "ce", "mean")
    args = (p.model, p.loss_func, p.inputs, p.targets)
    exts = [engine.DiagGGNExact(), engine.BatchDiagGGNExact(), engine.DiagGGNMC(3)]
    full = engine.backprop(*args, exts, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(backprop_module, "TRANSIENT_BYTES", 1)
    chunked = engine.backprop(*args, exts, generator=torch.Generator().manual_seed(0))
    assert_same_results(full, chunked, exts)


class Tied(nn.Module):
    """Input embedding tied to the output projection: one Parameter, two modules."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 3)
        self.mix = nn.Linear(3, 3)
        self.out = nn.Linear(3, 6, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.mix(self.embed(tokens)))).mean(1)


def test_weight_tying_across_modules_sums_before_squaring():
    torch.manual_seed(0)
    model = Tied().double()
    x = torch.randint(0, 6, (5, 3))
    y = torch.randint(0, 6, (5,))
    res = _check_against_reference(model, nn.CrossEntropyLoss(), x, y)
    assert set(res["grad_batch"]) == {"embed.weight", "mix.weight", "mix.bias"}
    grad = torch.autograd.grad(nn.CrossEntropyLoss()(model(x), y), model.embed.weight)
    assert_close(model.embed.weight.grad, grad[0], ".grad of the tied weight")


def test_frozen_parameters_are_excluded():
    model = _mlp()
    model[0].bias.requires_grad_(False)
    y = torch.tensor([0, 1, 2, 1, 0, 2])
    res = _check_against_reference(model, nn.CrossEntropyLoss(), X, y)
    assert "0.bias" not in res["diag_ggn_exact"]
    assert model[0].bias.grad is None


class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(5, 3)
        self.unused = nn.Linear(5, 3)

    def forward(self, x):
        return self.used(x)


def test_unused_layer_gets_zeros():
    model = WithUnused().double()
    y = torch.tensor([0, 1, 2, 1, 0, 2])
    exts = [
        *GGN_EXTS,
        engine.SqrtGGNExact(),
        engine.BatchL2Grad(),
        engine.BatchDotGrad(),
    ]
    res = engine.backprop(model, nn.CrossEntropyLoss(), X, y, exts)
    assert res["grad_batch"]["unused.weight"].shape == (6, 3, 5)
    assert res["sqrt_ggn_exact"]["unused.bias"].shape == (3, 6, 3)
    assert res["batch_l2"]["unused.bias"].shape == (6,)
    assert res["batch_dot"]["unused.bias"].shape == (6, 6)
    for field in res.keys():
        assert not res[field]["unused.weight"].any()
    assert not model.unused.weight.grad.any()


def test_grad_accumulates_like_backward():
    model = _mlp()
    y = torch.tensor([0, 1, 2, 1, 0, 2])
    engine.backprop(model, nn.CrossEntropyLoss(), X, y, [engine.BatchGrad()])
    first = model[0].weight.grad.clone()
    engine.backprop(model, nn.CrossEntropyLoss(), X, y, [engine.BatchGrad()])
    assert_close(model[0].weight.grad, 2 * first, "accumulated .grad")


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 3), nn.Linear(2, 3)

    def forward(self, x, z):
        return self.a(x) + self.b(z)


def test_tuple_inputs_are_unpacked():
    model = TwoInputs().double()
    z = torch.randn(6, 2, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0, 2])
    _check_against_reference(model, nn.CrossEntropyLoss(), (X, z), y)


class Scale(nn.Module):
    """A user layer: element-wise scaling."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x):
        return x * self.weight


class ScaleRule(engine.LayerRule):
    def per_sample(self, module, inputs, grad_output):
        return {"weight": grad_output * inputs[0].unsqueeze(0)}


def test_user_registered_rule():
    model = nn.Sequential(nn.Linear(5, 3), Scale(3)).double()
    assert Scale not in engine.registered_layers()
    engine.register_rule(Scale, ScaleRule())
    assert Scale in engine.registered_layers()
    _check_against_reference(model, nn.MSELoss(), X, torch.randn(6, 3).double())


def test_result_repr_lists_savefields_names_and_shapes_not_values():
    model = _mlp()
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    res = engine.backprop(
        model, nn.CrossEntropyLoss(), X, y, [engine.BatchGrad(), engine.KFAC()]
    )
    text = repr(res)
    assert "output=[6, 3]" in text
    assert "'0.weight': [6, 4, 5]," in text  # grad_batch [N, *p]
    assert "'2.weight': [[3, 3], [4, 4]]," in text  # kfac factors [B, A]
    assert "tensor(" not in text
    assert f"loss={res.loss.item():.6g}" in text


def test_result_repr_without_loss_and_with_factored_jacobians():
    model = _mlp()
    res = engine.backprop(model, None, X, None, [engine.Jacobian(factored=True)])
    text = repr(res)
    assert text.startswith("BackpropResult(loss=None, output=[6, 3],")
    assert "'0.weight': LinearJacobian[3, 6, 4, 5]," in text
