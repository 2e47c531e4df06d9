"""``backprop`` options: ``accumulate_grad`` and the ``.grad`` side effect."""

from __future__ import annotations

import pytest
import torch

from bayescurv import engine
from tests.cases import MODELS, make_problem
from tests.conftest import assert_close

REQUESTS = {
    "first_order": [engine.BatchGrad(), engine.Variance()],
    "diag_ggn_alone": [engine.DiagGGNExact()],
    "mc_and_kron": [engine.DiagGGNMC(), engine.KFLR()],
    "kfra": [engine.KFRA()],
    "hessian": [engine.DiagHessian()],
    "jacobian": [engine.Jacobian()],
}


@pytest.mark.parametrize("request_name", list(REQUESTS))
@pytest.mark.parametrize("preset", ["none", "values"])
def test_accumulate_grad_false_leaves_grad_untouched(request_name: str, preset: str):
    p = make_problem(MODELS[0], "ce", "mean")
    params = list(p.model.parameters())
    gen = torch.Generator().manual_seed(0)
    before = [
        None if preset == "none" else torch.randn(q.shape, generator=gen, dtype=q.dtype)
        for q in params
    ]
    for q, g in zip(params, before, strict=True):
        q.grad = None if g is None else g.clone()
    res = engine.backprop(
        p.model,
        p.loss_func,
        p.inputs,
        p.targets,
        REQUESTS[request_name],
        accumulate_grad=False,
    )
    assert res.loss is not None
    for q, g in zip(params, before, strict=True):
        if g is None:
            assert q.grad is None
        else:
            assert torch.equal(q.grad, g)


@pytest.mark.parametrize("request_name", list(REQUESTS))
def test_accumulate_grad_true_adds_the_gradient(request_name: str):
    p = make_problem(MODELS[0], "ce", "mean")
    loss = p.loss_func(p.model(p.inputs), p.targets)
    grads = torch.autograd.grad(loss, list(p.model.parameters()))
    for q in p.model.parameters():
        q.grad = torch.ones_like(q)
    engine.backprop(p.model, p.loss_func, p.inputs, p.targets, REQUESTS[request_name])
    for (name, q), g in zip(p.model.named_parameters(), grads, strict=True):
        assert_close(q.grad, 1 + g, f".grad of {name}")


def test_same_results_with_and_without_grad():
    p = make_problem(MODELS[1], "bce", "sum")
    exts = [engine.DiagGGNExact(), engine.SqrtGGNExact()]
    args = (p.model, p.loss_func, p.inputs, p.targets, exts)
    with_grad = engine.backprop(*args)
    without = engine.backprop(*args, accumulate_grad=False)
    for ext in exts:
        for name, value in with_grad[ext.savefield].items():
            assert_close(without[ext.savefield][name], value, name)


@pytest.mark.parametrize("accumulate", [True, False])
def test_no_gradient_pass_without_grad_and_first_order(accumulate: bool):
    """Autograd reaches the parameters only for ``.grad``: the pass is skipped."""
    p = make_problem(MODELS[0], "ce", "mean")
    reached = []
    handles = [
        q.register_hook(lambda g, name=name: reached.append(name))
        for name, q in p.model.named_parameters()
    ]
    try:
        engine.backprop(
            p.model,
            p.loss_func,
            p.inputs,
            p.targets,
            [engine.DiagGGNExact()],
            accumulate_grad=accumulate,
        )
    finally:
        for handle in handles:
            handle.remove()
    expected = [name for name, _ in p.model.named_parameters()] if accumulate else []
    assert sorted(reached) == sorted(expected)
