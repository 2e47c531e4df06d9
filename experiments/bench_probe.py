"""Benchmark: the cost of the engine's sample-separability probe.

For the models of ``bench_engine.py`` (``mlp``, ``3c3d10``) and a few extensions,
``engine.backprop`` runs with the probe and with it switched off (the engine's probe
functions replaced by a plain backward pass, for this measurement only), alternating,
and a plain gradient step (forward + ``loss.backward()``) in the same loop. Times are
this process's CPU time (``time.process_time``) with one thread, which is less
sensitive to the load of a shared machine than wall time; medians over ``--repeats``.

Printed per row: time with / without the probe, and the probe's cost in gradient
steps. See docs/engine.md, "Which rows belong to which sample".

Run: ``python -m experiments.bench_probe`` (``--repeats``, ``--models``).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from bayescurv import engine
from experiments.bench_engine import (
    MODELS,
    Problem,
    Setting,
    gradient_step,
    make_problem,
)

EXTENSIONS = [engine.BatchGrad(), engine.DiagGGNExact(), engine.KFLR()]
_BACKPROP = importlib.import_module("bayescurv.engine.backprop")


def _plain(
    output: Tensor, records: list, column: Tensor, model: nn.Module, graph: bool
) -> list[Tensor | None]:
    """The gradient pass without the probe's split."""
    return list(
        torch.autograd.grad(
            output,
            [rec.output for rec in records],
            column,
            retain_graph=True,
            create_graph=graph,
            allow_unused=True,
        )
    )


@contextmanager
def probe(enabled: bool):
    """Run the engine with or without the probe.

    With it, the probe runs even on the chains that skip it in the engine (NOTE
    [Chains that need no probe]; both benchmark models are such chains), so its cost
    is what any other model of that size pays.
    """
    saved = (
        _BACKPROP.check_separable,
        _BACKPROP.pull_back_by_halves,
        _BACKPROP.separable_by_construction,
    )
    _BACKPROP.separable_by_construction = lambda *args: False
    if not enabled:
        _BACKPROP.check_separable = lambda *args: None
        _BACKPROP.pull_back_by_halves = _plain
    try:
        yield
    finally:
        (
            _BACKPROP.check_separable,
            _BACKPROP.pull_back_by_halves,
            _BACKPROP.separable_by_construction,
        ) = saved


def measure(problem: Problem, ext: engine.Extension, repeats: int) -> dict[str, float]:
    """Median CPU seconds with the probe, without it, and of a gradient step."""

    def call() -> None:
        problem.model.zero_grad()
        engine.backprop(
            problem.model, problem.loss_func, problem.inputs, problem.targets, [ext]
        )

    runs: dict[str, Callable[[], object]] = {
        "with": call,
        "without": call,
        "gradient": lambda: gradient_step(problem),
    }
    times: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(repeats + 1):  # the first round warms up
        for key, run in runs.items():
            with probe(key != "without"):
                start = time.process_time()
                run()
                times[key].append(time.process_time() - start)
    return {key: statistics.median(values[1:]) for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--models", default="mlp,3c3d10")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'model':8s} {'extension':14s} {'with/without':>13s} {'probe/grad':>11s}")
    for name in args.models.split(","):
        spec = MODELS[name]
        problem = make_problem(Setting(name, spec.batch_size, "cpu"))
        for ext in EXTENSIONS:
            t = measure(problem, ext, args.repeats)
            ratio = t["with"] / t["without"]
            cost = (t["with"] - t["without"]) / t["gradient"]
            print(f"{name:8s} {type(ext).__name__:14s} {ratio:13.3f} {cost:11.2f}")


if __name__ == "__main__":
    main()
