"""Kronecker extensions: every error path names the problem."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bayescurv import engine

X = torch.randn(6, 5, dtype=torch.float64)
Y = torch.randint(0, 3, (6,))


class Gate(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x):
        return x * self.weight


class GateRule(engine.LayerRule):
    def per_sample(self, module, inputs, grad_output):
        return {"weight": grad_output * inputs[0].unsqueeze(0)}


def test_rule_without_kronecker_methods_names_layer_and_rule():
    engine.register_rule(Gate, GateRule(), overwrite=True)
    model = nn.Sequential(nn.Linear(5, 3), Gate(3)).double()
    engine.backprop(model, nn.CrossEntropyLoss(), X, Y, [engine.DiagGGNExact()])
    with pytest.raises(
        NotImplementedError,
        match=r"GateRule \(the rule of Gate\) does not provide Kronecker factors",
    ):
        engine.backprop(model, nn.CrossEntropyLoss(), X, Y, [engine.KFLR()])


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 3)
        self.out = nn.Linear(3, 6, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.embed(tokens))).mean(1)


def test_weight_tied_across_layer_kinds_raises():
    tokens, y = torch.randint(0, 6, (5, 3)), torch.randint(0, 6, (5,))
    model = Tied().double()
    with pytest.raises(
        NotImplementedError, match=r"shared by layers \(Embedding, Linear\)"
    ):
        engine.backprop(model, nn.CrossEntropyLoss(), tokens, y, [engine.KFLR()])


@pytest.mark.parametrize("cls", [engine.KFAC, engine.KFLR])
def test_unknown_kfac_approx(cls):
    with pytest.raises(
        ValueError, match=rf"{cls.__name__}: kfac_approx must be one of 'expand', "
    ):
        cls(kfac_approx="both")


def test_kfac_approx_accepts_enum_and_string():
    assert engine.KFLR(kfac_approx="reduce").kfac_approx is engine.KFACApprox.REDUCE
    assert engine.KFAC(2, engine.KFACApprox.EXPAND).kfac_approx == "expand"


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_kfac_needs_positive_integer_samples(bad):
    with pytest.raises(ValueError, match="KFAC: mc_samples must be a positive integer"):
        engine.KFAC(mc_samples=bad)


def test_one_savefield_per_call():
    model = nn.Linear(5, 3).double()
    exts = [engine.KFLR(), engine.KFLR(kfac_approx="reduce")]
    with pytest.raises(ValueError, match=r"Extensions requested twice: \['kflr'\]"):
        engine.backprop(model, nn.CrossEntropyLoss(), X, Y, exts)
