"""Comparison of every exact extension of one problem against the dense references."""

from __future__ import annotations

import torch
from torch import nn

from bayescurv import engine
from bayescurv.engine import reference
from tests.conftest import assert_close

EXACT = [
    engine.BatchGrad(),
    engine.BatchL2Grad(),
    engine.SumGradSquared(),
    engine.Variance(),
    engine.BatchDotGrad(),
    engine.DiagGGNExact(),
    engine.BatchDiagGGNExact(),
    engine.SqrtGGNExact(),
]


def check_exact_extensions(
    model: nn.Module, loss_func: nn.Module, inputs, targets: torch.Tensor
) -> engine.BackpropResult:
    """Run all exact extensions once and compare each with its dense reference."""
    model.zero_grad()
    res = engine.backprop(model, loss_func, inputs, targets, EXACT)
    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    loss = loss_func(model(*args), targets)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(
        loss, [params[n] for n in names], allow_unused=True, materialize_grads=True
    )
    individual = reference.per_sample_gradients(model, loss_func, inputs, targets)
    blocks = reference.per_sample_ggn(model, loss_func, inputs, targets)
    diag = reference.split_vector(model, torch.diagonal(blocks, dim1=1, dim2=2))
    for name, grad in zip(names, grads, strict=True):
        param = dict(model.named_parameters())[name]
        g = individual[name]
        flat = g.flatten(1)
        assert_close(param.grad, grad, f".grad {name}")
        assert_close(res["grad_batch"][name], g, f"grad_batch {name}")
        assert_close(res["batch_l2"][name], flat.square().sum(1), f"batch_l2 {name}")
        assert_close(res["sum_grad_squared"][name], g.square().sum(0), f"sgs {name}")
        var = g.square().mean(0) - g.mean(0).square()
        assert_close(res["variance"][name], var, f"variance {name}")
        assert_close(res["batch_dot"][name], flat @ flat.T, f"batch_dot {name}")
        assert_close(res["diag_ggn_exact_batch"][name], diag[name], f"batch {name}")
        assert_close(res["diag_ggn_exact"][name], diag[name].sum(0), f"diag {name}")
    sqrt = res["sqrt_ggn_exact"]
    cols = next(iter(sqrt.values())).shape[0]
    flat = torch.cat([sqrt[n].reshape(cols, sqrt[n].shape[1], -1) for n in names], -1)
    gram = torch.einsum("cnp,cnq->npq", flat, flat)
    assert_close(gram, blocks, "per-sample Gram of sqrt_ggn_exact")
    return res


def assert_same_results(
    expected: engine.BackpropResult,
    got: engine.BackpropResult,
    extensions: list[engine.Extension],
) -> None:
    """Every extension's result per parameter (tensors or factor lists) matches."""
    for ext in extensions:
        for name, value in expected[ext.savefield].items():
            values = value if isinstance(value, list) else [value]
            others = got[ext.savefield][name]
            others = others if isinstance(others, list) else [others]
            for v, o in zip(values, others, strict=True):
                assert_close(o, v, f"{ext.savefield} {name}")
