"""Benchmark: the cost of BackPACK code on ``bayescurv.compat.backpack``.

For each model of ``bench_engine.py`` and extension, three ways to get the quantity,
each timed as a ratio to a plain gradient step (forward + ``loss.backward()``) in the
same run, alternating with it (median over ``--repeats`` pairs):

* ``engine``: ``bayescurv.engine.backprop`` (one forward, one sweep, ``.grad``);
* ``compat``: BackPACK's code with the import swapped: the user's forward, the
  compat layer's replay through the engine inside ``loss.backward()``, and the normal
  backward pass that writes ``.grad``;
* ``backpack``: BackPACK itself on an extended copy (``n/a`` if not installed).

The ``compat / engine`` column (the two timed alternately, directly) is the compat
layer's overhead: the user's own forward and backward pass (which writes ``.grad``)
run besides the replay, whose engine sweep skips the gradient
(``accumulate_grad=False``).

Run: ``python -m experiments.bench_compat_backpack`` (``--quick``: small batches,
few repeats).
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from bayescurv import engine
from bayescurv.compat import backpack as compat
from experiments.bench_engine import (
    MODELS,
    Problem,
    Setting,
    backpack_runner,
    engine_step,
    gradient_step,
    has_backpack,
    make_problem,
    median_times,
)

EXTENSIONS = {
    "mlp": ("BatchGrad", "Variance", "DiagGGNExact", "DiagGGNMC", "KFAC", "KFLR"),
    "3c3d10": ("BatchGrad", "DiagGGNExact", "DiagGGNMC", "KFAC"),
}


def ratios(problem: Problem, name: str, repeats: int) -> dict[str, float | None]:
    """Time of each method over the time of a gradient step."""
    base = partial(gradient_step, problem)
    device = problem.inputs.device
    runners = {
        "engine": partial(engine_step, problem, getattr(engine, name)(), True),
        "compat": backpack_runner(problem, name, library=compat),
        "backpack": backpack_runner(problem, name) if has_backpack(name) else None,
    }
    out: dict[str, float | None] = {}
    for method, run in runners.items():
        if run is None:
            out[method] = None
            continue
        method_time, base_time = median_times(base, run, repeats, device)
        out[method] = method_time / base_time
    # the overhead alternates the two directly: load drift affects both alike
    compat_time, engine_time = median_times(
        runners["engine"], runners["compat"], repeats, device
    )
    out["compat / engine"] = compat_time / engine_time
    return out


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    repeats = 2 if args.quick else args.repeats
    print("| model | extension | engine | compat | BackPACK | compat / engine |")
    print("|---|---|---|---|---|---|")
    for model, names in EXTENSIONS.items():
        spec = MODELS[model]
        size = spec.quick_batch_size if args.quick else spec.batch_size
        problem = make_problem(Setting(model, size, "cpu"))
        for name in names:
            r = ratios(problem, name, repeats)
            cells = [_cell(r[m]) for m in ("engine", "compat", "backpack")]
            cells.append(_cell(r["compat / engine"]))
            print(f"| {model} | {name} | {' | '.join(cells)} |")
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, CPU")


if __name__ == "__main__":
    main()
