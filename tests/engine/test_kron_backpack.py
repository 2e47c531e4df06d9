"""Kronecker factors beside BackPACK's (skipped when BackPACK is not installed).

Linear layers and biases coincide with BackPACK 1.7's KFLR/KFRA. For convolutions
BackPACK's factors are ``[B_reduce, L * A_expand]`` (``L`` output locations; its own
docstring calls this a deviation from KFC), which the last test documents.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bayescurv import engine
from tests.conftest import assert_close

backpack = pytest.importorskip("backpack")
bp_extensions = pytest.importorskip("backpack.extensions")

# BackPACK's module hooks warn when the network input does not require grad
pytestmark = pytest.mark.filterwarnings(
    "ignore:Full backward hook is firing:UserWarning"
)


def _backpack_factors(model, loss_func, x, y, ext_name: str) -> dict[str, list]:
    model = backpack.extend(copy.deepcopy(model))
    loss_func = backpack.extend(copy.deepcopy(loss_func))
    loss = loss_func(model(x), y)
    with backpack.backpack(getattr(bp_extensions, ext_name)()):
        loss.backward()
    savefield = ext_name.lower()
    return {name: getattr(p, savefield) for name, p in model.named_parameters()}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Sigmoid(),
        nn.Linear(4, 3),
    ).double()  # fmt: skip


@pytest.mark.parametrize(
    ("ext", "loss_func"),
    [
        (engine.KFLR(), nn.CrossEntropyLoss()),
        (engine.KFLR(), nn.MSELoss(reduction="sum")),
        # BackPACK 1.7's KFRA builds the MSE Hessian in float32: CE only
        (engine.KFRA(), nn.CrossEntropyLoss()),
    ],
    ids=["kflr-ce-mean", "kflr-mse-sum", "kfra-ce-mean"],
)
def test_linear_chains_coincide_with_backpack(ext, loss_func):
    model = _mlp()
    x = torch.randn(8, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
    y = (
        torch.randint(0, 3, (8,))
        if loss_func.reduction == "mean"
        else torch.randn_like(out)
    )
    ours = engine.backprop(model, loss_func, x, y, [ext])[ext.savefield]
    theirs = _backpack_factors(model, loss_func, x, y, type(ext).__name__)
    for name, factors in ours.items():
        for i, (f, g) in enumerate(zip(factors, theirs[name], strict=True)):
            assert_close(f, g, f"{ext.savefield} factor {i} of {name}")


def test_backpack_conv_factors_mix_reduce_and_expand():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 3)
    ).double()
    x, y = torch.randn(5, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    loss_func = nn.CrossEntropyLoss()
    exts = [engine.KFLR(), engine.KFLR(kfac_approx="reduce")]
    expand, reduce = (
        engine.backprop(model, loss_func, x, y, [ext])["kflr"] for ext in exts
    )
    theirs = _backpack_factors(model, loss_func, x, y, "KFLR")
    locations = 16
    assert_close(theirs["0.weight"][0], reduce["0.weight"][0], "B")
    assert_close(theirs["0.weight"][1], locations * expand["0.weight"][1], "A")
    assert_close(theirs["0.bias"][0], expand["0.bias"][0], "bias")
