"""Diagonal SWAG variances: the per-entry variance of the SGD iterates."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bayescurv.laplace.laplace_torch.swag import fit_diagonal_swag_var
from tests.laplace.conftest import make_problem


def snapshots(model, loader, epochs, lr, momentum, weight_decay):
    """The trainable weights after every epoch of plain SGD (the reference)."""
    model = copy.deepcopy(model).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    out = []
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            nn.CrossEntropyLoss()(model(x), y).backward()
            opt.step()
        out.append(torch.cat([p.detach().flatten() for p in params]))
    return torch.stack(out)


def test_variance_of_the_iterates():
    problem = make_problem("classification")
    model = problem.model
    model[0].bias.requires_grad_(False)
    before = [p.detach().clone() for p in model.parameters()]
    try:
        variances = fit_diagonal_swag_var(
            model,
            problem.loader(),
            nn.CrossEntropyLoss(),
            n_snapshots_total=4,
            snapshot_freq=2,
            lr=0.05,
        )
        iterates = snapshots(model, problem.loader(), 8, 0.05, 0.9, 3e-4)[1::2]
        expected = iterates.var(0, unbiased=False).clamp(min=1e-30)
        torch.testing.assert_close(variances, expected, rtol=1e-10, atol=1e-14)
        assert variances.shape == (27,)  # the frozen bias (4 entries) is left out
        assert all(
            torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True)
        )
    finally:
        model[0].bias.requires_grad_(True)


def test_arguments():
    problem = make_problem("classification")
    with pytest.raises(ValueError, match="must be positive"):
        fit_diagonal_swag_var(problem.model, problem.loader(), nn.MSELoss(), 0)
    floor = fit_diagonal_swag_var(
        problem.model, problem.loader(), nn.CrossEntropyLoss(), 2, lr=0.0, min_var=1e-9
    )
    assert torch.equal(floor, torch.full_like(floor, 1e-9))
