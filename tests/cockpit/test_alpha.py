"""Alpha: closed form on an exact quadratic, and the noisy fit against a direct one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from bayescurv import cockpit as ck
from bayescurv.engine import reference
from tests.cockpit.conftest import make_tiny

ALPHA_ATOL = 1e-8  # alpha from well-conditioned float64 fits


def _quadratic_problem() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(8, 2, generator=gen, dtype=torch.float64)
    return model, nn.MSELoss(), x, y


@pytest.mark.parametrize(("factor", "expected"), [(0.5, -0.5), (1.0, 0.0), (2.0, 1.0)])
def test_alpha_on_an_exact_quadratic(factor: float, expected: float):
    """Steps of `factor` times the exact line search give alpha = factor - 1."""
    model, loss_func, x, y = _quadratic_problem()
    params = list(model.parameters())
    grad = torch.cat(
        [g.flatten() for g in torch.autograd.grad(loss_func(model(x), y), params)]
    )
    hessian = reference.param_hessian(model, loss_func, x, y)
    line_search = (grad @ grad / (grad @ hessian @ grad)).item()
    optimizer = torch.optim.SGD(params, lr=factor * line_search)
    cockpit = ck.Cockpit(model, loss_func, [ck.Alpha(ck.schedules.at([0]))])
    for _ in range(2):  # the same batch at both ends: the 1-D loss is the quadratic
        with cockpit.step(x, y):
            optimizer.step()
    assert cockpit.history["alpha"].values == pytest.approx({0: expected}, abs=1e-10)


def _observation(losses: torch.Tensor, projections: torch.Tensor) -> list[float]:
    n = len(losses)
    return [
        losses.mean().item(),
        losses.var().item() / n,
        projections.mean().item(),
        projections.var().item() / n,
    ]


@pytest.mark.parametrize(("loss", "reduction"), [("ce", "mean"), ("mse", "sum")])
def test_alpha_against_a_direct_weighted_fit(loss: str, reduction: str):
    p = make_tiny(loss, reduction)
    lr = 0.5
    observations, starts = [], []
    for batch in range(2):  # direct: individual losses and gradients at both ends
        starts.append(p.flat_params())
        x, y = p.batches[batch]
        output = p.model(x)
        losses = torch.stack(
            [p.loss_func(output[i : i + 1], y[i : i + 1]) for i in range(len(y))]
        ).detach()
        observations.append((losses, p.individual_gradients(batch)))
        grads = torch.autograd.grad(p.loss_func(output, y), list(p.model.parameters()))
        with torch.no_grad():
            for param, g in zip(p.model.parameters(), grads, strict=True):
                param.sub_(lr * g)
    update = starts[1] - starts[0]  # the step assessed: the first one
    # a fresh copy of the problem; the Cockpit takes the same two steps
    p2 = make_tiny(loss, reduction)
    cockpit = ck.Cockpit(p2.model, p2.loss_func, [ck.Alpha(ck.schedules.at([0]))])
    optimizer = torch.optim.SGD(p2.model.parameters(), lr=lr)
    for batch in range(2):
        with cockpit.step(*p2.batches[batch]):
            optimizer.step()
    tau = update.norm().item()
    direction = update / tau
    (f0, vf0, d0, vd0), (f1, vf1, d1, vd1) = (
        _observation(losses, grads @ direction) for losses, grads in observations
    )
    phi = np.array([[1, 0, 0], [1, tau, tau**2], [0, 1, 0], [0, 1, 2 * tau]])
    weights = np.diag(1 / np.array([vf0, vf1, vd0, vd1]))
    obs = np.array([f0, f1, d0, d1])
    _, b, a = np.linalg.solve(phi.T @ weights @ phi, phi.T @ weights @ obs)
    expected = -2 * tau * a / b - 1 if a > 0 else -1.0
    assert cockpit.history["alpha"].values[0] == pytest.approx(expected, abs=ALPHA_ATOL)


def test_alpha_is_recorded_after_the_next_step_and_follows_the_schedule():
    p = make_tiny("ce", "mean")
    alpha = ck.Alpha(ck.schedules.every(2))
    cockpit = ck.Cockpit(p.model, p.loss_func, [alpha])
    optimizer = torch.optim.SGD(p.model.parameters(), lr=0.1)
    requested = []
    for step in range(4):
        requested.append([e.savefield for e in alpha.extensions(step)])
        with cockpit.step(*p.batches[step % 2]):
            optimizer.step()
        if step == 0:
            assert alpha.values == {}, "alpha of step 0 needs step 1"
    assert sorted(alpha.values) == [0, 2]
    assert requested == [["grad_batch"]] * 4  # steps 1 and 3 end the fits


def test_alpha_of_a_zero_update_is_nan():
    p = make_tiny("ce", "mean")
    cockpit = ck.Cockpit(p.model, p.loss_func, [ck.Alpha()])
    with cockpit.step(*p.batches[0]):
        pass  # no update
    assert math.isnan(cockpit.history["alpha"].values[0])


def test_an_aborted_step_starts_no_fit():
    p = make_tiny("ce", "mean")
    alpha = ck.Alpha(ck.schedules.at([1]))
    cockpit = ck.Cockpit(p.model, p.loss_func, [alpha])
    optimizer = torch.optim.SGD(p.model.parameters(), lr=0.1)
    with cockpit.step(*p.batches[0]):
        optimizer.step()
    with pytest.raises(KeyError, match="boom"), cockpit.step(*p.batches[1]):
        raise KeyError("boom")
    assert alpha.extensions(2) == (), "no fit waits for an end point"
    with cockpit.step(*p.batches[0]):
        optimizer.step()
    assert alpha.values == {}
