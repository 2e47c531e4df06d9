"""Every BackPACK extension of the compat layer against dense ``torch.func`` references.

On models BackPACK supports and on models it rejects (residual connections,
attention, LayerNorm, weight sharing, tokens), in float64.
"""

from __future__ import annotations

import pytest
import torch

from bayescurv import engine
from bayescurv.compat.backpack import extensions as ext
from bayescurv.engine import reference
from tests.cases import Problem
from tests.compat.conftest import fresh, run_backpack, savefield
from tests.conftest import assert_close

FIRST = [ext.BatchGrad(), ext.BatchL2Grad(), ext.SumGradSquared(), ext.Variance()]
EXACT = [*FIRST, ext.BatchDotGrad(), ext.DiagGGNExact(), ext.BatchDiagGGNExact()]

# Relative error of Monte Carlo estimates with many draws (catches scaling and bias)
LOOSE_RTOL = 0.15


@pytest.fixture(scope="module")
def extended(compat_problem: Problem) -> torch.nn.Module:
    return run_backpack(compat_problem, [*EXACT, ext.SqrtGGNExact()])


def test_grad_is_the_plain_gradient(compat_problem: Problem, extended):
    p = compat_problem
    loss = p.loss_func(p.model(p.inputs), p.targets)
    grads = torch.autograd.grad(loss, list(p.model.parameters()))
    for (name, param), g in zip(extended.named_parameters(), grads, strict=True):
        assert_close(param.grad, g, f".grad of {name}")


def test_first_order(compat_problem: Problem, extended):
    p = compat_problem
    individual = reference.per_sample_gradients(
        p.model, p.loss_func, p.inputs, p.targets
    )
    for name, g in individual.items():
        flat = g.flatten(1)
        param = dict(extended.named_parameters())[name]
        assert_close(param.grad_batch, g, f"grad_batch {name}")
        assert_close(param.batch_l2, flat.square().sum(1), f"batch_l2 {name}")
        assert_close(param.sum_grad_squared, g.square().sum(0), f"sgs {name}")
        var = g.square().mean(0) - g.mean(0).square()
        assert_close(param.variance, var, f"variance {name}")
        assert_close(param.batch_dot, flat @ flat.T, f"batch_dot {name}")


def test_ggn(compat_problem: Problem, extended):
    p = compat_problem
    blocks = reference.per_sample_ggn(p.model, p.loss_func, p.inputs, p.targets)
    diag = reference.split_vector(p.model, torch.diagonal(blocks, dim1=1, dim2=2))
    for name, d in diag.items():
        param = dict(extended.named_parameters())[name]
        assert_close(param.diag_ggn_exact_batch, d, f"diag_ggn_exact_batch {name}")
        assert_close(param.diag_ggn_exact, d.sum(0), f"diag_ggn_exact {name}")
    sqrt = savefield(extended, "sqrt_ggn_exact")
    flat = torch.cat([s.flatten(2) for s in sqrt.values()], -1)
    gram = torch.einsum("cnp,cnq->npq", flat, flat)
    assert_close(gram, blocks, "per-sample Gram of sqrt_ggn_exact")


@pytest.mark.parametrize("name", ["mlp", "residual_mlp", "tokens"])
def test_hessian_diagonals(name: str):
    p = fresh(name, "ce", "mean")
    model = run_backpack(p, [ext.DiagHessian(), ext.BatchDiagHessian()])
    expected = reference.per_sample_hessian_diagonals(
        p.model, p.loss_func, p.inputs, p.targets
    )
    for n, d in expected.items():
        param = dict(model.named_parameters())[n]
        assert_close(param.diag_h_batch, d, f"diag_h_batch {n}")
        assert_close(param.diag_h, d.sum(0), f"diag_h {n}")


@pytest.mark.parametrize("name", ["mlp", "residual_mlp"])
@pytest.mark.parametrize("extension", [ext.KFLR, ext.KFRA, ext.KFAC])
def test_kronecker_factors_of_one_datum(name: str, extension):
    """For one datum, Linear layers' KFLR and KFRA are the exact GGN blocks.

    KFAC with many draws estimates them (KFRA: chains only).
    """
    p = fresh(name, "ce", "sum")
    p = Problem(p.model, p.loss_func, p.inputs[:1], p.targets[:1])
    if extension is ext.KFRA and name != "mlp":
        with pytest.raises(NotImplementedError, match="KFRA"):
            run_backpack(p, [extension()])
        return
    instance = extension(mc_samples=20_000) if extension is ext.KFAC else extension()
    torch.manual_seed(0)
    model = run_backpack(p, [instance])
    ggn = reference.ggn(p.model, p.loss_func, p.inputs, p.targets)
    start = 0
    for n, param in model.named_parameters():
        size = param.numel()
        exact = ggn[start : start + size, start : start + size]
        start += size
        dense = engine.kron_dense(getattr(param, instance.savefield))
        if extension is ext.KFAC:
            assert (dense - exact).norm() <= LOOSE_RTOL * exact.norm(), n
        else:
            assert_close(dense, exact, f"{instance.savefield} {n}")


@pytest.mark.parametrize("name", ["mlp", "attention"])
def test_monte_carlo_estimates_converge(name: str):
    p = fresh(name, "ce", "mean")
    torch.manual_seed(0)
    mc = [
        ext.DiagGGNMC(mc_samples=4000),
        ext.BatchDiagGGNMC(mc_samples=4000),
        ext.SqrtGGNMC(mc_samples=4000),
    ]
    model = run_backpack(p, [*mc, ext.DiagGGNExact(), ext.BatchDiagGGNExact()])
    for field, exact_field in [
        ("diag_ggn_mc", "diag_ggn_exact"),
        ("diag_ggn_mc_batch", "diag_ggn_exact_batch"),
    ]:
        est, exact = savefield(model, field), savefield(model, exact_field)
        diff = sum((est[k] - exact[k]).square().sum() for k in exact).sqrt()
        norm = sum(exact[k].square().sum() for k in exact).sqrt()
        assert diff < LOOSE_RTOL * norm, field
    sqrt = savefield(model, "sqrt_ggn_mc")
    diag = {k: s.square().sum(0) for k, s in sqrt.items()}
    exact = savefield(model, "diag_ggn_exact_batch")
    for k, s in sqrt.items():
        assert s.shape == (4000, *exact[k].shape)
    diff = sum((diag[k] - exact[k]).square().sum() for k in exact).sqrt()
    assert diff < LOOSE_RTOL * sum(exact[k].square().sum() for k in exact).sqrt()
