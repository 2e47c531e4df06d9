"""Benchmark: function-space (GP) Laplace beside laplace-torch, and at N = 50,000.

Part 1, **digits** (scikit-learn, 1,400 training and 397 test points, C = 10; the
MLP 64-50-10 of ``bench_laplace``, trained briefly with Adam): bayescurv's and
laplace-torch's ``FunctionalLaplace`` / ``FunctionalLLLaplace`` on the same
weights, configuration by configuration:

* ``fit``: ``la.fit(train_loader)`` (batches of 100);
* ``tune``: ``la.optimize_prior_precision(method="marglik", n_steps=100)``;
* ``predict``: probit probabilities on the test set.

The speed-up is laplace-torch's fit + tune time over bayescurv's (the target:
at least 5x), wall-clock and (in parentheses) process CPU time. ``agree`` is the
largest difference of the two libraries' probabilities (laplace-torch keeps only
the diagonal of the softmax Hessian unless ``independent_outputs``, and scales the
prior instead of the likelihood on a subset: see docs/function_space.md).

Part 2, **scaling**: 50,000 synthetic points (20-D, 10 Gaussian classes), MLP
20-64-10 trained for one epoch; every function-space approximation of bayescurv
(subset of data, Nyström, variational), fit + tune + predict on 1,000 points,
with the peak resident memory of the process.

Every configuration runs in a fresh child process (after a warm-up fit on 100
points); ``mem`` is the increase of the peak RSS during the timed steps, MB.

Run from a checkout with laplace-torch installed::

    OMP_NUM_THREADS=2 /work/lt/.venv/bin/python -m experiments.bench_gp

(``--part digits`` or ``--part scaling`` for one part, ``--quick`` for a smoke
test). Writes ``docs/results/bench_gp.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from experiments.bench_laplace import (
    current_rss_mb,
    make_data,
    make_model,
    peak_rss_mb,
    reset_peak_rss,
    train,
)

RESULTS = Path("docs/results")
BATCH, TUNE_STEPS = 100, 100
DIGITS = [  # (label, subset, options)
    ("all, M=200", "all", {"n_subset": 200}),
    (
        "all, independent, M=1400",
        "all",
        {"n_subset": 1400, "independent_outputs": True},
    ),
    ("last layer, M=400", "last_layer", {"n_subset": 400}),
]
N_SYNTHETIC, D_SYNTHETIC, C_SYNTHETIC = 50_000, 20, 10
SCALING = [  # (label, subset, options)
    ("sod M=300", "all", {"n_subset": 300}),
    ("sod independent M=2000", "all", {"n_subset": 2000, "independent_outputs": True}),
    (
        "nystrom M=100, k=300",
        "all",
        {"functional_approximation": "nystrom", "n_subset": 100, "n_eigenvalues": 300},
    ),
    (
        "nystrom independent M=500",
        "all",
        {
            "functional_approximation": "nystrom",
            "n_subset": 500,
            "independent_outputs": True,
        },
    ),
    (
        "variational M=50",
        "all",
        {"functional_approximation": "variational", "n_subset": 50},
    ),
    (
        "last layer nystrom M=300",
        "last_layer",
        {"functional_approximation": "nystrom", "n_subset": 300},
    ),
]


# ------------------------------------------------------------------ problems
def synthetic(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """50,000 training and 1,000 test points of 10 Gaussian classes in 20-D."""
    gen = torch.Generator().manual_seed(seed)
    centers = 1.5 * torch.randn(C_SYNTHETIC, D_SYNTHETIC, generator=gen)
    total = N_SYNTHETIC + 1_000
    y = torch.randint(0, C_SYNTHETIC, (total,), generator=gen)
    x = centers[y] + torch.randn(total, D_SYNTHETIC, generator=gen)
    return x[:N_SYNTHETIC], y[:N_SYNTHETIC], x[N_SYNTHETIC:], y[N_SYNTHETIC:]


def train_synthetic(path: Path) -> float:
    """One epoch of Adam on the synthetic data; saves the weights, returns accuracy."""
    x, y, x_test, y_test = synthetic()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(D_SYNTHETIC, 64), nn.Tanh(), nn.Linear(64, C_SYNTHETIC)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    loader = DataLoader(TensorDataset(x, y), batch_size=500, shuffle=True)
    for xb, yb in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    torch.save(model.state_dict(), path)
    with torch.no_grad():
        return (model(x_test).argmax(1) == y_test).float().mean().item()


def load(config: dict[str, Any]) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    if config["part"] == "digits":
        data, model = make_data("digits50"), make_model("digits50")
    else:
        data = synthetic()
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(D_SYNTHETIC, 64), nn.Tanh(), nn.Linear(64, C_SYNTHETIC)
        )
    model.load_state_dict(torch.load(config["weights"], weights_only=True))
    return model.eval(), data


# -------------------------------------------------------------------- worker
def build(config: dict[str, Any], model: nn.Module, n_data: int) -> Any:
    options = dict(config["options"])
    if config["library"] == "laplace-torch":
        from laplace import Laplace  # noqa: PLC0415
    else:
        from bayescurv import Laplace  # noqa: PLC0415
    if options.get("n_subset", 0) > n_data:  # the warm-up fit
        options["n_subset"] = n_data
    if config["library"] == "laplace-torch" and "n_subset" not in options:
        options["n_subset"] = n_data
    return Laplace(model, "classification", config["subset"], "gp", **options)


def steps(la: Any, loader: DataLoader, x_test: torch.Tensor, library: str) -> dict:
    pred_type = "gp" if library == "laplace-torch" else "glm"
    actions = [
        lambda: la.fit(loader),
        lambda: la.optimize_prior_precision(
            pred_type=pred_type, method="marglik", n_steps=TUNE_STEPS
        ),
        lambda: la(x_test, pred_type=pred_type, link_approx="probit"),
    ]
    wall, cpu, out = [], [], None
    for action in actions:
        start, start_cpu = time.perf_counter(), time.process_time()
        out = action()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    if not torch.isfinite(out).all():
        raise RuntimeError("non-finite predictions")
    return {"times": wall, "cpu": cpu, "probs": out.tolist()}


def worker(config: dict[str, Any]) -> dict[str, Any]:
    import warnings  # noqa: PLC0415

    warnings.filterwarnings("ignore")
    model, (x, y, x_test, y_test) = load(config)
    warm = DataLoader(TensorDataset(x[:100], y[:100]), batch_size=BATCH)
    steps(build(config, model, 100), warm, x_test[:10], config["library"])
    loader = DataLoader(TensorDataset(x, y), batch_size=config["batch"])
    la = build(config, model, len(x))
    before = current_rss_mb()
    reset_peak_rss()
    result = steps(la, loader, x_test, config["library"])
    probs = torch.tensor(result["probs"])
    result["accuracy"] = (probs.argmax(1) == y_test).float().mean().item()
    result["prior_precision"] = float(la.prior_precision.reshape(-1)[0])
    result["mem"] = max(peak_rss_mb() - before, 0.0)
    return result


def run_child(config: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run a configuration in a fresh process (this checkout's bayescurv first)."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "experiments.bench_gp",
                "--worker",
                json.dumps(config),
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=root,
            env={**os.environ, "PYTHONPATH": path},
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s", "timeout": timeout}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- runs
def digits_part(tmp: Path, quick: bool, timeout: float) -> list[dict[str, Any]]:
    weights = tmp / "digits50.pt"
    accuracy = train("digits50", weights)
    print(f"digits: MLP 64-50-10, MAP test accuracy {accuracy:.3f}")
    rows = []
    for label, subset, options in DIGITS[:1] if quick else DIGITS:
        base = {
            "part": "digits",
            "weights": str(weights),
            "subset": subset,
            "options": options,
            "batch": BATCH,
        }
        ours = run_child({**base, "library": "bayescurv"}, timeout)
        theirs = run_child({**base, "library": "laplace-torch"}, timeout)
        row = {
            "config": label,
            "bayescurv": ours,
            "laplace_torch": theirs,
            "speedup": speedup(ours, theirs),
            "agree": agreement(ours, theirs),
        }
        print(
            f"{label:28} ours {fmt(ours)} | laplace-torch {fmt(theirs)} | "
            f"{row['speedup']} | agree {row['agree']}",
            flush=True,
        )
        rows.append(row)
    return rows


def scaling_part(tmp: Path, quick: bool, timeout: float) -> list[dict[str, Any]]:
    weights = tmp / "synthetic.pt"
    accuracy = train_synthetic(weights)
    print(
        f"scaling: N={N_SYNTHETIC}, MLP {D_SYNTHETIC}-64-{C_SYNTHETIC}, "
        f"test accuracy {accuracy:.3f}"
    )
    rows = []
    for label, subset, options in SCALING[:1] if quick else SCALING:
        config = {
            "part": "scaling",
            "weights": str(weights),
            "subset": subset,
            "options": options,
            "batch": 1000,
            "library": "bayescurv",
        }
        result = run_child(config, timeout)
        print(
            f"{label:28} {fmt(result)}  acc {result.get('accuracy', float('nan')):.3f}",
            flush=True,
        )
        rows.append({"config": label, "bayescurv": result})
    return rows


def fmt(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"failed ({result['error'][:60]})"
    fit, tune, predict = result["times"]
    memory = result["mem"]
    return f"fit {fit:7.2f} tune {tune:7.2f} pred {predict:6.2f} s, {memory:6.0f} MB"


def speedup(ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    """laplace-torch's fit + tune over bayescurv's: wall-clock (CPU time)."""
    if "error" in ours:
        return "ours failed"
    mine = sum(ours["times"][:2])
    if theirs.get("error", "").startswith("timeout"):
        return f">={theirs['timeout'] / mine:.0f}x (laplace-torch timed out)"
    if "error" in theirs:
        return "laplace-torch failed"
    wall = sum(theirs["times"][:2]) / mine
    cpu = sum(theirs["cpu"][:2]) / sum(ours["cpu"][:2])
    return f"{wall:.1f}x ({cpu:.1f}x)"


def agreement(ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    if "probs" not in ours or "probs" not in theirs:
        return "n/a"
    gap = (torch.tensor(ours["probs"]) - torch.tensor(theirs["probs"])).abs().max()
    return f"{gap.item():.2g}"


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Function-space (GP) Laplace benchmark",
        "",
        f"`{results['command']}`; torch {results['torch']}, machine load "
        f"{results['load']} (2 cores). Times in seconds (fit, tune = 100 "
        "marglik steps, predict), wall-clock (process CPU time in parentheses; "
        "the machine is shared), mem = peak RSS increase in MB.",
        "",
    ]
    if results.get("digits"):
        lines += [
            "## Digits (N=1,400, C=10) beside laplace-torch",
            "",
            "| configuration | bayescurv fit / tune / pred / MB "
            "| laplace-torch fit / tune / pred / MB | speed-up fit+tune (CPU) "
            "| max prob. difference |",
            "|---|---|---|---|---|",
        ]
        for row in results["digits"]:
            lines.append(
                f"| {row['config']} | {cells(row['bayescurv'])} | "
                f"{cells(row['laplace_torch'])} | {row['speedup']} | {row['agree']} |"
            )
        lines.append("")
    if results.get("scaling"):
        lines += [
            f"## Scaling: N = {N_SYNTHETIC:,} synthetic points, C = 10",
            "",
            "| approximation | fit (CPU) | tune | predict (1,000) | peak MB "
            "| accuracy |",
            "|---|---|---|---|---|---|",
        ]
        for row in results["scaling"]:
            r = row["bayescurv"]
            if "error" in r:
                lines.append(f"| {row['config']} | failed: {r['error']} | | | | |")
                continue
            fit, tune, pred = r["times"]
            lines.append(
                f"| {row['config']} | {fit:.1f} ({r['cpu'][0]:.1f}) | {tune:.2f} | "
                f"{pred:.1f} | "
                f"{r['mem']:.0f} | {r['accuracy']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


def cells(result: dict[str, Any]) -> str:
    if "error" in result:
        return result["error"]
    fit, tune, pred = result["times"]
    return f"{fit:.1f} / {tune:.1f} / {pred:.1f} / {result['mem']:.0f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["digits", "scaling", "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="smoke test")
    parser.add_argument("--timeout", type=float, default=1200.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        result = worker(json.loads(args.worker))
        print(json.dumps(result))
        return
    results: dict[str, Any] = {
        "command": "python -m experiments.bench_gp " + " ".join(argv or sys.argv[1:]),
        "torch": torch.__version__,
        "load": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("digits", "both"):
            results["digits"] = digits_part(Path(tmp), args.quick, args.timeout)
        if args.part in ("scaling", "both"):
            results["scaling"] = scaling_part(Path(tmp), args.quick, args.timeout)
    results["load_after"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    for row in results.get("digits", []):
        for key in ("bayescurv", "laplace_torch"):
            row[key].pop("probs", None)
    for row in results.get("scaling", []):
        row["bayescurv"].pop("probs", None)
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "bench_gp.json"
    if saved.exists() and args.part != "both":  # keep the other part's rows
        previous = json.loads(saved.read_text())
        other = "scaling" if args.part == "digits" else "digits"
        if other in previous:
            results[other] = previous[other]
            results["command"] += f" (the {other} rows from an earlier run)"
    saved.write_text(json.dumps(results, indent=1))
    (args.out / "bench_gp.md").write_text(markdown(results))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
