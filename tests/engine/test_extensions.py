"""Every exact extension on every case against dense ``torch.func`` references."""

from __future__ import annotations

import pytest
import torch

from bayescurv import engine
from bayescurv.engine import reference
from tests.cases import Problem
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


@pytest.fixture(scope="module")
def computed(problem: Problem) -> engine.BackpropResult:
    """All exact extensions of one problem, from one engine call."""
    problem.model.zero_grad()
    return engine.backprop(
        problem.model, problem.loss_func, problem.inputs, problem.targets, EXACT
    )


@pytest.fixture(scope="module")
def individual(problem: Problem) -> dict[str, torch.Tensor]:
    return reference.per_sample_gradients(
        problem.model, problem.loss_func, problem.inputs, problem.targets
    )


@pytest.fixture(scope="module")
def ggn_blocks(problem: Problem) -> torch.Tensor:
    return reference.per_sample_ggn(
        problem.model, problem.loss_func, problem.inputs, problem.targets
    )


def test_loss_output_and_grad(problem: Problem, computed: engine.BackpropResult):
    output = problem.model(problem.inputs)
    loss = problem.loss_func(output, problem.targets)
    assert_close(computed.output, output.detach(), "output")
    assert_close(computed.loss, loss.detach(), "loss")
    grads = torch.autograd.grad(loss, list(problem.model.parameters()))
    for (name, p), g in zip(problem.model.named_parameters(), grads, strict=True):
        assert_close(p.grad, g, f".grad of {name}")


def test_first_order(computed: engine.BackpropResult, individual: dict):
    n = next(iter(individual.values())).shape[0]
    for name, g in individual.items():
        flat = g.flatten(1)
        assert_close(computed["grad_batch"][name], g, f"grad_batch {name}")
        assert_close(
            computed["batch_l2"][name], flat.square().sum(1), f"batch_l2 {name}"
        )
        assert_close(
            computed["sum_grad_squared"][name], g.square().sum(0), f"sgs {name}"
        )
        var = g.square().mean(0) - g.mean(0).square()
        assert_close(computed["variance"][name], var, f"variance {name}")
        assert_close(computed["batch_dot"][name], flat @ flat.T, f"batch_dot {name}")
        assert computed["batch_dot"][name].shape == (n, n)


def test_ggn_diagonals(
    problem: Problem, computed: engine.BackpropResult, ggn_blocks: torch.Tensor
):
    batch_diag = reference.split_vector(
        problem.model, torch.diagonal(ggn_blocks, dim1=1, dim2=2)
    )
    for name, expected in batch_diag.items():
        assert_close(computed["diag_ggn_exact_batch"][name], expected, name)
        assert_close(computed["diag_ggn_exact"][name], expected.sum(0), name)


def test_ggn_is_block_diagonal_over_samples(problem: Problem, ggn_blocks):
    """The per-sample decomposition the engine relies on matches the full GGN."""
    full = reference.ggn(
        problem.model, problem.loss_func, problem.inputs, problem.targets
    )
    assert_close(ggn_blocks.sum(0), full, "sum of per-sample GGNs")


def test_sqrt_ggn_gram(problem: Problem, computed: engine.BackpropResult, ggn_blocks):
    sqrt = computed["sqrt_ggn_exact"]
    num_cols = next(iter(sqrt.values())).shape[0]
    flat = torch.cat([s.reshape(num_cols, s.shape[1], -1) for s in sqrt.values()], -1)
    per_sample = torch.einsum("cnp,cnq->npq", flat, flat)
    assert_close(per_sample, ggn_blocks, "per-sample Gram of sqrt_ggn_exact")
