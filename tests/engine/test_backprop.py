"""``backprop`` options: ``accumulate_grad`` and the ``.grad`` side effect."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bayescurv import engine
from bayescurv.engine import reference
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


def test_models_that_write_in_place_start_in_safe_mode_next_time():
    """An in-place op after a recorded layer costs a second forward pass once only.

    See NOTE [In-place ops after a recorded layer]; the Jacobians are the dense
    reference's on both calls, and a model that writes nothing in place runs once.
    """

    class Counted(nn.Module):
        def __init__(self, inplace: bool) -> None:
            super().__init__()
            self.first, self.head = nn.Linear(4, 5), nn.Linear(5, 2)
            self.inplace, self.calls = inplace, 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            h = self.first(x)
            h = torch.tanh_(h) if self.inplace else torch.tanh(h)
            return self.head(h)

    torch.manual_seed(0)
    x = torch.randn(6, 4, dtype=torch.float64)
    for inplace, passes in ((True, [2, 1, 1]), (False, [1, 1, 1])):
        model = Counted(inplace).double()
        expected = reference.jacobian(model, x)
        model.calls = 0
        for count in passes:
            res = engine.backprop(model, None, x, None, [engine.Jacobian()])
            assert model.calls == count, (inplace, passes)
            model.calls = 0
            flat = torch.cat(
                [v.flatten(2) for v in res["jacobian"].values()], dim=2
            ).movedim(0, 1)
            assert_close(flat, expected, f"inplace={inplace}")
