"""Benchmark: Cockpit presets and ViViT's ``ggn_eigen`` as ratios to a plain step.

Model: DeepOBS' 3C3D CNN with 10 classes (``cnn_3c3d`` of ``bench_engine.py``) on
synthetic ``[N, 3, 32, 32]`` inputs, ``nn.CrossEntropyLoss()``, SGD.

* **Cockpit presets** (N = 64): the time of training steps watched by a
  ``Cockpit(model, loss, preset=...)`` divided by the time of plain training steps
  (``zero_grad``, forward, ``loss.backward()``, ``optimizer.step()``). Two numbers per
  preset: *amortized*, the average over one period of the preset's default schedules
  (the least common multiple of ``FIRST_ORDER_INTERVAL`` and ``CURVATURE_INTERVAL``
  consecutive steps, see ``bayescurv.cockpit.presets``), and *all at once*, one step
  at which every instrument of the preset runs.
* **ggn_eigen** (N = 16, so that the square root, ``[C, N, P]``, fits in memory): the
  time of ``vivit.ggn_eigen(model, loss, x, y)`` divided by a gradient step
  (forward + backward), beside the engine's ``SqrtGGNExact`` sweep and, if BackPACK
  is installed, BackPACK's ``SqrtGGNExact``, each plus the Gram matrix and its
  eigendecomposition.

Timing: the method and its baseline alternate after a warm-up and the ratio is
median(method) / median(baseline) over ``--repeats`` pairs, so drift in machine load
affects both alike. The thread count is torch's default (``--threads``).

Run: ``python -m experiments.bench_cockpit`` (``--quick`` for a smoke test).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from bayescurv import cockpit, engine, vivit
from experiments.bench_engine import cnn_3c3d

try:
    import backpack
    from backpack import extensions as backpack_extensions
except ImportError:  # optional comparison
    backpack = None
    backpack_extensions = None

DEFAULT_JSON = Path(__file__).parent / "results" / "bench_cockpit.json"
PRESETS = ("economy", "business", "full")


def make_batch(batch_size: int, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    """The 3C3D network and a synthetic CIFAR-shaped batch."""
    torch.manual_seed(seed)
    model = cnn_3c3d(10)
    inputs = torch.randn(batch_size, 3, 32, 32)
    targets = torch.randint(10, (batch_size,))
    return model, inputs, targets


def median_ratio(
    run: Callable[[], object], base: Callable[[], object], repeats: int
) -> float:
    """median(run) / median(base), alternating after one warm-up call each."""
    base()
    run()
    run_times, base_times = [], []
    for _ in range(repeats):
        for fn, times in ((base, base_times), (run, run_times)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(run_times) / statistics.median(base_times)


def preset_ratios(batch_size: int, repeats: int) -> dict[str, dict[str, float]]:
    """Amortized and all-at-once cost of each preset relative to plain steps."""
    model, x, y = make_batch(batch_size)
    loss_func = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    presets = cockpit.presets
    period = math.lcm(presets.FIRST_ORDER_INTERVAL, presets.CURVATURE_INTERVAL)

    def plain(steps: int) -> Callable[[], None]:
        def run() -> None:
            for _ in range(steps):
                optimizer.zero_grad()
                loss_func(model(x), y).backward()
                optimizer.step()

        return run

    def watched(preset: str, steps: int, schedule=None) -> Callable[[], None]:
        gen = torch.Generator().manual_seed(0)
        pit = cockpit.Cockpit(
            model,
            loss_func,
            preset=preset,
            schedule=schedule,
            optimizer=optimizer,
            generator=gen,
        )

        def run() -> None:
            for _ in range(steps):
                with pit.step(x, y):
                    optimizer.step()

        return run

    results = {}
    for preset in PRESETS:
        amortized = median_ratio(watched(preset, period), plain(period), repeats)
        everything = cockpit.schedules.every(1)
        at_once = median_ratio(watched(preset, 1, everything), plain(1), repeats)
        results[preset] = {"amortized": amortized, "all_at_once": at_once}
        print(
            f"  {preset:9s} amortized {amortized:5.2f}   all at once {at_once:5.2f}",
            flush=True,
        )
    return results


def _gram_eigen(columns: list[Tensor]) -> Tensor:
    flat = [c.flatten(2).flatten(0, 1) for c in columns]
    gram = sum(f @ f.T for f in flat)
    return torch.linalg.eigh(gram).eigenvalues


def vivit_ratios(batch_size: int, repeats: int) -> dict[str, float]:
    """``ggn_eigen`` and square root + Gram eigendecomposition vs a gradient step."""
    model, x, y = make_batch(batch_size)
    loss_func = nn.CrossEntropyLoss()

    def gradient() -> None:
        model.zero_grad()
        loss_func(model(x), y).backward()

    def eigen(k: int | None) -> Callable[[], None]:
        return lambda: vivit.ggn_eigen(model, loss_func, x, y, k=k)

    def engine_sqrt() -> None:
        res = engine.backprop(model, loss_func, x, y, [engine.SqrtGGNExact()])
        _gram_eigen(list(res["sqrt_ggn_exact"].values()))

    results = {
        "ggn_eigen (k=10)": median_ratio(eigen(10), gradient, repeats),
        "ggn_eigen (all eigenpairs)": median_ratio(eigen(None), gradient, repeats),
        "engine SqrtGGNExact + Gram eigh": median_ratio(engine_sqrt, gradient, repeats),
    }
    if backpack is not None:
        # BackPACK's full backward hooks warn when the input needs no grad
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        extended = backpack.extend(copy.deepcopy(model))
        extended_loss = backpack.extend(copy.deepcopy(loss_func))

        def backpack_sqrt() -> None:
            extended.zero_grad()
            loss = extended_loss(extended(x), y)
            with backpack.backpack(backpack_extensions.SqrtGGNExact()):
                loss.backward()
            _gram_eigen([p.sqrt_ggn_exact for p in extended.parameters()])

        results["BackPACK SqrtGGNExact + Gram eigh"] = median_ratio(
            backpack_sqrt, gradient, repeats
        )
    for name, ratio in results.items():
        print(f"  {name:34s} {ratio:5.2f}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny batches, 1 repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=("presets", "ggn_eigen"),
        default=["presets", "ggn_eigen"],
        help="what to measure (the JSON keeps the other part's last results)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    cockpit_batch, vivit_batch = (4, 2) if args.quick else (64, 16)
    print(f"threads {torch.get_num_threads()}, repeats {repeats}")
    record = {}
    if "presets" in args.parts:
        print(f"Cockpit presets, 3C3D, N={cockpit_batch} (ratio to a training step)")
        record["presets"] = {
            "threads": torch.get_num_threads(),
            "repeats": repeats,
            "batch_size": cockpit_batch,
            "ratios": preset_ratios(cockpit_batch, repeats),
        }
    if "ggn_eigen" in args.parts:
        print(f"ggn_eigen, 3C3D, N={vivit_batch} (ratio to a gradient step)")
        record["ggn_eigen"] = {
            "threads": torch.get_num_threads(),
            "repeats": repeats,
            "batch_size": vivit_batch,
            "ratios": vivit_ratios(vivit_batch, repeats),
        }
    if not args.quick:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        previous = json.loads(args.json.read_text()) if args.json.exists() else {}
        args.json.write_text(json.dumps(previous | record, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
