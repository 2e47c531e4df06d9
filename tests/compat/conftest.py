"""Running BackPACK-style code on the compat layer, on copies of the case problems."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import pytest
import torch
from torch import Tensor, nn

from bayescurv.compat.backpack import backpack, extend
from bayescurv.compat.backpack.extensions import BackpropExtension
from tests.cases import MODELS, ModelCase, Problem, make_problem

MODEL_CASES = {m.name: m for m in MODELS}

# Models BackPACK supports and models it rejects (residual connections, attention,
# LayerNorm, weight sharing, recurrent layers), with one loss setting each.
COMPAT_CASES = [
    ("mlp", "ce", "mean"),
    ("mlp", "mse", "sum"),
    ("cnn", "bce", "mean"),
    ("residual_mlp", "mse", "mean"),
    ("residual_cnn", "ce", "sum"),
    ("weight_shared", "bce", "sum"),
    ("conv1d_norm", "ce", "mean"),
    ("attention", "ce", "mean"),
    ("tokens", "ce", "sum"),
]
COMPAT_IDS = ["-".join(case) for case in COMPAT_CASES]


def case(name: str) -> ModelCase:
    """A model case of ``tests/cases.py`` by name."""
    return MODEL_CASES[name]


@pytest.fixture(scope="module", params=COMPAT_CASES, ids=COMPAT_IDS)
def compat_problem(request: pytest.FixtureRequest) -> Problem:
    """One problem of :data:`COMPAT_CASES` (float64, eval mode)."""
    name, loss, reduction = request.param
    return make_problem(case(name), loss, reduction)


def run_backpack(
    problem: Problem, extensions: Sequence[BackpropExtension], **kwargs: object
) -> nn.Module:
    """``loss.backward()`` inside ``with backpack(...)`` on extended copies.

    Returns the extended copy of the model, whose parameters hold the quantities.
    """
    model = extend(copy.deepcopy(problem.model))
    loss_func = extend(copy.deepcopy(problem.loss_func))
    loss = loss_func(model(problem.inputs), problem.targets)
    with backpack(*extensions, **kwargs):
        loss.backward()
    return model


def savefield(model: nn.Module, field: str) -> dict[str, Tensor]:
    """``name -> p.<field>`` for the trainable parameters."""
    return {
        n: getattr(p, field) for n, p in model.named_parameters() if p.requires_grad
    }


def block(matrix: Tensor, model: nn.Module, name: str) -> Tensor:
    """The diagonal block of parameter ``name`` of a ``[P, P]`` matrix."""
    start = 0
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if n == name:
            return matrix[start : start + p.numel(), start : start + p.numel()]
        start += p.numel()
    raise KeyError(name)


def problem_on(problem: Problem, inputs: Tensor, targets: Tensor) -> Problem:
    """The same model and loss on other data."""
    return Problem(problem.model, problem.loss_func, inputs, targets)


def fresh(name: str, loss: str = "ce", reduction: str = "mean") -> Problem:
    """A new problem of a model case (own parameters, safe to modify)."""
    torch.manual_seed(0)
    return make_problem(case(name), loss, reduction)
