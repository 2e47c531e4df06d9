"""First-order instruments against direct computations from dense per-sample grads."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bayescurv import cockpit as ck
from bayescurv.cockpit.instrument import individual_losses
from tests.cases import MODELS, make_problem
from tests.cockpit.conftest import TinyProblem, make_tiny, run_steps
from tests.conftest import assert_close


def _close(actual: float, expected: float, what: str) -> None:
    assert_close(
        torch.tensor(actual, dtype=torch.float64),
        torch.tensor(float(expected), dtype=torch.float64),
        what,
    )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_individual_losses_sum_to_the_batch_loss(loss: str, reduction: str):
    p = make_tiny(loss, reduction)
    x, y = p.batches[0]
    output = p.model(x).detach()
    losses = individual_losses(p.loss_func, output, y)
    per_sample = torch.stack(
        [p.loss_func(output[i : i + 1], y[i : i + 1]) for i in range(len(y))]
    )
    assert_close(losses, per_sample, "l_n = loss of sample n alone")
    assert_close(p.rho * losses.sum(), p.loss_func(output, y), "rho Σ l_n = L")


def test_individual_losses_with_class_weights_and_positions():
    weights = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)
    loss_func = nn.CrossEntropyLoss(weight=weights)
    p = make_problem(next(m for m in MODELS if m.name == "tokens"), "ce", "mean")
    output = p.model(p.inputs).detach()  # [N, C, T]
    losses = individual_losses(loss_func, output, p.targets)
    n = output.shape[0]
    assert_close(losses.mean(), loss_func(output, p.targets), "mean l_n = L")
    # the weighted mean normalizes by the total weight of all positions
    unreduced = nn.CrossEntropyLoss(weight=weights, reduction="none")
    shares = unreduced(output, p.targets).sum(1) / weights[p.targets].sum()
    assert_close(losses, n * shares, "l_n = N · share")


def test_loss_and_gradient_norm(tiny: TinyProblem):
    x, y = tiny.batches[0]
    loss = tiny.loss_func(tiny.model(x), y)
    grads = torch.autograd.grad(loss, list(tiny.model.parameters()))
    cockpit = run_steps(tiny, [ck.Loss(), ck.GradNorm()])
    _close(cockpit.history["loss"].values[0], loss.item(), "loss")
    norm = torch.cat([g.flatten() for g in grads]).norm()
    _close(cockpit.history["grad_norm"].values[0], norm.item(), "gradient norm")


def test_distance_and_update_size(tiny: TinyProblem):
    start = tiny.flat_params()
    positions = []
    cockpit = ck.Cockpit(tiny.model, tiny.loss_func, [ck.Distance(), ck.UpdateSize()])
    for step in range(3):
        positions.append(tiny.flat_params())
        with cockpit.step(*tiny.batches[step % 2]), torch.no_grad():
            for p in tiny.model.parameters():
                p.add_(0.1 * (step + 1) * torch.ones_like(p))
    positions.append(tiny.flat_params())
    history = cockpit.history
    for step in range(3):
        dist = (positions[step] - start).norm().item()
        size = (positions[step + 1] - positions[step]).norm().item()
        _close(history["distance"].values[step], dist, f"distance at {step}")
        _close(history["update_size"].values[step], size, f"update size at {step}")


def _tests_direct(individual: torch.Tensor) -> dict[str, float]:
    """The three gradient tests straight from their definitions."""
    b = individual.shape[0]
    g = individual.mean(0)
    g2 = g.square().sum()
    proj = individual @ g
    ortho = individual - (proj / g2).unsqueeze(1) * g
    scale = b * (b - 1)
    return {
        "norm_test": ((individual - g).square().sum() / scale / g2).sqrt().item(),
        "inner_product_test": ((proj - g2).square().sum() / scale / g2**2)
        .sqrt()
        .item(),
        "orthogonality_test": (ortho.square().sum() / scale / g2).sqrt().item(),
    }


def test_gradient_tests(tiny: TinyProblem):
    expected = _tests_direct(tiny.individual_gradients())
    instruments = [
        ck.NormTest(),
        ck.InnerProductTest(threshold=0.5),
        ck.OrthogonalityTest(),
    ]
    history = run_steps(tiny, instruments).history
    for name, value in expected.items():
        _close(history[name].values[0], value, name)
    assert history["inner_product_test"].threshold == 0.5


def test_gradient_tests_derive_from_individual_gradients(tiny: TinyProblem):
    """With BatchGrad in the sweep, BatchL2Grad/BatchDotGrad are derived from it."""
    expected = _tests_direct(tiny.individual_gradients())
    instruments = [ck.NormTest(), ck.OrthogonalityTest(), ck.GradHist1d()]
    history = run_steps(tiny, instruments).history
    _close(history["norm_test"].values[0], expected["norm_test"], "norm")
    _close(
        history["orthogonality_test"].values[0],
        expected["orthogonality_test"],
        "orthogonality",
    )


def _noise_direct(individual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return individual.mean(0), individual.var(0)


def test_gradient_noise_instruments(tiny: TinyProblem):
    individual = tiny.individual_gradients()
    mean, var = _noise_direct(individual)
    noisy = var > 0
    gsnr = (mean[noisy].square() / var[noisy]).mean().item()
    x, y = tiny.batches[0]
    output = tiny.model(x).detach()
    mean_loss = (tiny.loss_func(output, y) / (tiny.rho * len(y))).item()
    instruments = [ck.MeanGSNR(), ck.EarlyStopping(), ck.CABS(lr=0.3)]
    history = run_steps(tiny, instruments).history
    _close(history["mean_gsnr"].values[0], gsnr, "mean GSNR")
    _close(history["early_stopping"].values[0], 1 - len(y) * gsnr, "EB criterion")
    _close(history["cabs"].values[0], 0.3 * var.sum().item() / mean_loss, "CABS")


def test_gsnr_leaves_out_noise_free_entries():
    """A dead hidden unit has zero gradients: its entries must not count."""
    p = make_tiny("mse", "mean")
    with torch.no_grad():
        p.model[2].weight[:, 0] = (
            0.0  # unit 0 feeds nothing: its input weights are dead
        )
    individual = p.individual_gradients()
    mean, var = _noise_direct(individual)
    assert (var == 0).sum() >= 5
    noisy = var > 0
    expected = (mean[noisy].square() / var[noisy]).mean().item()
    history = run_steps(p, [ck.MeanGSNR()]).history
    _close(history["mean_gsnr"].values[0], expected, "mean GSNR")


def test_one_sample_gives_nan_tests_and_gsnr():
    p = make_tiny("ce", "mean", n=1)
    instruments = [ck.NormTest(), ck.MeanGSNR()]
    history = run_steps(p, instruments).history
    assert math.isnan(history["norm_test"].values[0])
    assert math.isnan(history["mean_gsnr"].values[0])


def test_cabs_reads_the_optimizers_learning_rate(tiny: TinyProblem):
    lr_value = run_steps(tiny, [ck.CABS()], lr=0.05).history["cabs"].values[0]
    fixed = make_tiny(*_ids(tiny))
    explicit = run_steps(fixed, [ck.CABS(lr=0.05)]).history["cabs"].values[0]
    _close(lr_value, explicit, "CABS with the optimizer's learning rate")


def _ids(p: TinyProblem) -> tuple[str, str]:
    names = {nn.CrossEntropyLoss: "ce", nn.MSELoss: "mse", nn.BCEWithLogitsLoss: "bce"}
    return names[type(p.loss_func)], p.loss_func.reduction


def test_reference_scaling_sanity(tiny: TinyProblem):
    """The helper's ∇l_n average to the gradient of the mean individual loss."""
    x, y = tiny.batches[0]
    loss = tiny.loss_func(tiny.model(x), y) / (tiny.rho * len(y))
    grad = torch.autograd.grad(loss, list(tiny.model.parameters()))
    flat = torch.cat([g.flatten() for g in grad])
    assert_close(tiny.individual_gradients().mean(0), flat, "mean ∇l_n")
