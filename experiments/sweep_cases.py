"""The cases of the adversarial sweep: bad inputs, predict options, models.

Each family is a function returning :class:`~experiments.sweep_checks.Case` objects;
:data:`FAMILIES` lists them in report order (with the state, numerics and scale
families of :mod:`experiments.sweep_more`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bayescurv import Laplace
from experiments.sweep_checks import (
    Case,
    SilentWrong,
    check_posterior,
    data,
    fitted,
    mlp,
)
from experiments.sweep_models import model_cases
from experiments.sweep_more import numerics_cases, scale_cases, state_cases

__all__ = ["FAMILIES", "Case", "SilentWrong"]

VARIANTS = [
    ("all", "full"),
    ("all", "kron"),
    ("last_layer", "full"),
    ("last_layer", "diag"),
]


def _with(tensor: Tensor, index: tuple, value: float) -> Tensor:
    out = tensor.clone()
    out[index] = value
    return out


def _bad_batches() -> list[tuple[str, str, Callable[[Tensor, Tensor], Any], str]]:
    """(name, likelihood, loader from good (x, y), expected message)."""
    nan, inf = float("nan"), float("inf")
    return [
        ("nan-x", "classification", lambda x, y: [(_with(x, (0, 0), nan), y)], "NaN"),
        ("inf-x", "regression", lambda x, y: [(_with(x, (2, 1), inf), y)], "inf"),
        ("neg-inf-x", "binary", lambda x, y: [(_with(x, (2, 1), -inf), y)], "inf"),
        ("nan-y", "regression", lambda x, y: [(x, _with(y, (0, 0), nan))], "NaN"),
        ("inf-y", "regression", lambda x, y: [(x, _with(y, (1, 1), inf))], "inf"),
        ("nan-y-binary", "binary", lambda x, y: [(x, _with(y, (1, 1), nan))], "NaN"),
        ("binary-2", "binary", lambda x, y: [(x, _with(y, (0, 0), 2.0))], r"\[0, 1\]"),
        (
            "binary-neg",
            "binary",
            lambda x, y: [(x, _with(y, (0, 1), -1.0))],
            r"\[0, 1\]",
        ),
        ("binary-int", "binary", lambda x, y: [(x, y.long())], "floating-point"),
        ("class-C", "classification", lambda x, y: [(x, _with(y, (3,), 3))], "C=3"),
        ("class-big", "classification", lambda x, y: [(x, _with(y, (3,), 99))], "C=3"),
        ("class-neg", "classification", lambda x, y: [(x, _with(y, (3,), -1))], "-100"),
        ("class-float", "classification", lambda x, y: [(x, y.double())], "long"),
        ("class-bool", "classification", lambda x, y: [(x, y > 0)], "bool"),
        ("class-int32", "classification", lambda x, y: [(x, y.int())], "int32"),
        (
            "class-onehot",
            "classification",
            lambda x, y: [(x, torch.eye(3)[y].long())],
            "shape",
        ),
        ("class-2d", "classification", lambda x, y: [(x, y[:, None])], "shape"),
        ("reg-int", "regression", lambda x, y: [(x, y.long())], "floating-point"),
        ("reg-shape", "regression", lambda x, y: [(x, y[:, :1])], "shape"),
        ("numpy-x", "classification", lambda x, y: [(x.numpy(), y)], "torch.as_tensor"),
        ("numpy-y", "regression", lambda x, y: [(x, y.numpy())], "torch.as_tensor"),
        ("list-x", "classification", lambda x, y: [(x.tolist(), y)], "torch.as_tensor"),
        ("list-y", "classification", lambda x, y: [(x, y.tolist())], "torch.as_tensor"),
        ("meta-x", "classification", lambda x, y: [(x.to("meta"), y)], "meta"),
        ("meta-y", "regression", lambda x, y: [(x, y.to("meta"))], "meta"),
        ("float32-x", "classification", lambda x, y: [(x.float(), y)], "float32"),
        ("length", "classification", lambda x, y: [(x, y[:5])], "12 samples"),
        ("scalar-y", "classification", lambda x, y: [(x, y[0])], "one entry per"),
        ("triple", "classification", lambda x, y: [(x, y, y)], "pair or a dict"),
        ("bare-x", "classification", lambda x, y: [x], "pair or a dict"),
        ("none", "classification", lambda x, y: [None], "pair or a dict"),
        ("string", "classification", lambda x, y: ["batch"], "pair or a dict"),
        ("dict-no-y", "classification", lambda x, y: [{"input_ids": x}], "labels"),
        ("empty-loader", "classification", lambda x, y: [], "no batches"),
        ("empty-batch", "classification", lambda x, y: [(x[:0], y[:0])], "no batches"),
        (
            "all-ignored",
            "classification",
            lambda x, y: [(x, y * 0 - 100)],
            "no batches",
        ),
        ("one-x-dim", "regression", lambda x, y: [(x[:, 0], y)], ""),
    ]


def _fit_case(subset: str, structure: str, likelihood: str, make: Callable) -> Callable:
    def run() -> str:
        model = mlp(likelihood)
        x, y = data(likelihood)
        fitted(model, likelihood, subset, structure, make(x, y))
        return "fitted"

    return run


def fit_input_cases() -> list[Case]:
    """Bad batches at ``fit``, for two subsets and two structures each."""
    cases = []
    for subset, structure in VARIANTS:
        for name, likelihood, make, match in _bad_batches():
            cases.append(
                Case(
                    "fit inputs",
                    f"{name} [{subset}/{structure}]",
                    _fit_case(subset, structure, likelihood, make),
                    "error",
                    match or None,
                )
            )
    cases += _skip_cases()
    return cases


def _skip_cases() -> list[Case]:
    """Policies: empty batches and -100 targets are skipped exactly."""

    def ignored(subset: str, structure: str) -> Callable:
        def run() -> str:
            x, y = data("classification")
            y_ign = _with(y, (2,), -100)
            y_ign[7] = -100
            keep = y_ign != -100
            la = fitted(
                mlp("classification"),
                "classification",
                subset,
                structure,
                [(x[:6], y_ign[:6]), (x[6:], y_ign[6:]), (x[:0], y[:0])],
            )
            ref = fitted(
                la.model, "classification", subset, structure, [(x[keep], y[keep])]
            )
            diff = (la.log_marginal_likelihood() - ref.log_marginal_likelihood()).abs()
            if la.n_data != 10 or diff > 1e-8:
                raise SilentWrong(
                    f"n_data {la.n_data}, evidence diff {float(diff):.1e}"
                )
            return check_posterior(la, la.model, x[keep], y[keep])

        return run

    return [
        Case("fit inputs", f"ignore-index-and-empty [{s}/{st}]", ignored(s, st))
        for s, st in VARIANTS
    ]


def _predict_inputs() -> list[tuple[str, Callable[[Tensor], Any], str]]:
    nan = float("nan")
    return [
        ("nan-x", lambda x: _with(x, (0, 0), nan), "x contains NaN"),
        ("inf-x", lambda x: _with(x, (0, 0), float("inf")), "x contains NaN or inf"),
        ("numpy-x", lambda x: x.numpy(), "torch.as_tensor"),
        ("list-x", lambda x: x.tolist(), "torch.as_tensor"),
        ("empty-x", lambda x: x[:0], "no samples"),
        ("meta-x", lambda x: x.to("meta"), "meta"),
        ("float32-x", lambda x: x.float(), "float32"),
        ("wrong-features", lambda x: torch.randn(4, 5, dtype=x.dtype), ""),
        ("no-batch-axis", lambda x: x[0], ""),
        ("dict-x", lambda x: {"input_ids": x}, ""),
        ("int-x", lambda x: x.long(), ""),
    ]


def predict_input_cases() -> list[Case]:
    """Bad ``x`` at predict, for two subsets, two structures and two calls each."""
    cases = []
    for subset, structure in VARIANTS:
        for pred_type in ("glm", "nn"):
            for name, make, match in _predict_inputs():

                def run(make=make, subset=subset, structure=structure, pt=pred_type):
                    x, y = data("classification")
                    la = fitted(
                        mlp("classification"),
                        "classification",
                        subset,
                        structure,
                        [(x, y)],
                    )
                    out = la(
                        make(x),
                        pred_type=pt,
                        link_approx="mc" if pt == "nn" else "probit",
                    )
                    return f"returned {tuple(out.shape)}"

                cases.append(
                    Case(
                        "predict inputs",
                        f"{name} [{subset}/{structure}/{pred_type}]",
                        run,
                        "error",
                        match or None,
                    )
                )
    return cases


def _options() -> list[tuple[str, Callable[[Laplace, Tensor], Any], str, str | None]]:
    """(name, call on a fitted classification posterior, expect, match)."""
    gen = torch.Generator().manual_seed(0)
    return [
        ("pred-type", lambda la, x: la(x, pred_type="bayes"), "error", "pred_type"),
        ("link", lambda la, x: la(x, link_approx="exact"), "error", "link_approx"),
        (
            "nn-probit",
            lambda la, x: la(x, pred_type="nn", link_approx="probit"),
            "either",
            None,
        ),
        (
            "n-samples-0",
            lambda la, x: la(x, link_approx="mc", n_samples=0),
            "error",
            "n_samples",
        ),
        (
            "n-samples-float",
            lambda la, x: la(x, link_approx="mc", n_samples=2.5),
            "error",
            "n_samples",
        ),
        ("joint-class", lambda la, x: la(x, joint=True), "error", "joint"),
        ("noise-class", lambda la, x: la(x, noise=True), "error", "noise"),
        ("glm-kwargs", lambda la, x: la(x, foo=1), "error", "keyword"),
        ("gen-int", lambda la, x: la(x, link_approx="mc", generator=3), "ok", None),
        (
            "gen-str",
            lambda la, x: la(x, link_approx="mc", generator="3"),
            "error",
            "generator",
        ),
        ("gen-obj", lambda la, x: la(x, link_approx="mc", generator=gen), "ok", None),
        ("sample-int", lambda la, x: la.sample(3, generator=123), "ok", None),
        (
            "sample-float",
            lambda la, x: la.sample(3, generator=1.5),
            "error",
            "generator",
        ),
        ("sample-0", lambda la, x: la.sample(0), "either", None),
        (
            "prior-neg",
            lambda la, x: setattr(la, "prior_precision", -1.0),
            "error",
            "positive",
        ),
        (
            "prior-nan",
            lambda la, x: setattr(la, "prior_precision", float("nan")),
            "error",
            "finite",
        ),
        (
            "prior-shape",
            lambda la, x: setattr(la, "prior_precision", torch.ones(7)),
            "error",
            "shape",
        ),
        (
            "prior-str",
            lambda la, x: setattr(la, "prior_precision", "big"),
            "error",
            "number",
        ),
        (
            "prior-zero",
            lambda la, x: setattr(la, "prior_precision", 0.0),
            "error",
            "positive",
        ),
        (
            "sigma-class",
            lambda la, x: setattr(la, "sigma_noise", 0.5),
            "error",
            "regression",
        ),
        (
            "temp-zero",
            lambda la, x: setattr(la, "temperature", 0.0),
            "error",
            "temperature",
        ),
        (
            "temp-neg",
            lambda la, x: setattr(la, "temperature", -1.0),
            "error",
            "temperature",
        ),
        (
            "lml-prior",
            lambda la, x: la.log_marginal_likelihood(prior_precision=-2.0),
            "error",
            "positive",
        ),
        (
            "opt-method",
            lambda la, x: la.optimize_prior_precision(method="bayes"),
            "error",
            "method",
        ),
        (
            "opt-grid",
            lambda la, x: la.optimize_prior_precision(method="gridsearch"),
            "error",
            "val_loader",
        ),
        (
            "opt-steps",
            lambda la, x: la.optimize_prior_precision(n_steps=0),
            "error",
            "n_steps",
        ),
        (
            "jacobians-shape",
            lambda la, x: la.functional_variance(torch.ones(2, 3, 4)),
            "error",
            "Jacobians",
        ),
        (
            "jacobians-list",
            lambda la, x: la.functional_variance([[1.0]]),
            "error",
            "Jacobians",
        ),
    ]


def _construct() -> list[tuple[str, Callable[[], Any], str]]:
    """(name, construction, match): refusals at ``Laplace(...)``."""
    model = mlp("classification")
    return [
        ("likelihood", lambda: Laplace(model, "poisson"), "likelihood"),
        (
            "structure",
            lambda: Laplace(model, "classification", hessian_structure="band"),
            "hessian_structure",
        ),
        (
            "subset",
            lambda: Laplace(model, "classification", subset_of_weights="first"),
            "subset_of_weights",
        ),
        (
            "subnet-none",
            lambda: Laplace(model, "classification", "subnetwork"),
            "subnetwork_indices",
        ),
        ("kwarg", lambda: Laplace(model, "classification", n_components=3), "unknown"),
        (
            "rank-0",
            lambda: Laplace(
                model, "classification", hessian_structure="lowrank", rank=0
            ),
            "rank",
        ),
        ("not-a-model", lambda: Laplace(lambda x: x, "classification"), "nn.Module"),
        (
            "curv-dtype",
            lambda: Laplace(model, "classification", curvature_dtype=torch.int64),
            "curvature_dtype",
        ),
        (
            "curvature",
            lambda: Laplace(model, "classification", curvature="fisher"),
            "curvature",
        ),
        (
            "sigma-zero",
            lambda: Laplace(model, "regression", sigma_noise=0.0),
            "sigma_noise",
        ),
        (
            "prior-mean",
            lambda: Laplace(model, "classification", prior_mean=torch.ones(2, 2)),
            "prior_mean",
        ),
    ]


def option_cases() -> list[Case]:
    """Bad options at construction and after a fit; unfitted use."""
    cases = []
    for subset in ("all", "last_layer"):
        for name, call, expect, match in _options():

            def run(call=call, subset=subset) -> str:
                x, y = data("classification")
                la = fitted(
                    mlp("classification"), "classification", subset, "full", [(x, y)]
                )
                out = call(la, x)
                if isinstance(out, Tensor) and not bool(torch.isfinite(out).all()):
                    raise SilentWrong("non-finite result")
                return "ran"

            cases.append(Case("options", f"{name} [{subset}]", run, expect, match))
    for name, make, match in _construct():
        cases.append(Case("options", f"construct-{name}", make, "error", match))
    for what in ("__call__", "sample", "state_dict", "log_marginal_likelihood"):

        def unfitted(what=what) -> str:
            la = Laplace(mlp("classification"), "classification")
            x, _ = data("classification")
            getattr(la, what)(*([x] if what == "__call__" else []))
            return "ran"

        cases.append(Case("options", f"unfitted-{what}", unfitted, "error", "fit"))
    return cases


FAMILIES = {
    "fit inputs": fit_input_cases,
    "predict inputs": predict_input_cases,
    "options": option_cases,
    "models": model_cases,
    "state": state_cases,
    "numerics": numerics_cases,
    "scale": scale_cases,
}
