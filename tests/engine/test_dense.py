"""The dense GGN of a batch against the torch.func reference, on the case table."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bayescurv import engine
from bayescurv.engine import reference
from tests.cases import CASE_IDS, CASES, make_problem
from tests.conftest import assert_close

# one reduction suffices here: the loss columns (and their scaling) are the engine's
SUM_CASES = [
    (case, i) for case, i in zip(CASES, CASE_IDS, strict=True) if case[2] == "sum"
]


@pytest.mark.parametrize(
    "case", [c for c, _ in SUM_CASES], ids=[i for _, i in SUM_CASES]
)
def test_ggn_matrix_matches_the_reference(case):
    problem = make_problem(*case)
    grads = [p.grad for p in problem.model.parameters()]
    actual = engine.ggn_matrix(
        problem.model, problem.loss_func, problem.inputs, problem.targets
    )
    expected = reference.ggn(
        problem.model, problem.loss_func, problem.inputs, problem.targets
    )
    assert_close(actual, expected, "GGN")
    assert [p.grad for p in problem.model.parameters()] == grads  # untouched
    _, output = engine.ggn_matrix(
        problem.model,
        problem.loss_func,
        problem.inputs,
        problem.targets,
        return_output=True,
    )
    assert_close(output, problem.model(problem.inputs).detach(), "output")


@pytest.mark.parametrize("budget", [1, 2**30])
@pytest.mark.parametrize("frozen", [None, "0.weight", "2.bias"])
def test_kronecker_path_with_frozen_parameters_and_chunks(frozen, budget):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    if frozen is not None:
        model.get_parameter(frozen).requires_grad_(False)
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    loss = nn.CrossEntropyLoss()
    actual = engine.ggn_matrix(model, loss, x, y, memory_budget=budget)
    assert_close(actual, reference.ggn(model, loss, x, y), "GGN")


def test_generic_path_chunks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 2, 3), nn.Flatten(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    y = torch.randn(5, 2, dtype=torch.float64)
    loss = nn.MSELoss()
    actual = engine.ggn_matrix(model, loss, x, y, memory_budget=1)
    assert_close(actual, reference.ggn(model, loss, x, y), "GGN")


def test_out_accumulates_in_place():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2).double()
    loss = nn.MSELoss(reduction="sum")
    total = engine.ggn_matrix(model, loss, x[:4], y[:4])
    same = engine.ggn_matrix(model, loss, x[4:], y[4:], out=total)
    assert same is total
    assert_close(total, reference.ggn(model, loss, x, y), "accumulated GGN")
    with pytest.raises(ValueError, match=r"out must have shape \[14, 14\]"):
        engine.ggn_matrix(model, loss, x, y, out=torch.zeros(2, 2).double())
