"""Batched and per-column pull-backs (``bayescurv/engine/pullback.py``).

A model whose batched pull-back makes vmap loop (``MaxPool2d``) is pulled back one
column at a time from its second chunk on; every result must be the same as with
batched columns and match the dense references.
"""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch
from torch import nn

from bayescurv import engine
from bayescurv.engine import pullback, reference
from bayescurv.engine.autodiff import vjp_columns
from tests.cases import MODELS, make_problem
from tests.conftest import assert_close
from tests.engine.checks import assert_same_results

MAX_POOL = next(m for m in MODELS if m.name == "cnn")  # has an nn.MaxPool2d
CHAIN = next(m for m in MODELS if m.name == "mlp")
backprop_module = importlib.import_module("bayescurv.engine.backprop")


@pytest.fixture(autouse=True)
def _small_columns_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test models' columns are tiny: let them take the per-column path too."""
    monkeypatch.setattr(pullback, "PER_COLUMN_BYTES", 0)


def _first_layer(model: nn.Module) -> nn.Module:
    """The key of a model's per-column verdict: its first parameterized layer."""
    return next(
        m for m in model.modules() if next(m.parameters(False), None) is not None
    )


def _pool_graph(
    with_pool: bool,
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """An output, the tensors to pull back to and 3 columns (float64)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    h = torch.relu(x)
    pooled = nn.functional.max_pool2d(h, 3, 2, padding=1) if with_pool else h
    out = pooled.square()
    cols = torch.randn(3, *out.shape, dtype=torch.float64, generator=gen)
    return out, [x, h], cols


@pytest.mark.parametrize("with_pool", [True, False], ids=["max_pool", "chain"])
def test_fallbacks_are_reported_not_shown(with_pool: bool):
    out, recorded, cols = _pool_graph(with_pool)
    found: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vjp_columns(out, recorded, cols, False, fallbacks=found)
        # the switch is restored: a batched call outside reports nothing
        torch.autograd.grad(
            out, recorded, cols, is_grads_batched=True, retain_graph=True
        )
    assert [str(w.message) for w in caught] == []
    assert bool(found) == with_pool
    if with_pool:
        assert "max_pool2d_with_indices_backward" in found[0]


@pytest.mark.parametrize("create_graph", [False, True])
def test_per_column_matches_batched(create_graph: bool):
    out, recorded, cols = _pool_graph(True)
    looped = vjp_columns(out, recorded, cols, create_graph, per_column=True)
    batched = vjp_columns(out, recorded, cols, create_graph)
    for i, (a, b) in enumerate(zip(looped, batched, strict=True)):
        assert a.shape == (3, *recorded[i].shape)
        assert_close(a, b, f"pulled back to tensor {i}")
    if create_graph:  # second derivatives through the stacked columns
        (d_loop,) = torch.autograd.grad(
            looped[1].square().sum(), recorded[0], retain_graph=True
        )
        (d_batch,) = torch.autograd.grad(batched[1].square().sum(), recorded[0])
        assert_close(d_loop, d_batch, "derivative of the pulled-back columns")


def test_verdict_per_model():
    """The first call probes; models with a max-pool are then pulled back per column."""
    for case, expected in [(MAX_POOL, True), (CHAIN, False)]:
        p = make_problem(case, "ce", "mean")
        assert pullback.per_column(_first_layer(p.model)) is None
        engine.backprop(p.model, p.loss_func, p.inputs, p.targets, [engine.KFLR()])
        assert pullback.per_column(_first_layer(p.model)) is expected


class _Adapter(nn.Module):
    """A fresh wrapper per call, as the Laplace layer's engine adapter is."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def test_verdict_outlives_a_fresh_wrapper_per_call(monkeypatch):
    """The verdict is kept by the first recorded layer: one probe for many wrappers."""
    p = make_problem(MAX_POOL, "ce", "mean")
    probes = []
    original = pullback.probe
    backprop_module = importlib.import_module("bayescurv.engine.backprop")
    monkeypatch.setattr(
        backprop_module, "probe", lambda *a: probes.append(1) or original(*a)
    )
    for _ in range(3):
        engine.backprop(
            _Adapter(p.model), p.loss_func, p.inputs, p.targets, [engine.KFLR()]
        )
    assert len(probes) == 1
    assert pullback.per_column(_first_layer(p.model)) is True


def test_no_probe_for_one_column_per_chunk():
    """Chunks of one column are never batched, so nothing is probed."""
    p = make_problem(MAX_POOL, "ce", "mean")
    args = (p.model, p.loss_func, p.inputs, p.targets, [engine.DiagGGNExact()])
    engine.backprop(*args, chunk_size=1)
    assert pullback.per_column(_first_layer(p.model)) is None
    engine.backprop(*args, memory_budget=1)
    assert pullback.per_column(_first_layer(p.model)) is None
    engine.backprop(*args)
    assert pullback.per_column(_first_layer(p.model)) is True


@pytest.fixture(scope="module")
def pooled() -> tuple:
    """The max-pool case with its verdict known (per column) and a fresh copy."""
    p = make_problem(MAX_POOL, "ce", "sum")
    fresh = copy.deepcopy(p.model)
    engine.backprop(p.model, p.loss_func, p.inputs, p.targets, [engine.KFLR()])
    assert pullback.per_column(_first_layer(p.model))
    return p, fresh


@pytest.mark.parametrize("transient", [None, 1], ids=["whole", "one_column"])
def test_per_column_results_match_references(
    pooled: tuple, transient: int | None, monkeypatch: pytest.MonkeyPatch
):
    """Columns stacked into chunks, or one per chunk where the results add up.

    See NOTE [Chunks of a per-column pull-back].
    """
    p, _ = pooled
    if transient is not None:
        monkeypatch.setattr(backprop_module, "TRANSIENT_BYTES", transient)
    requested = [
        engine.DiagGGNExact(),
        engine.BatchDiagGGNExact(),
        engine.SqrtGGNExact(),
        engine.DiagHessian(),  # a ReLU net: the exact columns too
    ]
    res = engine.backprop(p.model, p.loss_func, p.inputs, p.targets, requested)
    blocks = reference.per_sample_ggn(p.model, p.loss_func, p.inputs, p.targets)
    expected = reference.split_vector(p.model, torch.diagonal(blocks, dim1=1, dim2=2))
    for name, value in expected.items():
        assert_close(res["diag_ggn_exact_batch"][name], value, name)
        assert_close(res["diag_ggn_exact"][name], value.sum(0), name)
        assert_close(res["diag_h"][name], value.sum(0), name)
    sqrt = res["sqrt_ggn_exact"]
    flat = torch.cat([s.flatten(2) for s in sqrt.values()], -1)
    gram = torch.einsum("cnp,cnq->npq", flat, flat)
    assert_close(gram, blocks, "per-sample Gram of sqrt_ggn_exact")


@pytest.mark.parametrize("transient", [None, 1], ids=["whole", "one_column"])
def test_per_column_kronecker_factors_match_batched(
    pooled: tuple, transient: int | None, monkeypatch: pytest.MonkeyPatch
):
    p, fresh = pooled
    if transient is not None:
        monkeypatch.setattr(backprop_module, "TRANSIENT_BYTES", transient)
    res = engine.backprop(p.model, p.loss_func, p.inputs, p.targets, [engine.KFLR()])
    # a model not seen before, all columns in one chunk: one batched pull-back
    batched = engine.backprop(
        fresh, p.loss_func, p.inputs, p.targets, [engine.KFLR()], chunk_size=3
    )
    assert_same_results(batched, res, [engine.KFLR()])


def test_per_column_create_graph(pooled: tuple):
    p, fresh = pooled
    inputs = p.inputs.clone().requires_grad_(True)
    derivatives = []
    for model in (p.model, fresh):  # per column; torch.func.vmap (not seen before)
        res = engine.backprop(
            model,
            p.loss_func,
            inputs,
            p.targets,
            [engine.DiagGGNExact(), engine.BatchDiagGGNExact()],
            create_graph=True,
            accumulate_grad=False,
        )
        total = sum(v.sum() for v in res["diag_ggn_exact"].values())
        total = total + sum(
            v.square().sum() for v in res["diag_ggn_exact_batch"].values()
        )
        derivatives.append(torch.autograd.grad(total, inputs)[0])
    assert_close(derivatives[0], derivatives[1], "d(diag GGN)/d(inputs)")


@pytest.mark.parametrize(
    ("case", "params"),
    [("conv3d_bn", ["1.weight", "1.bias"]), ("deconv", ["up.weight", "up1d.weight"])],
)
def test_materialized_sums_one_column_at_a_time(
    case: str, params: list[str], monkeypatch: pytest.MonkeyPatch
):
    """Layers that all materialize get their sums one column per chunk.

    See NOTE [Chunks of a per-column pull-back]; the selected layers (BatchNorm3d,
    transposed convolutions) have no closed form for squares.
    """
    p = make_problem(next(m for m in MODELS if m.name == case), "ce", "sum")
    args = (p.model, p.loss_func, p.inputs, p.targets, [engine.DiagGGNExact()])
    whole = engine.backprop(*args, params=params)
    # the verdict is per recorded graph; the chunking under it is what is tested
    monkeypatch.setattr(backprop_module, "per_column", lambda key: True)
    columns = []
    original = backprop_module.pull_back

    def spy(*spied, **kwargs):
        columns.append(spied[3].shape[0])
        return original(*spied, **kwargs)

    monkeypatch.setattr(backprop_module, "pull_back", spy)
    monkeypatch.setattr(backprop_module, "TRANSIENT_BYTES", 1)
    single = engine.backprop(*args, params=params)
    assert columns == [1] * 2  # C - 1 = 2 columns (NOTE [Fewest columns])
    assert_same_results(whole, single, [engine.DiagGGNExact()])


def test_small_columns_stay_batched(monkeypatch: pytest.MonkeyPatch):
    """Columns below PER_COLUMN_BYTES are batched even where vmap loops."""
    p = make_problem(MAX_POOL, "ce", "sum")
    args = (
        p.model,
        p.loss_func,
        p.inputs,
        p.targets,
        [engine.DiagGGNMC(mc_samples=50)],
    )
    engine.backprop(*args)
    assert pullback.per_column(_first_layer(p.model)) is True
    flags = []
    original = pullback.vjp_columns

    def spy(*spied, per_column=False, **kwargs):
        flags.append(per_column)
        return original(*spied, per_column=per_column, **kwargs)

    monkeypatch.setattr(pullback, "vjp_columns", spy)
    monkeypatch.setattr(pullback, "PER_COLUMN_BYTES", 2**20)
    engine.backprop(*args)
    assert flags
    assert not any(flags)
    monkeypatch.setattr(pullback, "PER_COLUMN_BYTES", 0)
    engine.backprop(*args)
    assert any(flags)
