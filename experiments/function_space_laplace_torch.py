"""Where laplace-torch's FunctionalLaplace is exact, where it is not, and why.

Two small float64 problems trained to the MAP of the prior used by every Laplace
fit (L-BFGS on the negative log joint, gradient norm ~1e-12):

* ``regression``: 60 points of ``y = sin(3x) + 0.1 noise`` on ``[-2, 2]``, MLP
  1-16-1 (tanh), ``sigma_noise = 0.1``;
* ``classification``: 60 points of three Gaussian blobs in 2-D, MLP 2-16-3 (tanh).

For each, with all 60 points in the GP (``n_subset = 60``), it compares (largest
absolute differences on 40 test inputs, and the evidence):

* both libraries' ``FunctionalLaplace`` and ``FullLaplace`` with the dense
  weight-space GGN Laplace (``torch.func`` Jacobians, an explicit inverse);
* laplace-torch's ``FunctionalLaplace`` with laplace-torch's ``FullLaplace``;
* bayescurv's ``FunctionalLaplace`` with bayescurv's ``FullLaplace`` and with
  laplace-torch's ``FullLaplace``;
* the decomposition of laplace-torch's regression evidence (its GP log determinant
  and scatter *plus* the network's log likelihood);
* ``independent_outputs=True`` of both libraries (both keep the diagonal of W);
* subset of data (``n_subset = 20``, 10 seeds): the predictive variance relative
  to all data, laplace-torch's (prior precision scaled by N/M) and bayescurv's
  (each point standing for N/M); and on digits (MLP 64-50-10 of
  ``bench_laplace``, 1,400 points, ``n_subset`` 200 and 400, 3 seeds) the largest
  probability error against the all-data posterior.

Run from a checkout with laplace-torch installed (``/work/lt/.venv``):
``python -m experiments.function_space_laplace_torch`` (writes
``docs/results/function_space_laplace_torch.{md,json}``).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

N, N_TEST, PRIOR, SIGMA = 60, 40, 1.0, 0.1
RESULTS = Path("docs/results")


def problem(kind: str) -> tuple[nn.Module, Tensor, Tensor, Tensor]:
    """A model trained to the MAP, training data and test inputs (float64)."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if kind == "regression":
        x = torch.rand(N, 1, generator=gen, dtype=torch.float64) * 4 - 2
        y = torch.sin(3 * x) + SIGMA * torch.randn(x.shape, generator=gen).double()
        x_test = torch.linspace(-3, 3, N_TEST, dtype=torch.float64)[:, None]
        model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
    else:
        centers = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]]).double()
        y = torch.arange(N) % 3
        x = centers[y] + torch.randn(N, 2, generator=gen).double()
        x_test = 3 * torch.randn(N_TEST, 2, generator=gen).double()
        model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))
    model = model.double()
    train_to_map(model, x, y, kind)
    return model.eval(), x, y, x_test


def train_to_map(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    kind: str,
    prior: float = PRIOR,
    sigma: float = SIGMA,
) -> float:
    """L-BFGS on the negative log joint of a Gaussian prior; the gradient norm.

    Args:
        model: Trained in place (float64).
        x: Inputs.
        y: Targets (class indices, floats for ``"regression"``, 0/1 for
            ``"binary"``).
        kind: ``"classification"``, ``"regression"`` or ``"binary"``.
        prior: The prior precision.
        sigma: The regression noise.
    """
    optimizer = torch.optim.LBFGS(
        model.parameters(),
        max_iter=2000,
        tolerance_grad=1e-13,
        tolerance_change=0,
        history_size=100,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        out = model(x)
        if kind == "regression":
            data = 0.5 * (out - y).square().sum() / sigma**2
        elif kind == "classification":
            data = nn.functional.cross_entropy(out, y, reduction="sum")
        else:
            data = nn.functional.binary_cross_entropy_with_logits(
                out, y, reduction="sum"
            )
        loss = data + 0.5 * prior * sum(p.square().sum() for p in model.parameters())
        loss.backward()
        return loss

    optimizer.step(closure)
    closure()
    norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    model.zero_grad(set_to_none=True)
    return norm


def fitted(
    library: str, model: nn.Module, kind: str, loader: DataLoader, **kwargs: Any
):
    """A fitted Laplace object of ``library`` (``"bayescurv"`` or ``"laplace"``)."""
    if library == "bayescurv":
        from bayescurv import Laplace  # noqa: PLC0415
    else:
        from laplace import Laplace  # noqa: PLC0415
    noise = {"sigma_noise": SIGMA} if kind == "regression" else {}
    la = Laplace(model, kind, prior_precision=PRIOR, **noise, **kwargs)
    la.fit(loader)
    return la


def moments(la: Any, x: Tensor, kind: str, gp: bool) -> dict[str, Tensor]:
    """The predictive's mean and variance (regression) or probit probabilities."""
    pred_type = "gp" if gp and "laplace." in type(la).__module__ else "glm"
    with torch.no_grad():
        if kind == "regression":
            mean, var = la(x, pred_type=pred_type)
            return {"mean": mean.reshape(len(x)), "var": var.reshape(len(x))}
        return {"probs": la(x, pred_type=pred_type, link_approx="probit")}


def dense(model: nn.Module, x: Tensor, x_test: Tensor, kind: str) -> dict[str, Tensor]:
    """The weight-space GGN Laplace densely (``torch.func`` Jacobians)."""
    from bayescurv.engine import reference  # noqa: PLC0415
    from bayescurv.laplace.predict.links import glm_link  # noqa: PLC0415

    jac, jac_test = reference.jacobian(model, x), reference.jacobian(model, x_test)
    with torch.no_grad():
        out, f_mu = model(x), model(x_test)
    if kind == "regression":
        hessians = torch.eye(1, dtype=torch.float64).expand(N, 1, 1) / SIGMA**2
    else:
        p = out.softmax(-1)
        hessians = p.diag_embed() - p[:, :, None] * p[:, None, :]
    precision = torch.einsum("nap,nab,nbq->pq", jac, hessians, jac)
    precision += PRIOR * torch.eye(len(precision), dtype=torch.float64)
    cov = torch.einsum(
        "ncp,pq,ndq->ncd", jac_test, torch.linalg.inv(precision), jac_test
    )
    if kind == "regression":
        return {"mean": f_mu.reshape(-1), "var": cov.reshape(-1)}
    from bayescurv.laplace.enums import Likelihood, LinkApprox  # noqa: PLC0415

    return {"probs": glm_link(Likelihood.CLASSIFICATION, f_mu, cov, LinkApprox.PROBIT)}


def gap(a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, float]:
    """Largest absolute differences per quantity."""
    return {k: (a[k] - b[k]).abs().max().item() for k in a}


def evidence(la: Any) -> float:
    with torch.no_grad():
        return la.log_marginal_likelihood().item()


def compare(kind: str) -> dict[str, Any]:
    """Every comparison of the module doc for one problem."""
    model, x, y, x_test = problem(kind)
    loader = DataLoader(TensorDataset(x, y), batch_size=20)
    gp = {"subset_of_weights": "all", "hessian_structure": "gp"}
    full = {"subset_of_weights": "all", "hessian_structure": "full"}
    lt_full = fitted("laplace", model, kind, loader, **full)
    lt_gp = fitted("laplace", model, kind, loader, n_subset=N, **gp)
    ours_full = fitted("bayescurv", model, kind, loader, **full)
    ours_gp = fitted("bayescurv", model, kind, loader, **gp)
    m = {
        name: moments(la, x_test, kind, "gp" in name)
        for name, la in {
            "lt_full": lt_full,
            "lt_gp": lt_gp,
            "ours_full": ours_full,
            "ours_gp": ours_gp,
        }.items()
    }
    m["dense"] = dense(model, x, x_test, kind)
    result: dict[str, Any] = {
        "laplace-torch gp vs dense": gap(m["lt_gp"], m["dense"]),
        "laplace-torch full vs dense": gap(m["lt_full"], m["dense"]),
        "bayescurv gp vs dense": gap(m["ours_gp"], m["dense"]),
        "bayescurv full vs dense": gap(m["ours_full"], m["dense"]),
        "laplace-torch gp vs laplace-torch full": gap(m["lt_gp"], m["lt_full"]),
        "bayescurv gp vs bayescurv full": gap(m["ours_gp"], m["ours_full"]),
        "bayescurv gp vs laplace-torch full": gap(m["ours_gp"], m["lt_full"]),
        "evidence": {
            "laplace-torch full": evidence(lt_full),
            "laplace-torch gp": evidence(lt_gp),
            "bayescurv full": evidence(ours_full),
            "bayescurv gp": evidence(ours_gp),
        },
    }
    if kind == "regression":
        result["laplace-torch evidence decomposition"] = decompose(ours_gp, lt_gp)
    result["independent outputs (gp vs gp)"] = gap(
        moments(
            fitted("bayescurv", model, kind, loader, independent_outputs=True, **gp),
            x_test,
            kind,
            True,
        ),
        moments(
            fitted(
                "laplace",
                model,
                kind,
                loader,
                n_subset=N,
                independent_outputs=True,
                **gp,
            ),
            x_test,
            kind,
            True,
        ),
    )
    result["subset of data"] = subset_of_data(model, kind, loader, x_test, m)
    return result


def decompose(ours: Any, theirs: Any) -> dict[str, float]:
    """laplace-torch's regression evidence = exact GP evidence + log p(y|theta) + c."""
    model, likelihood = ours.gpytorch_model()
    import gpytorch  # noqa: PLC0415

    rows = model.train_inputs[0]
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(10_000):
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
        exact = (mll(model(rows), model.train_targets) * len(rows)).item()
    log_lik = ours.log_likelihood.item()
    constant = 0.5 * len(rows) * math.log(2 * math.pi)
    return {
        "laplace-torch gp evidence": evidence(theirs),
        "exact GP evidence (gpytorch)": exact,
        "log p(y | theta_MAP)": log_lik,
        "exact + log p(y|theta) + (N/2) log 2 pi": exact + log_lik + constant,
        "bayescurv gp evidence": evidence(ours),
    }


def subset_of_data(
    model: nn.Module,
    kind: str,
    loader: DataLoader,
    x_test: Tensor,
    all_data: dict[str, dict[str, Tensor]],
    size: int = 20,
    seeds: int = 10,
) -> dict[str, float]:
    """Mean predictive variance (or probability shift) with M points, over seeds."""
    gp = {"subset_of_weights": "all", "hessian_structure": "gp"}
    key = "var" if kind == "regression" else "probs"
    reference = all_data["ours_gp"][key]
    out = {}
    for library in ("bayescurv", "laplace"):
        errors, ratios = [], []
        for seed in range(seeds):
            la = fitted(library, model, kind, loader, n_subset=size, seed=seed, **gp)
            value = moments(la, x_test, kind, True)[key]
            errors.append((value - reference).abs().max().item())
            ratios.append((value / reference).mean().item())
        name = "laplace-torch" if library == "laplace" else "bayescurv"
        out[f"{name}: max |error| (mean over seeds)"] = sum(errors) / seeds
        if kind == "regression":
            out[f"{name}: variance / all-data variance"] = sum(ratios) / seeds
    return out


def digits_subsets(sizes: tuple[int, ...] = (200, 400), seeds: int = 3) -> dict:
    """Subset of data on digits (all weights, prior 1) against the all-data posterior.

    The MLP 64-50-10 of ``bench_laplace``; the reference is bayescurv's weight-space
    ``FullLaplace`` on all 1,400 points (3,760 weights), which the exact GP equals.
    Returns the largest probability error on the 397 test digits, per library and
    subset size, averaged over seeds.
    """
    from experiments.bench_laplace import make_data, make_model, train  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "digits50.pt"
        train("digits50", path)
        model = make_model("digits50")
        model.load_state_dict(torch.load(path, weights_only=True))
    x, y, x_test, _ = make_data("digits50")
    model.eval()
    loader = DataLoader(TensorDataset(x, y), batch_size=100)
    full = fitted_with("bayescurv", model, loader, "full")
    reference = full(x_test)
    out = {}
    for size in sizes:
        for library in ("bayescurv", "laplace"):
            errors = []
            for seed in range(seeds):
                la = fitted_with(library, model, loader, "gp", n_subset=size, seed=seed)
                pred_type = "gp" if library == "laplace" else "glm"
                errors.append((la(x_test, pred_type=pred_type) - reference).abs().max())
            name = "laplace-torch" if library == "laplace" else "bayescurv"
            out[f"{name}, M={size}"] = float(sum(errors) / seeds)
    return out


def fitted_with(
    library: str, model: nn.Module, loader: DataLoader, structure: str, **kwargs: Any
):
    """An all-weights classification Laplace of ``library`` with prior 1, fitted."""
    if library == "bayescurv":
        from bayescurv import Laplace  # noqa: PLC0415
    else:
        from laplace import Laplace  # noqa: PLC0415
    la = Laplace(model, "classification", "all", structure, **kwargs)
    la.fit(loader)
    return la


def markdown(results: dict[str, Any]) -> str:
    """Every section of every problem as a two-column table."""
    lines = [
        "# Function-space Laplace: bayescurv and laplace-torch against exact answers",
        "",
        "Generated by `python -m experiments.function_space_laplace_torch` "
        f"(torch {torch.__version__}); see docs/function_space.md. Differences are "
        "the largest absolute ones over 40 test inputs (`var`: regression "
        "predictive variance, `probs`: probit probabilities); `dense` is the "
        "weight-space GGN Laplace from `torch.func` Jacobians.",
        "",
    ]
    for kind, result in results.items():
        lines += [f"## {kind}", ""]
        lines += ["| comparison | quantity | value |", "|---|---|---|"]
        for section, values in result.items():
            for name, value in values.items():
                escaped = name.replace("|", "\\|")
                lines.append(f"| {section} | {escaped} | {value:.6g} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    results = {kind: compare(kind) for kind in ("regression", "classification")}
    results["digits, subset of data"] = {
        "max |probability error| vs all data": digits_subsets()
    }
    print(json.dumps(results, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "function_space_laplace_torch.json").write_text(
        json.dumps(results, indent=1)
    )
    (args.out / "function_space_laplace_torch.md").write_text(markdown(results))


if __name__ == "__main__":
    main()
