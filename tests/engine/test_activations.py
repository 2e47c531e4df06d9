"""The activation derivative table against torch.func; KFRA and DiagHessian on it."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from bayescurv import engine
from bayescurv.engine import reference
from bayescurv.engine.activations import ACTIVATIONS
from bayescurv.engine.hessian.chain import as_chain
from bayescurv.engine.recording import find_layers, record_calls
from tests.conftest import assert_close

ACTS = {
    "relu": nn.ReLU(),
    "leaky_relu": nn.LeakyReLU(0.2),
    "relu6": nn.ReLU6(),
    "hardtanh": nn.Hardtanh(-0.5, 1.5),
    "hardsigmoid": nn.Hardsigmoid(),
    "hardshrink": nn.Hardshrink(0.3),
    "softshrink": nn.Softshrink(0.4),
    "threshold": nn.Threshold(0.1, -2.0),
    "hardswish": nn.Hardswish(),
    "tanh": nn.Tanh(),
    "sigmoid": nn.Sigmoid(),
    "elu": nn.ELU(0.5),
    "celu": nn.CELU(0.7),
    "selu": nn.SELU(),
    "gelu": nn.GELU(),
    "gelu_tanh": nn.GELU(approximate="tanh"),
    "silu": nn.SiLU(),
    "mish": nn.Mish(),
    "softplus": nn.Softplus(beta=2.0, threshold=1.0),
    "softsign": nn.Softsign(),
    "logsigmoid": nn.LogSigmoid(),
    "tanhshrink": nn.Tanhshrink(),
}
# grid offset so that no point is closer than 2e-3 to a kink (all at multiples of 0.1)
POINTS = torch.linspace(-7.0, 7.0, 101, dtype=torch.float64) + 0.0123
# NOTE [Activation tolerance]
# PyTorch evaluates the backward of CELU (1 / alpha) and Hardsigmoid (1 / 6) with
# float32 constants even in float64 (relative errors ~1.5e-7); the table is exact.
ACTIVATION_RTOL = 1e-6


def test_every_table_entry_is_tested():
    assert {type(m) for m in ACTS.values()} == set(ACTIVATIONS)


def _second_derivative(module: nn.Module, x: Tensor) -> Tensor:
    """torch.func's second derivative, or a central difference of its first one.

    PyTorch has no double backward for a few piecewise-linear activations
    (Hardsigmoid); their first derivative is piecewise constant, so the central
    difference is exact away from kinks.
    """
    first = grad(module)
    try:
        return vmap(grad(first))(x)
    except RuntimeError:
        step = 1e-6
        return (vmap(first)(x + step) - vmap(first)(x - step)) / (2 * step)


@pytest.mark.parametrize("name", list(ACTS))
def test_table_entry_against_torch_func(name: str):
    module = ACTS[name]
    entry = ACTIVATIONS[type(module)]
    close = {"rtol": ACTIVATION_RTOL, "atol": 1e-12}
    torch.testing.assert_close(entry.value(module, POINTS), module(POINTS), **close)
    torch.testing.assert_close(
        entry.df(module, POINTS), vmap(grad(module))(POINTS), **close
    )
    second = _second_derivative(module, POINTS)
    if entry.hessian_is_zero:
        assert not second.any(), f"{name} has a second derivative"
    else:
        torch.testing.assert_close(entry.d2f(module, POINTS), second, **close)
        assert second.any()


class TwiceDifferentiableHardsigmoid(nn.Module):
    """``relu6(x + 3) / 6``: Hardsigmoid as references can differentiate it twice."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.relu6(x + 3) / 6


def _reference_model(model: nn.Sequential) -> nn.Sequential:
    """The same function, with activations PyTorch differentiates only once replaced."""
    if type(model[1]) is not nn.Hardsigmoid:
        return model
    return nn.Sequential(model[0], TwiceDifferentiableHardsigmoid(), model[2])


def _chain(act: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), act, nn.Linear(5, 2)).double()


@pytest.mark.parametrize("name", list(ACTS))
def test_diag_hessian_on_a_chain(name: str):
    model = _chain(ACTS[name])
    gen = torch.Generator().manual_seed(1)
    x = 3 * torch.randn(4, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    loss = nn.MSELoss(reduction="sum")
    with record_calls(find_layers(model), safe=True) as records:
        model(x)
    assert as_chain(model, records) is not None  # the walker, not the graph path
    res = engine.backprop(
        model, loss, x, y, [engine.DiagHessian(), engine.BatchDiagHessian()]
    )
    args = (_reference_model(model), loss, x, y)
    diag = reference.split_vector(model, torch.diagonal(reference.param_hessian(*args)))
    per_sample = reference.per_sample_hessian_diagonals(*args)
    for param, expected in diag.items():
        assert_close(res["diag_h"][param], expected, f"diag_h {param}")
        assert_close(res["diag_h_batch"][param], per_sample[param], f"batch {param}")


@pytest.mark.parametrize("name", list(ACTS))
def test_kfra_on_a_chain_is_the_exact_block_for_one_datum(name: str):
    model = _chain(ACTS[name])
    gen = torch.Generator().manual_seed(2)
    x = 3 * torch.randn(1, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (1,), generator=gen)
    loss = nn.CrossEntropyLoss()
    res = engine.backprop(model, loss, x, y, [engine.KFRA()])
    ggn = reference.ggn(model, loss, x, y)
    start = 0
    for param, p in model.named_parameters():
        block = ggn[start : start + p.numel(), start : start + p.numel()]
        assert_close(engine.kron_dense(res["kfra"][param]), block, f"kfra {param}")
        start += p.numel()
