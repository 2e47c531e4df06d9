"""Adversarial sweep: saved state, float32 numerics and scale.

* state: round trips, loads into other configurations and models, fits that fail
  or are interrupted, train mode after the fit;
* numerics: a float32 model against its float64 copy on a rank-deficient GGN
  (evidence and GLM variance within 1e-3 relative for priors 1e-6 to 1e6), and
  extreme inputs, logits, noises and priors;
* scale: memory refusals before allocation, many small batches against one.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from bayescurv import Laplace
from bayescurv.engine import MemoryBudgetError
from experiments.sweep_checks import (
    F64,
    Case,
    SilentWrong,
    check_posterior,
    data,
    fitted,
    mlp,
    rel_error,
)

STRUCTURES = ["full", "kron", "diag", "lowrank"]


def _posterior(subset: str = "all", structure: str = "full", **kw) -> tuple:
    x, y = data("classification")
    model = mlp("classification")
    return fitted(model, "classification", subset, structure, [(x, y)], **kw), x, y


def _same(a: Tensor, b: Tensor, what: str, tol: float = 1e-10) -> None:
    err = rel_error(a, b)
    if not err <= tol:
        raise SilentWrong(f"{what}: rel. err {err:.1e}")


class Interrupted:
    """Yields one good batch, then raises ``error``."""

    def __init__(self, batch: tuple, error: BaseException) -> None:
        self.batch, self.error = batch, error

    def __iter__(self) -> Iterator[tuple]:
        yield self.batch
        raise self.error


def _roundtrip(subset: str, structure: str) -> Callable[[], str]:
    def run() -> str:
        la, x, _ = _posterior(subset, structure)
        buffer = io.BytesIO()
        torch.save(la.state_dict(), buffer)
        buffer.seek(0)
        fresh = Laplace(copy.deepcopy(la.model), "classification", subset, structure)
        fresh.load_state_dict(torch.load(buffer, weights_only=False))
        _same(fresh(x), la(x), "predictive after load")
        _same(fresh.log_marginal_likelihood(), la.log_marginal_likelihood(), "evidence")
        return "same predictive and evidence"

    return run


def _interrupted(error: BaseException, structure: str) -> Callable[[], str]:
    def run() -> str:
        la, x, y = _posterior("all", structure)
        before, state = la.log_marginal_likelihood(), la.state
        try:
            la.fit(Interrupted((x, y), error))
        except type(error):
            pass
        if la.state is not state:
            raise SilentWrong("the previous posterior was replaced")
        _same(la.log_marginal_likelihood(), before, "evidence after the failed fit")
        return "previous posterior kept"

    return run


def _load_into(change: str) -> Callable[[], str]:
    def run() -> str:
        la, _, _ = _posterior("last_layer", "diag")
        saved = la.state_dict()
        model = la.model
        if change == "structure":
            other = Laplace(model, "classification", hessian_structure="full")
        elif change == "subset":
            other = Laplace(model, "classification", "all", "diag")
        elif change == "shapes":
            wide = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()
            other = Laplace(wide, "classification", hessian_structure="diag")
        elif change == "likelihood":
            other = Laplace(model, "binary", hessian_structure="diag")
        else:
            other = Laplace(model, "classification", hessian_structure="diag")
            saved = {"garbage": 1} if change == "garbage" else [1, 2]
        other.load_state_dict(saved)
        return "loaded"

    return run


def _moved_weights() -> str:
    la, _, _ = _posterior("last_layer", "kron")
    saved = la.state_dict()
    with torch.no_grad():
        la.model[2].weight.add_(0.3)
    Laplace(la.model, "classification", hessian_structure="kron").load_state_dict(saved)
    return "loaded over moved weights"


def _saved_unchanged() -> str:
    la, x, y = _posterior("all", "full")
    saved = la.state_dict()
    copy_before = copy.deepcopy(saved)
    la.fit([(x, y)], override=False)
    fresh = Laplace(la.model, "classification", "all", "full")
    fresh.load_state_dict(saved)
    expected = Laplace(la.model, "classification", "all", "full")
    expected.load_state_dict(copy_before)
    _same(fresh.posterior_precision, expected.posterior_precision, "saved state")
    doubled = fitted(la.model, "classification", "all", "full", [(x, y), (x, y)])
    _same(la.posterior_precision, doubled.posterior_precision, "override=False")
    return "saved state unchanged; override=False adds"


def _train_mode(kind: str) -> Callable[[], str]:
    def run() -> str:
        torch.manual_seed(0)
        layer = nn.Dropout(0.5) if kind == "dropout" else nn.BatchNorm1d(4)
        model = nn.Sequential(
            nn.Linear(3, 4), layer, nn.Tanh(), nn.Linear(4, 3)
        ).double()
        x, y = data("classification")
        la = fitted(model, "classification", "all", "full", [(x, y)])
        before = la(x)
        model.train()
        _same(la(x), before, "GLM predictive in train mode")
        if not model.training:
            raise SilentWrong("the caller's train mode was not restored")
        return "predictions in eval mode; train mode restored"

    return run


def state_cases() -> list[Case]:
    """Round trips, mismatched loads, failed fits, train mode after the fit."""
    cases = [
        Case("state", f"roundtrip [{s}/{st}]", _roundtrip(s, st))
        for s in ("all", "last_layer")
        for st in STRUCTURES
    ]
    for change in ("structure", "subset", "shapes", "likelihood", "garbage", "list"):
        cases.append(Case("state", f"load-other-{change}", _load_into(change), "error"))
    cases.append(
        Case("state", "load-over-moved-weights", _moved_weights, warns="differ")
    )
    cases.append(Case("state", "saved-state-after-override-false", _saved_unchanged))
    for structure in STRUCTURES:
        for error in (RuntimeError("disk"), KeyboardInterrupt()):
            name = f"interrupted-{type(error).__name__} [{structure}]"
            cases.append(Case("state", name, _interrupted(error, structure)))
    cases += [
        Case("state", "train-mode-dropout", _train_mode("dropout")),
        Case("state", "train-mode-batchnorm", _train_mode("batchnorm")),
        Case("state", "lowrank-override-false", _lowrank_add, "error", "cannot add"),
        Case("state", "lowrank-one-shot", _lowrank_iter, "error", "re-iterable"),
        Case("state", "sigma-ratio-change", _sigma_ratio, "error", "common factor"),
    ]
    return cases


def _lowrank_add() -> str:
    la, x, y = _posterior("all", "lowrank")
    la.fit([(x, y)], override=False)
    return "added"


def _lowrank_iter() -> str:
    x, y = data("classification")
    Laplace(mlp("classification"), "classification", "all", "lowrank").fit(
        iter([(x, y)])
    )
    return "fitted"


def _sigma_ratio() -> str:
    x, y = data("regression")
    la = fitted(
        mlp("regression"),
        "regression",
        "all",
        "full",
        [(x, y)],
        sigma_noise=torch.tensor([1.0, 2.0]),
    )
    la.sigma_noise = torch.tensor([1.0, 1.0])
    return "changed"


# ---------------------------------------------------------------- numerics
def _float32_vs_64(subset: str, structure: str, prior: float) -> Callable[[], str]:
    """Rank-deficient regression MLP (P = 181 > N K = 20) in float32 and float64."""

    def run() -> str:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(2, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 1)
        )
        x = torch.randn(20, 2)
        y = torch.sin(x.sum(1, keepdim=True))
        results = []
        for dtype in (torch.float32, F64):
            m = copy.deepcopy(model).to(dtype)
            gen = torch.Generator().manual_seed(0)
            la = fitted(
                m,
                "regression",
                subset,
                structure,
                [(x.to(dtype), y.to(dtype))],
                prior_precision=prior,
                generator=gen,
            )
            results.append(
                (la.log_marginal_likelihood(), la.glm_moments(x.to(dtype))[1])
            )
        err_ev = rel_error(results[0][0], results[1][0])
        err_var = rel_error(results[0][1], results[1][1])
        if not (err_ev <= 1e-3 and err_var <= 1e-3):
            raise SilentWrong(
                f"float32 vs float64: evidence {err_ev:.1e}, GLM variance {err_var:.1e}"
            )
        return f"evidence {err_ev:.1e}, GLM variance {err_var:.1e}"

    return run


def _extreme(kind: str) -> Callable[[], str]:
    def run() -> str:
        likelihood = "regression" if kind.startswith("sigma") else "classification"
        x, y = data(likelihood)
        model = mlp(likelihood)
        kw: dict = {}
        if kind == "huge-x":
            x = x * 1e4
        elif kind == "tiny-x":
            x = x * 1e-8
        elif kind == "saturated":
            with torch.no_grad():
                model[2].weight.mul_(1e3)
        elif kind == "zero-weights":
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()
        elif kind == "one-point":
            x, y = x[:1], y[:1]
        elif kind == "duplicates":
            x, y = torch.cat([x[:3]] * 4), torch.cat([y[:3]] * 4)
        elif kind == "sigma-tiny":
            kw["sigma_noise"] = 1e-4
        elif kind == "sigma-huge":
            kw["sigma_noise"] = 1e4
        elif kind in ("prior-1e-12", "prior-1e12"):
            kw["prior_precision"] = float(kind.removeprefix("prior-"))
        elif kind == "temperature-tiny":
            kw["temperature"] = 1e-6
        la = fitted(model, likelihood, "all", "full", [(x, y)], **kw)
        # a prior of 1e-12 on a rank-deficient GGN: condition ~1e13, so even the
        # float64 reference solve carries relative errors of ~1e-3
        tol = 1e-3 if kind == "prior-1e-12" else 1e-5
        return check_posterior(la, model, x, y, tol=tol)

    return run


def numerics_cases() -> list[Case]:
    """float32 against float64 for every structure and prior; extreme values."""
    cases = [
        Case("numerics", f"float32 [{s}/{st}/prior={p:g}]", _float32_vs_64(s, st, p))
        for s in ("all", "last_layer")
        for st in STRUCTURES
        for p in (1e-6, 1e-2, 1.0, 1e2, 1e6)
    ]
    kinds = [
        "huge-x",
        "tiny-x",
        "saturated",
        "zero-weights",
        "one-point",
        "duplicates",
        "sigma-tiny",
        "sigma-huge",
        "prior-1e-12",
        "prior-1e12",
        "temperature-tiny",
    ]
    cases += [Case("numerics", kind, _extreme(kind)) for kind in kinds]
    return cases


# ------------------------------------------------------------------- scale
def _million_full() -> str:
    model = nn.Sequential(nn.Linear(1000, 1000), nn.Linear(1000, 2))
    x, y = torch.randn(4, 1000), torch.tensor([0, 1, 0, 1])
    Laplace(model, "classification", "all", "full").fit([(x, y)])
    return "fitted"


def _budget(structure: str, what: str) -> Callable[[], str]:
    def run() -> str:
        x, y = data("classification")
        budget = 5000 if what == "covariance" else 200
        la = Laplace(
            mlp("classification"), "classification", "all", structure, max_memory=budget
        )
        la.fit([(x, y)])
        if what == "covariance":
            return str(la.posterior_covariance.shape)
        return "fitted"

    return run


def _many_batches(structure: str) -> Callable[[], str]:
    def run() -> str:
        x, y = data("classification", n=60)
        model = mlp("classification")
        one = fitted(model, "classification", "all", structure, [(x, y)])
        many = fitted(
            model,
            "classification",
            "all",
            structure,
            [(x[i : i + 1], y[i : i + 1]) for i in range(60)],
        )
        _same(many.posterior_variance, one.posterior_variance, "60 batches of 1", 1e-9)
        _same(
            many.log_marginal_likelihood(),
            one.log_marginal_likelihood(),
            "evidence",
            1e-9,
        )
        return "60 batches of one = one batch"

    return run


def _large_n() -> str:
    """20,000 points in 40 batches: finite, and as one batch of all of them."""
    x, y = data("classification", n=20000)
    model = mlp("classification")
    batches = [(x[i : i + 500], y[i : i + 500]) for i in range(0, 20000, 500)]
    la = fitted(model, "classification", "all", "diag", batches)
    one = fitted(model, "classification", "all", "diag", [(x, y)])
    _same(la.posterior_variance, one.posterior_variance, "40 batches vs one", 1e-9)
    if not bool(torch.isfinite(la.log_marginal_likelihood())):
        raise SilentWrong("evidence not finite")
    return "40 batches = one batch, finite evidence"


def scale_cases() -> list[Case]:
    """Memory refusals up front; batching at scale."""
    cases = [
        Case("scale", "full-1M-weights", _million_full, "error", "max_memory|memory"),
        Case("scale", "kron-budget", _budget("kron", "fit"), "error", "max_memory"),
        Case("scale", "full-budget", _budget("full", "fit"), "error", "max_memory"),
        Case(
            "scale",
            "covariance-budget",
            _budget("diag", "covariance"),
            "error",
            "posterior_covariance",
        ),
        Case("scale", "n-20000-diag", _large_n),
    ]
    cases += [
        Case("scale", f"many-batches [{st}]", _many_batches(st))
        for st in ("full", "kron", "diag")
    ]
    return cases


__all__ = ["MemoryBudgetError", "numerics_cases", "scale_cases", "state_cases"]
