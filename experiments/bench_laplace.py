"""Benchmark: Laplace fit + evidence tuning + GLM predictive, beside laplace-torch.

Problems (trained to a MAP inside the script, fixed seed):

* ``digits100`` / ``digits50``: scikit-learn's digits (8x8 images, 10 classes),
  standardized, 1,400 training and 397 test points; MLP 64-100-10 / 64-50-10 (tanh);
  ``likelihood="classification"``;
* ``sine``: 1-D regression ``y = sin(3x) + 0.1 noise`` on 1,400 points, MLP 1-50-1
  (tanh); ``likelihood="regression"``.

For every subset (``last_layer``, ``all``, ``subnetwork``: the 500 largest weights,
at most half of them)
and structure (``kron``, ``full``, ``diag``, ``lowrank``) the script times, per
library,

* ``fit``: ``la.fit(train_loader)`` (batches of 100);
* ``tune``: ``la.optimize_prior_precision(method="marglik", n_steps=100,
  prior_structure="scalar")``;
* ``predict``: the GLM predictive on the test set (probit for classification,
  ``(f_mu, f_var)`` for regression).

Each (library, problem, subset, structure) runs in a fresh child process: it trains
nothing (the MAP weights are trained once by the parent and loaded), runs the three
steps once on 100 training points (warm-up: lazy kernels, imports), resets the peak
resident set size (``/proc/self/clear_refs``, Linux) and then runs the three timed
steps; ``mem`` is the increase of the peak RSS (``VmHWM``) over the RSS before the
timed steps, in MB. Configurations laplace-torch does not support (or that fail)
show ``n/a``. The speed-up is laplace-torch's total over bayescurv's, in wall-clock
time and (in parentheses) process CPU time; on a machine shared with other jobs the
CPU-time ratio is the steadier one. The JSON holds both, per step.

Run: ``python experiments/bench_laplace.py`` (``--quick`` for a smoke test,
``--json PATH`` to save the table, ``--n-predict 1400`` to predict on 1,400 inputs:
the test set, then training inputs).
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

PROBLEMS = ("digits100", "digits50", "sine")
SUBSETS = ("last_layer", "all", "subnetwork")
STRUCTURES = ("kron", "full", "diag", "lowrank")
LIBRARIES = ("bayescurv", "laplace-torch")
N_TRAIN = 1_400
BATCH = 100
SUBNET_SIZE = 500
TUNE_STEPS = 100
DEFAULT_JSON = Path("experiments/results/bench_laplace.json")


# ---------------------------------------------------------------- problems
def make_data(problem: str) -> tuple[torch.Tensor, ...]:
    """Train and test tensors of a problem (float32)."""
    if problem.startswith("digits"):
        from sklearn.datasets import load_digits  # noqa: PLC0415

        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x, dtype=torch.float32)
        x = (x - x.mean(0)) / (x.std(0) + 1e-3)
        y = torch.tensor(y)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        x, y = x[perm], y[perm]
        return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(N_TRAIN + 400, 1, generator=gen) * 4 - 2
    y = torch.sin(3 * x) + 0.1 * torch.randn(x.shape, generator=gen)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def make_model(problem: str) -> nn.Module:
    """The MLP of a problem (untrained)."""
    torch.manual_seed(0)
    if problem == "sine":
        return nn.Sequential(nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 1))
    hidden = int(problem.removeprefix("digits"))
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))


def train(problem: str, path: Path) -> float:
    """Train the MAP (Adam, weight decay) and save it; returns the test metric."""
    x, y, x_test, y_test = make_data(problem)
    model = make_model(problem)
    loss_func = nn.MSELoss() if problem == "sine" else nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    loader = DataLoader(
        TensorDataset(x, y),
        batch_size=BATCH,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    for _ in range(300 if problem == "sine" else 60):
        for xb, yb in loader:
            optimizer.zero_grad()
            loss_func(model(xb), yb).backward()
            optimizer.step()
    torch.save(model.state_dict(), path)
    with torch.no_grad():
        out = model(x_test)
    if problem == "sine":
        return (out - y_test).square().mean().item()
    return (out.argmax(1) == y_test).float().mean().item()


# ------------------------------------------------------------------ worker
def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


def current_rss_mb() -> float:
    """Current resident set size (VmRSS), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def build(config: dict[str, Any], model: nn.Module) -> Any:
    """A Laplace object of the requested library and configuration."""
    library, problem = config["library"], config["problem"]
    likelihood = "regression" if problem == "sine" else "classification"
    kwargs: dict[str, Any] = {}
    if config["subset"] == "subnetwork":
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        size = min(SUBNET_SIZE, flat.numel() // 2)
        kwargs["subnetwork_indices"] = flat.abs().topk(size).indices.sort()[0]
    if likelihood == "regression":
        kwargs["sigma_noise"] = 0.1
    if library == "bayescurv":
        from bayescurv import Laplace  # noqa: PLC0415
    else:
        from laplace import Laplace  # noqa: PLC0415
    return Laplace(
        model,
        likelihood,
        subset_of_weights=config["subset"],
        hessian_structure=config["structure"],
        **kwargs,
    )


def run_steps(la: Any, loader: DataLoader, x_test: torch.Tensor) -> dict[str, list]:
    """Time fit, tune and predict: wall-clock and process CPU seconds of each."""
    steps = [
        lambda: la.fit(loader),
        lambda: la.optimize_prior_precision(
            method="marglik", n_steps=TUNE_STEPS, prior_structure="scalar"
        ),
        lambda: la(x_test, pred_type="glm", link_approx="probit"),
    ]
    wall, cpu = [], []
    for step in steps:
        start, start_cpu = time.perf_counter(), time.process_time()
        out = step()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    out = out[1] if isinstance(out, tuple) else out
    if not torch.isfinite(out).all():
        raise RuntimeError("non-finite predictions")
    return {"times": wall, "cpu": cpu}


def worker(config: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration (in a child process) and return its measurements."""
    import warnings  # noqa: PLC0415

    warnings.filterwarnings("ignore")
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    problem = config["problem"]
    x, y, x_test, _ = make_data(problem)
    model = make_model(problem)
    model.load_state_dict(torch.load(config["weights"], weights_only=True))
    model.eval()
    warm = DataLoader(TensorDataset(x[:BATCH], y[:BATCH]), batch_size=BATCH)
    run_steps(build(config, model), warm, x_test[:10])
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    la = build(config, model)
    before = current_rss_mb()
    reset_peak_rss()
    if config.get("n_predict"):  # the test points, then training inputs
        x_test = torch.cat([x_test, x])[: config["n_predict"]]
    result = run_steps(la, loader, x_test)
    return {**result, "mem": max(peak_rss_mb() - before, 0.0)}


def run_child(config: dict[str, Any], timeout: float) -> dict[str, Any] | None:
    """Run a configuration in a fresh process; ``None`` if it failed."""
    root = str(Path(__file__).resolve().parents[1])  # this checkout's bayescurv
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [root, *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    }
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(config)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s", "timeout": timeout}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------- table
def laplace_torch_available() -> bool:
    """Whether laplace-torch imports."""
    try:
        import laplace  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def fmt(result: dict[str, Any] | None) -> str:
    if result is None:
        return "not installed"
    if "error" in result:
        return "n/a"
    fit, tune, predict = result["times"]
    return f"{fit:6.2f} {tune:6.2f} {predict:6.2f} {result['mem']:6.0f}"


def main(argv: list[str] | None = None) -> None:
    """Run every configuration and print/save the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test")
    parser.add_argument("--problems", default=",".join(PROBLEMS))
    parser.add_argument("--subsets", default=",".join(SUBSETS))
    parser.add_argument("--structures", default=",".join(STRUCTURES))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: torch's default)"
    )
    parser.add_argument(
        "--n-predict",
        type=int,
        default=0,
        help="inputs of the predict step (0: the test set; more: then train inputs)",
    )
    parser.add_argument(
        "--libraries", default=",".join(LIBRARIES), help="e.g. bayescurv only"
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    problems = args.problems.split(",")
    subsets, structures = args.subsets.split(","), args.structures.split(",")
    if args.quick:
        problems, subsets, structures = ["digits50"], ["last_layer"], ["kron", "diag"]
    other = "laplace-torch" in args.libraries and laplace_torch_available()
    threads = args.threads or torch.get_num_threads()
    print(
        f"torch {torch.__version__}, threads {threads}, "
        f"laplace-torch {'installed' if other else 'not installed'}"
    )
    header = f"{'problem':10} {'subset':11} {'struct':8} " + " | ".join(
        f"{lib + ': fit tune pred MB':>27}" for lib in LIBRARIES
    )
    print(header + " | speed-up")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for problem in problems:
            weights = Path(tmp) / f"{problem}.pt"
            metric = train(problem, weights)
            for subset in subsets:
                for structure in structures:
                    base = {
                        "problem": problem,
                        "subset": subset,
                        "structure": structure,
                        "weights": str(weights),
                        "threads": args.threads,
                        "n_predict": args.n_predict,
                    }
                    ours = run_child({**base, "library": "bayescurv"}, args.timeout)
                    theirs = (
                        run_child({**base, "library": "laplace-torch"}, args.timeout)
                        if other
                        else None
                    )
                    speedup = _speedup(ours, theirs)
                    print(
                        f"{problem:10} {subset:11} {structure:8} "
                        f"{fmt(ours):>27} | {fmt(theirs):>27} | {speedup}",
                        flush=True,
                    )
                    rows.append(
                        {
                            **base,
                            "metric": metric,
                            "bayescurv": ours,
                            "laplace_torch": theirs,
                            "speedup": speedup,
                        }
                    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        for row in rows:
            row.pop("weights")
        args.json.write_text(json.dumps(rows, indent=1))


def _speedup(ours: dict | None, theirs: dict | None) -> str:
    """Total time ratio laplace-torch / bayescurv: wall-clock (process CPU time)."""
    if ours and "error" in ours:
        return f"ours failed: {ours['error']}"
    if theirs and theirs.get("error", "").startswith("timeout") and ours:
        # laplace-torch ran out of time: its total is at least the timeout
        bound = theirs["timeout"] / sum(ours["times"])
        return f">={bound:.0f}x (laplace-torch: {theirs['error']})"
    if not ours or not theirs or "error" in theirs:
        return ""
    wall = sum(theirs["times"]) / sum(ours["times"])
    cpu = sum(theirs["cpu"]) / sum(ours["cpu"])
    return f"{wall:.1f}x ({cpu:.1f}x)"


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
