"""Fixtures of the Cockpit tests: tiny float64 problems and their dense references."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from bayescurv.cockpit import Cockpit, Instrument
from bayescurv.engine import reference
from tests.cases import make_loss


@dataclass
class TinyProblem:
    """A small float64 model, loss and two batches."""

    model: nn.Module
    loss_func: nn.Module
    batches: list[tuple[Tensor, Tensor]]

    @property
    def rho(self) -> float:
        n = self.batches[0][0].shape[0]
        return 1.0 / n if self.loss_func.reduction == "mean" else 1.0

    def individual_gradients(self, batch: int = 0) -> Tensor:
        """Dense ``∇l_n``, ``[N, P]`` (per-sample contributions divided by rho)."""
        x, y = self.batches[batch]
        grads = reference.per_sample_gradients(self.model, self.loss_func, x, y)
        return torch.cat([g.flatten(1) for g in grads.values()], dim=1) / self.rho

    def flat_params(self) -> Tensor:
        return torch.cat([p.detach().flatten() for p in self.model.parameters()])


def make_tiny(loss: str = "ce", reduction: str = "mean", n: int = 6) -> TinyProblem:
    """An MLP 4-5-3 with tanh on two random batches of ``n`` samples."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    batches = []
    for _ in range(2):
        x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
        if loss == "ce":
            y = torch.randint(0, 3, (n,), generator=gen)
        elif loss == "bce":
            y = torch.rand(n, 3, generator=gen, dtype=torch.float64)
        else:
            y = torch.randn(n, 3, generator=gen, dtype=torch.float64)
        batches.append((x, y))
    return TinyProblem(model, make_loss(loss, reduction), batches)


@pytest.fixture(params=[("ce", "mean"), ("mse", "sum"), ("bce", "mean")], ids=str)
def tiny(request: pytest.FixtureRequest) -> TinyProblem:
    return make_tiny(*request.param)


def run_steps(
    problem: TinyProblem,
    instruments: list[Instrument],
    lr: float = 0.1,
    steps: int = 1,
    **kwargs,
) -> Cockpit:
    """``steps`` SGD steps alternating the two batches, with the Cockpit watching."""
    optimizer = torch.optim.SGD(problem.model.parameters(), lr=lr)
    cockpit = Cockpit(
        problem.model, problem.loss_func, instruments, optimizer=optimizer, **kwargs
    )
    for step in range(steps):
        x, y = problem.batches[step % 2]
        with cockpit.step(x, y):
            optimizer.step()
    return cockpit
