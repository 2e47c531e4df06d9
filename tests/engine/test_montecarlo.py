"""Monte Carlo extensions: convergence in expectation and reproducibility."""

from __future__ import annotations

import pytest
import torch

from bayescurv import engine
from bayescurv.engine import reference
from tests.cases import MODELS, make_problem

MC_CASES = [
    (m, loss) for m in MODELS[:3] + MODELS[-1:] for loss in ("ce", "mse", "bce")
]
MC_IDS = [f"{m.name}-{loss}" for m, loss in MC_CASES]

# Relative error of the whole diagonal (norm of the difference over norm of the exact)
LOOSE_RTOL = 0.15  # 4,000 draws: fast, catches wrong scaling or bias
TIGHT_RTOL = 0.015  # 400,000 draws


def _relative_error(mc: dict, exact: dict) -> float:
    diff = sum((mc[k] - exact[k]).square().sum() for k in exact)
    norm = sum(exact[k].square().sum() for k in exact)
    return (diff / norm).sqrt().item()


def _mc_vs_exact(model_case, loss: str, draws: int, chunks: int) -> tuple[float, float]:
    """Relative errors of ``diag_ggn_mc`` and ``diag_ggn_mc_batch`` after ``draws``."""
    p = make_problem(model_case, loss, "mean")
    gen = torch.Generator().manual_seed(1)
    args = (p.model, p.loss_func, p.inputs, p.targets)
    exact = engine.backprop(*args, [engine.DiagGGNExact(), engine.BatchDiagGGNExact()])
    mc_sum = mc_batch_sum = None
    for _ in range(chunks):
        m = draws // chunks
        exts = [engine.DiagGGNMC(mc_samples=m), engine.BatchDiagGGNMC(mc_samples=m)]
        res = engine.backprop(*args, exts, generator=gen)
        diag, batch = res["diag_ggn_mc"], res["diag_ggn_mc_batch"]
        mc_sum = diag if mc_sum is None else {k: mc_sum[k] + diag[k] for k in diag}
        mc_batch_sum = (
            batch
            if mc_batch_sum is None
            else {k: mc_batch_sum[k] + batch[k] for k in batch}
        )
    mean = {k: v / chunks for k, v in mc_sum.items()}
    batch_mean = {k: v / chunks for k, v in mc_batch_sum.items()}
    return (
        _relative_error(mean, exact["diag_ggn_exact"]),
        _relative_error(batch_mean, exact["diag_ggn_exact_batch"]),
    )


@pytest.mark.parametrize(("model_case", "loss"), MC_CASES, ids=MC_IDS)
def test_mc_diag_converges_loose(model_case, loss):
    err, err_batch = _mc_vs_exact(model_case, loss, draws=4000, chunks=1)
    assert err < LOOSE_RTOL
    assert err_batch < LOOSE_RTOL


@pytest.mark.montecarlo
@pytest.mark.parametrize(("model_case", "loss"), MC_CASES, ids=MC_IDS)
def test_mc_diag_converges_tight(model_case, loss):
    err, err_batch = _mc_vs_exact(model_case, loss, draws=400_000, chunks=20)
    assert err < TIGHT_RTOL
    assert err_batch < TIGHT_RTOL


@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_sqrt_ggn_mc_gram_converges(loss):
    """The Gram of ``sqrt_ggn_mc`` estimates the full GGN, off-diagonals included."""
    p = make_problem(MODELS[0], loss, "sum")
    args = (p.model, p.loss_func, p.inputs, p.targets)
    gen = torch.Generator().manual_seed(3)
    res = engine.backprop(*args, [engine.SqrtGGNMC(mc_samples=20_000)], generator=gen)
    sqrt = res["sqrt_ggn_mc"]
    flat = torch.cat([s.flatten(2) for s in sqrt.values()], -1)
    estimate = torch.einsum("mnp,mnq->pq", flat, flat)
    exact = reference.ggn(*args)
    err = (estimate - exact).norm() / exact.norm()
    assert err < 0.05


def test_generator_makes_mc_reproducible():
    p = make_problem(MODELS[1], "ce", "mean")
    args = (p.model, p.loss_func, p.inputs, p.targets)
    exts = [engine.DiagGGNMC(mc_samples=2), engine.SqrtGGNMC(mc_samples=3)]
    first = engine.backprop(*args, exts, generator=torch.Generator().manual_seed(7))
    second = engine.backprop(*args, exts, generator=torch.Generator().manual_seed(7))
    third = engine.backprop(*args, exts, generator=torch.Generator().manual_seed(8))
    for field in ("diag_ggn_mc", "sqrt_ggn_mc"):
        for name, value in first[field].items():
            assert torch.equal(value, second[field][name])
    assert not torch.equal(
        first["diag_ggn_mc"]["0.weight"], third["diag_ggn_mc"]["0.weight"]
    )
    assert first["sqrt_ggn_mc"]["0.weight"].shape == (3, 4, 4, 2, 3, 3)


def test_mc_samples_must_be_positive():
    with pytest.raises(ValueError, match="mc_samples must be a positive integer"):
        engine.DiagGGNMC(mc_samples=0)
