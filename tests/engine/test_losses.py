"""Loss rules: the exact and the fewest factorizations of the loss Hessian.

NOTE [Fewest columns]: cross-entropy's Hessian has rank C - 1 per position, and the
GGN quantities that depend on the columns only through ``S S^T`` pull back that many.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from bayescurv import engine
from bayescurv.engine import reference
from bayescurv.engine.losses import loss_rule
from tests.cases import MODELS, make_problem
from tests.conftest import assert_close

backprop_module = importlib.import_module("bayescurv.engine.backprop")

N = 4


def _per_sample_hessians(
    loss_func: nn.Module, output: torch.Tensor, target
) -> torch.Tensor:
    """Dense ``[N, D, D]`` blocks of the loss Hessian w.r.t. the output (torch.func)."""
    flat = output.reshape(-1)
    hess = torch.func.hessian(lambda f: loss_func(f.reshape(output.shape), target))(
        flat
    )
    d = output[0].numel()
    blocks = hess.reshape(N, d, N, d)
    # the loss is a sum over samples: nothing couples two samples
    off = blocks.clone()
    for n in range(N):
        off[n, :, n] = 0
    assert off.abs().max() < 1e-14
    return torch.stack([blocks[n, :, n] for n in range(N)])


def _gram(columns: torch.Tensor) -> torch.Tensor:
    """``sum_k s_kn s_kn^T`` per sample of columns ``[K, N, *out]``."""
    flat = columns.reshape(columns.shape[0], N, -1)
    return torch.einsum("kni,knj->nij", flat, flat)


def _ce_cases():
    gen = torch.Generator().manual_seed(3)
    cases = []
    for classes, positions in [(2, ()), (3, ()), (5, ()), (4, (3,)), (3, (2, 3))]:
        shape = (N, classes, *positions)
        index = torch.randint(0, classes, (N, *positions), generator=gen)
        probs = torch.rand(shape, dtype=torch.float64, generator=gen).softmax(1)
        weight = torch.rand(classes, dtype=torch.float64, generator=gen) + 0.5
        for reduction in ("mean", "sum"):
            cases.append((shape, nn.CrossEntropyLoss(reduction=reduction), index))
        cases.append(
            (
                shape,
                nn.CrossEntropyLoss(weight=weight, ignore_index=1, label_smoothing=0.1),
                index,
            )
        )
        cases.append((shape, nn.CrossEntropyLoss(label_smoothing=0.2), probs))
    return cases


CE_CASES = _ce_cases()


@pytest.mark.parametrize(
    ("shape", "loss_func", "target"),
    CE_CASES,
    ids=[f"{c[0]}-{i}" for i, c in enumerate(CE_CASES)],
)
def test_cross_entropy_fewest_columns_factor_the_hessian(shape, loss_func, target):
    """C - 1 columns per position whose Gram is the Hessian, chunked or not."""
    output = torch.randn(
        shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    rule = loss_rule(loss_func)
    total = rule.num_gram_columns(output)
    classes, positions = shape[1], output[0, 0].numel()
    assert total == (classes - 1) * positions < rule.num_columns(output)
    cols = rule.gram_columns(loss_func, output, target, 0, total)
    assert cols.shape == (total, *shape)
    expected = _per_sample_hessians(loss_func, output, target)
    assert_close(_gram(cols), expected, "fewest columns")
    exact = rule.exact_columns(loss_func, output, target, 0, rule.num_columns(output))
    assert_close(_gram(exact), expected, "exact columns")
    chunks = [
        rule.gram_columns(loss_func, output, target, start, min(start + 2, total))
        for start in range(0, total, 2)
    ]
    assert torch.equal(torch.cat(chunks), cols)


def test_binary_softmax_has_one_column():
    """C = 2: the single column sqrt(a p_1 p_2) (e_1 - e_2)."""
    output = torch.randn(N, 2, dtype=torch.float64)
    loss_func = nn.CrossEntropyLoss(reduction="sum")
    cols = loss_rule(loss_func).gram_columns(
        loss_func, output, torch.zeros(N).long(), 0, 1
    )
    p = output.softmax(1)
    root = (p[:, 0] * p[:, 1]).sqrt()
    assert_close(cols[0], torch.stack([root, -root], 1), "binary column")


def test_extreme_probabilities_stay_finite():
    """Saturated softmax outputs (p of a class ~1 or ~0) give finite, exact columns."""
    output = torch.tensor(
        [[40.0, 0.0, -40.0], [-40.0, 0.0, 40.0], [0.0, 60.0, 0.0], [0.0, 0.0, 0.0]],
        dtype=torch.float64,
    )
    loss_func = nn.CrossEntropyLoss(reduction="sum")
    target = torch.zeros(N).long()
    rule = loss_rule(loss_func)
    cols = rule.gram_columns(loss_func, output, target, 0, 2)
    assert torch.isfinite(cols).all()
    assert_close(
        _gram(cols), _per_sample_hessians(loss_func, output, target), "saturated"
    )


def test_one_class_and_other_losses_keep_their_exact_columns():
    """As many columns as before where the Hessian has full rank or is zero (C = 1)."""
    gen = torch.Generator().manual_seed(1)
    output = torch.randn(N, 3, dtype=torch.float64, generator=gen)
    target = torch.rand(N, 3, dtype=torch.float64, generator=gen)
    one_class = torch.randn(N, 1, dtype=torch.float64, generator=gen)
    for loss_func, out, y in [
        (nn.MSELoss(), output, target),
        (nn.BCEWithLogitsLoss(), output, target.round()),
        (nn.CrossEntropyLoss(), one_class, torch.zeros(N).long()),
    ]:
        rule = loss_rule(loss_func)
        total = rule.num_columns(out)
        assert rule.num_gram_columns(out) == total
        assert torch.equal(
            rule.gram_columns(loss_func, out, y, 0, total),
            rule.exact_columns(loss_func, out, y, 0, total),
        )


def _pulled_columns(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Spy on the engine's pull-backs: the list gets each chunk's column count."""
    counts: list[int] = []
    original = backprop_module.pull_back

    def spy(*args, **kwargs):
        counts.append(args[3].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(backprop_module, "pull_back", spy)
    return counts


def test_engine_pulls_back_the_fewest_columns_for_gram_quantities(monkeypatch):
    """DiagGGNExact + KFLR: C - 1 columns; with SqrtGGNExact: C, shared, same values."""
    p = make_problem(next(m for m in MODELS if m.name == "mlp"), "ce", "mean")
    args = (p.model, p.loss_func, p.inputs, p.targets)
    classes = p.model(p.inputs).shape[1]
    gram_exts = [engine.DiagGGNExact(), engine.BatchDiagGGNExact(), engine.KFLR()]
    counts = _pulled_columns(monkeypatch)
    fewest = engine.backprop(*args, gram_exts)
    assert sum(counts) == classes - 1
    counts.clear()
    shared = engine.backprop(*args, [*gram_exts, engine.SqrtGGNExact()])
    assert sum(counts) == classes  # one sweep serves all four
    for name, root in shared["sqrt_ggn_exact"].items():
        assert root.shape[0] == classes
        assert_close(
            fewest["diag_ggn_exact"][name], root.square().sum((0, 1)), f"diag {name}"
        )
    for ext in gram_exts:
        for name, value in fewest[ext.savefield].items():
            other = shared[ext.savefield][name]
            if isinstance(value, list):
                for a, b in zip(value, other, strict=True):
                    assert_close(a, b, f"{ext.savefield} {name}")
            else:
                assert_close(value, other, f"{ext.savefield} {name}")


def test_ggn_matrix_from_the_fewest_columns(monkeypatch):
    """``ggn_matrix`` pulls back C - 1 columns and matches torch.func's GGN."""
    p = make_problem(next(m for m in MODELS if m.name == "mlp"), "ce", "sum")
    dense_module = importlib.import_module("bayescurv.engine.dense")
    counts: list[int] = []
    original = dense_module.batched_grad
    monkeypatch.setattr(
        dense_module,
        "batched_grad",
        lambda outs, ins, cols: (
            counts.append(cols[0].shape[0]) or original(outs, ins, cols)
        ),
    )
    ggn = engine.ggn_matrix(p.model, p.loss_func, p.inputs, p.targets)
    classes = p.model(p.inputs).shape[1]
    assert counts == [classes - 1]
    expected = reference.per_sample_ggn(p.model, p.loss_func, p.inputs, p.targets).sum(
        0
    )
    assert_close(ggn, expected, "ggn_matrix")


def test_fewest_columns_are_differentiable_under_create_graph():
    """The gradient of sum(diag_ggn_exact) w.r.t. the weights, against torch.func.

    ``sum diag(G) = sum_n tr(H_n J_n J_n^T)``, differentiated through ``p`` in the
    loss Hessian ``H_n`` and through the Jacobians ``J_n``.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(N, 3, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 2])
    loss_func = nn.CrossEntropyLoss(label_smoothing=0.1)
    res = engine.backprop(
        model,
        loss_func,
        x,
        y,
        [engine.DiagGGNExact()],
        create_graph=True,
        accumulate_grad=False,
    )
    total = sum(d.sum() for d in res["diag_ggn_exact"].values())
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(total, list(params.values()))

    def reference_total(weights):
        def out(w, xn):
            return torch.func.functional_call(model, w, (xn.unsqueeze(0),))[0]

        jac = torch.func.vmap(torch.func.jacrev(out), in_dims=(None, 0))(weights, x)
        flat = torch.cat([j.reshape(N, 3, -1) for j in jac.values()], dim=2)
        logits = torch.func.functional_call(model, weights, (x,))
        hess = _per_sample_hessians(loss_func, logits, y)
        return torch.einsum("ncd,nce,ned->", flat, hess, flat)

    detached = {n: p.detach() for n, p in params.items()}
    expected = torch.func.grad(reference_total)(detached)
    for (name, _), g in zip(params.items(), grads, strict=True):
        assert_close(g, expected[name], f"d sum(diag GGN) / d {name}")


def test_sqrt_ggn_exact_with_the_fewest_columns(monkeypatch):
    """``SqrtGGNExact(fewest=True)``: C - 1 columns per sample, the same GGN blocks."""
    p = make_problem(next(m for m in MODELS if m.name == "mlp"), "ce", "mean")
    args = (p.model, p.loss_func, p.inputs, p.targets)
    classes = p.model(p.inputs).shape[1]
    counts = _pulled_columns(monkeypatch)
    fewest = engine.backprop(*args, [engine.SqrtGGNExact(fewest=True)])
    assert sum(counts) == classes - 1
    canonical = engine.backprop(*args, [engine.SqrtGGNExact()])
    for name, root in fewest["sqrt_ggn_exact"].items():
        full = canonical["sqrt_ggn_exact"][name]
        assert root.shape == (classes - 1, *full.shape[1:])
        grams = [
            torch.einsum("kni,knj->nij", r.flatten(2), r.flatten(2))
            for r in (root, full)
        ]
        assert_close(grams[0], grams[1], f"per-sample GGN blocks {name}")
    # the memory estimate counts the columns pulled back
    for ext, count in [
        (engine.SqrtGGNExact(fewest=True), classes - 1),
        (engine.SqrtGGNExact(), classes),
    ]:
        with pytest.raises(engine.MemoryBudgetError, match=f"C={count},"):
            engine.backprop(*args, [ext], max_memory=1)
    assert engine.SqrtGGNExact().gram_only is False
    assert engine.SqrtGGNExact(fewest=True).gram_only is True
