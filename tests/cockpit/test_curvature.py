"""Hessian trace, top eigenvalue and TIC against dense float64 references."""

from __future__ import annotations

import pytest
import torch

from bayescurv import cockpit as ck
from bayescurv.engine import reference
from tests.cases import MODELS, make_problem
from tests.cockpit.conftest import TinyProblem, make_tiny, run_steps
from tests.conftest import assert_close

POWER_RTOL = 1e-7  # power iteration run to rtol=1e-13
HUTCHINSON_LOOSE_RTOL = 0.15  # 2,000 Rademacher vectors: catches wrong scaling
HUTCHINSON_TIGHT_RTOL = 0.01  # 200,000 Rademacher vectors
TIC_MC_LOOSE_RTOL = 0.1  # 20,000 Monte Carlo columns per sample


def _case(name: str, loss: str, reduction: str) -> TinyProblem:
    p = make_problem(next(m for m in MODELS if m.name == name), loss, reduction)
    return TinyProblem(p.model, p.loss_func, [(p.inputs, p.targets)] * 2)


HESSIAN_CASES = {
    "tiny-ce-mean": lambda: make_tiny("ce", "mean"),
    "tiny-mse-sum": lambda: make_tiny("mse", "sum"),
    "residual_cnn-ce-sum": lambda: _case("residual_cnn", "ce", "sum"),
    "residual_mlp-bce-mean": lambda: _case("residual_mlp", "bce", "mean"),
    "tokens-ce-mean": lambda: _case("tokens", "ce", "mean"),
}


@pytest.fixture(params=list(HESSIAN_CASES), ids=str)
def hessian_problem(request: pytest.FixtureRequest) -> TinyProblem:
    return HESSIAN_CASES[request.param]()


def _hessian(p: TinyProblem) -> torch.Tensor:
    return reference.param_hessian(p.model, p.loss_func, *p.batches[0])


def test_exact_hessian_trace(hessian_problem: TinyProblem):
    expected = _hessian(hessian_problem).trace()
    history = run_steps(hessian_problem, [ck.HessTrace("exact")]).history
    assert_close(
        torch.tensor(history["hess_trace"].values[0], dtype=torch.float64),
        expected,
        "trace",
    )


# the token model's top eigenvalues lie close (ratio 0.87): too slow for power iteration
@pytest.mark.parametrize(
    "case", [c for c in HESSIAN_CASES if not c.startswith("tokens")]
)
def test_hessian_max_eigenvalue(case: str):
    hessian_problem = HESSIAN_CASES[case]()
    values = torch.linalg.eigvalsh(_hessian(hessian_problem))
    expected = values[values.abs().argmax()].item()
    instrument = ck.HessMaxEV(max_iter=20_000, rtol=1e-13)
    history = run_steps(hessian_problem, [instrument], generator=torch.Generator())
    assert history.history["hess_max_ev"].values[0] == pytest.approx(
        expected, rel=POWER_RTOL
    )


def test_power_iteration_warm_starts_from_the_last_eigenvector():
    p = make_tiny("ce", "mean")
    values = torch.linalg.eigvalsh(_hessian(p))
    expected = values[values.abs().argmax()].item()
    instrument = ck.HessMaxEV(max_iter=20_000, rtol=1e-13)
    cockpit = run_steps(p, [instrument], lr=0.0, generator=torch.Generator())
    instrument.max_iter = 1  # from the converged eigenvector one product suffices
    with cockpit.step(*p.batches[0]):
        pass
    assert instrument.values[1] == pytest.approx(expected, rel=POWER_RTOL)
    cold = ck.HessMaxEV(max_iter=1)
    run_steps(p, [cold], lr=0.0, generator=torch.Generator().manual_seed(0))
    assert cold.values[0] != pytest.approx(expected, rel=1e-3), "test is informative"


def _hutchinson(p: TinyProblem, samples: int, seed: int) -> float:
    instrument = ck.HessTrace("hutchinson", samples=samples)
    gen = torch.Generator().manual_seed(seed)
    return (
        run_steps(p, [instrument], lr=0.0, generator=gen)
        .history["hess_trace"]
        .values[0]
    )


def test_hutchinson_is_reproducible_with_a_generator():
    p = make_tiny("ce", "mean")
    assert _hutchinson(p, 3, seed=0) == _hutchinson(p, 3, seed=0)
    assert _hutchinson(p, 3, seed=0) != _hutchinson(p, 3, seed=1)


@pytest.mark.parametrize(
    "case", ["tiny-ce-mean", "tiny-mse-sum", "residual_mlp-bce-mean"]
)
def test_hutchinson_converges_loose(case: str):
    problem = HESSIAN_CASES[case]()
    exact = _hessian(problem).trace().item()
    estimate = _hutchinson(problem, 2000, seed=0)
    assert abs(estimate - exact) <= HUTCHINSON_LOOSE_RTOL * abs(exact)


@pytest.mark.montecarlo
def test_hutchinson_converges_tight(hessian_problem: TinyProblem):
    exact = _hessian(hessian_problem).trace().item()
    estimate = sum(_hutchinson(hessian_problem, 20_000, seed=s) for s in range(10)) / 10
    assert abs(estimate - exact) <= HUTCHINSON_TIGHT_RTOL * abs(exact)


@pytest.mark.parametrize("approximation", ["diag", "trace"])
def test_tic_against_dense(tiny: TinyProblem, approximation: str):
    individual = tiny.individual_gradients()
    n = individual.shape[0]
    moment = individual.square().mean(0)
    ggn = reference.ggn(tiny.model, tiny.loss_func, *tiny.batches[0])
    curvature = ggn.diagonal() / (tiny.rho * n)
    eps = 1e-7
    if approximation == "diag":
        expected = (moment / (curvature + eps)).sum()
    else:
        expected = moment.sum() / (curvature.sum() + eps)
    instrument = ck.TIC(approximation=approximation)
    history = run_steps(tiny, [instrument]).history
    assert_close(
        torch.tensor(history["tic"].values[0], dtype=torch.float64), expected, "TIC"
    )


def test_tic_with_monte_carlo_curvature_loose():
    p = make_tiny("ce", "mean")
    exact = run_steps(p, [ck.TIC(approximation="trace")], lr=0.0)
    sampled = ck.TIC("diag_ggn_mc", approximation="trace", mc_samples=20_000)
    mc = run_steps(p, [sampled], lr=0.0, generator=torch.Generator().manual_seed(0))
    expected = exact.history["tic"].values[0]
    assert mc.history["tic"].values[0] == pytest.approx(expected, rel=TIC_MC_LOOSE_RTOL)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ck.HessTrace("dense"), "method must be one of 'exact', 'hutchinson'"),
        (lambda: ck.HessTrace(samples=0), "samples must be a positive integer"),
        (lambda: ck.HessMaxEV(max_iter=0), "max_iter must be a positive integer"),
        (lambda: ck.HessMaxEV(rtol=-1.0), "rtol must be non-negative"),
        (lambda: ck.TIC("diag_h"), "curvature must be one of"),
        (lambda: ck.TIC(approximation="full"), "approximation must be one of"),
        (lambda: ck.TIC(epsilon=-1.0), "epsilon must be non-negative"),
        (lambda: ck.TIC("diag_ggn_mc", mc_samples=0), "mc_samples must be a positive"),
    ],
)
def test_invalid_curvature_options(make, match):
    with pytest.raises(ValueError, match=match):
        make()
