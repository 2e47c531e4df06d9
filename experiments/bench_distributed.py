"""Benchmark: ``Laplace.fit`` across gloo processes on CPU, ranks x data size.

For ``R`` in ``--ranks`` the script spawns ``R`` processes (gloo, one thread each);
every rank fits all-weights Laplace approximations of a tanh MLP ``64-32-10``
(2,410 weights, random initialization, Gaussian inputs, random labels; nothing is
trained or downloaded) on its contiguous ``N / R`` shard (batches of 128), for every
structure in ``--structures`` and data size ``N`` in ``--sizes``. ``R = 1`` is a
plain single-process fit (no communication).

Per configuration (median over ``--repeats`` after one warm-up fit):

* ``fit s``: wall-clock seconds of ``la.fit`` on the slowest rank;
* ``cpu s``: that rank's process CPU seconds (steadier on a shared machine);
* ``wait s``: the handshake (an all-gather of three integers, just before the
  all-reduce): the time the ranks wait for each other (stragglers);
* ``reduce s``: the all-reduce(s) of the accumulated sums;
* ``bytes``: the bytes all-reduced, summed from the tensors handed to
  ``torch.distributed.all_reduce``, and checked against
  :func:`~bayescurv.laplace.distributed.message_entries` times 8 (float64) for
  the structures reduced in one all-reduce (``lowrank`` beyond 512 weights adds one
  ``[P, k]`` all-reduce per GGN product of its subspace iteration, counted in
  ``calls``).

The evidence of every rank is compared with rank 0's (bitwise) and with the ``R = 1``
fit (relative :data:`EVIDENCE_TOL`): the benchmark also checks what it times.

Run: ``OMP_NUM_THREADS=1 nice -n 10 python -m experiments.bench_distributed``
(``--quick`` for a smoke test; writes ``docs/results/bench_distributed.md`` and
``.json`` unless ``--out`` says otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import distributed as dist
from torch import multiprocessing as mp
from torch import nn

from bayescurv import Laplace
from bayescurv.laplace.distributed import message_entries
from experiments.report import markdown_table

STRUCTURES = ("full", "kron", "diag", "lowrank")
WIDTHS = (64, 32, 10)
BATCH = 128
DEFAULT_OUT = Path("docs/results/bench_distributed")
EVIDENCE_TOL = 1e-5
"""Relative evidence gap to one rank allowed (float32 losses summed per shard)."""


def make_model() -> nn.Module:
    """The MLP ``64-32-10`` (tanh) at a fixed random initialization."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(WIDTHS[0], WIDTHS[1]), nn.Tanh(), nn.Linear(WIDTHS[1], WIDTHS[2])
    )


def shard(n: int, rank: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's contiguous share of ``n`` synthetic points, in batches."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, WIDTHS[0], generator=gen)
    y = torch.randint(0, WIDTHS[-1], (n,), generator=gen)
    lo, hi = n * rank // world, n * (rank + 1) // world
    return [
        (x[i : min(i + BATCH, hi)], y[i : min(i + BATCH, hi)])
        for i in range(lo, hi, BATCH)
    ]


class Clock:
    """Times and sizes the collectives a fit calls (wraps ``torch.distributed``)."""

    def __init__(self) -> None:
        self.reset()
        for name in ("all_reduce", "all_gather"):
            setattr(dist, name, self._timed(name, getattr(dist, name)))

    def reset(self) -> None:
        """Forget what was recorded."""
        self.seconds = {"all_reduce": 0.0, "all_gather": 0.0}
        self.calls, self.nbytes = 0, 0

    def _timed(self, name: str, function):
        def timed(tensor, *args, **kwargs):
            start = time.perf_counter()
            result = function(tensor, *args, **kwargs)
            self.seconds[name] += time.perf_counter() - start
            if name == "all_reduce":
                self.calls += 1
                self.nbytes += tensor.numel() * tensor.element_size()
            return result

        return timed


def _one_fit(structure: str, n: int, rank: int, world: int, clock: Clock) -> dict:
    generator = torch.Generator().manual_seed(0)  # lowrank's start, as distributed
    la = Laplace(
        make_model(), "classification", "all", structure, rank=10, generator=generator
    )
    data = shard(n, rank, world)
    if world > 1:
        dist.barrier()
    clock.reset()
    wall, cpu = time.perf_counter(), time.process_time()
    la.fit(data)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "fit s": wall,
        "cpu s": cpu,
        "wait s": clock.seconds["all_gather"],
        "reduce s": clock.seconds["all_reduce"],
        "calls": clock.calls,
        "bytes": clock.nbytes,
        "evidence": float(la.log_marginal_likelihood()),
        "P": la.n_params,
    }


def _worker(rank: int, world: int, store: str, out: str, plan: dict) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", f"file://{store}", rank=rank, world_size=world)
    clock = Clock()
    try:
        results = {}
        for structure in plan["structures"]:
            _one_fit(structure, 2 * BATCH * world, rank, world, clock)  # warm-up
            for n in plan["sizes"]:
                runs = [
                    _one_fit(structure, n, rank, world, clock)
                    for _ in range(plan["repeats"])
                ]
                results[(structure, n)] = runs
        torch.save(results, f"{out}.{rank}")
    finally:
        if world > 1:
            dist.destroy_process_group()


def run_world(world: int, plan: dict) -> list[dict]:
    """Spawn ``world`` ranks; their results ``{(structure, n): [run, ...]}``."""
    with tempfile.TemporaryDirectory() as tmp:
        store, out = os.path.join(tmp, "store"), os.path.join(tmp, "out")
        mp.spawn(_worker, args=(world, store, out, plan), nprocs=world, join=True)
        return [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]


def expected_bytes(structure: str) -> int:
    """The formula: :func:`message_entries` of the MLP, float64."""
    model = make_model()
    shapes = [tuple(p.shape) for p in model.parameters()]
    return 8 * message_entries(structure, shapes)


def summarize(world: int, ranks: list[dict], key: tuple[str, int]) -> dict[str, Any]:
    """Medians over repeats of the slowest rank; checks bytes and evidence."""
    row: dict[str, Any] = {"ranks": world, "structure": key[0], "N": key[1]}
    repeats = len(ranks[0][key])
    slowest = [
        max((r[key][i] for r in ranks), key=lambda x: x["fit s"])
        for i in range(repeats)
    ]
    for name in ("fit s", "cpu s", "wait s", "reduce s"):
        row[name] = statistics.median(run[name] for run in slowest)
    first = ranks[0][key][0]
    row["calls"], row["bytes"], row["evidence"] = (
        first["calls"],
        first["bytes"],
        first["evidence"],
    )
    row["identical on every rank"] = all(
        run["evidence"] == first["evidence"] for r in ranks for run in r[key]
    )
    if world > 1 and row["calls"] == 1:
        row["formula bytes"] = expected_bytes(key[0])
        row["bytes match formula"] = row["bytes"] == row["formula bytes"]
    return row


def main() -> None:
    """Run the benchmark, print the table, write the markdown and JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--structures", nargs="+", default=list(STRUCTURES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument(
        "--from-json", type=Path, help="only re-render the markdown of a saved run"
    )
    args = parser.parse_args()
    if args.from_json is not None:
        write_markdown(json.loads(args.from_json.read_text()), args.out)
        return
    if args.quick:
        args.ranks, args.sizes, args.repeats = [1, 2], [512], 1
    plan = {"structures": args.structures, "sizes": args.sizes, "repeats": args.repeats}
    load = [_uptime()]
    rows = []
    for world in args.ranks:
        ranks = run_world(world, plan)
        rows += [summarize(world, ranks, key) for key in ranks[0]]
        load.append(_uptime())
    _check_against_single(rows)
    write(rows, load, args)


def _check_against_single(rows: list[dict]) -> None:
    single = {(r["structure"], r["N"]): r for r in rows if r["ranks"] == 1}
    for row in rows:
        base = single.get((row["structure"], row["N"]))
        if base is not None:
            row["speed-up"] = base["fit s"] / row["fit s"]
            row["cpu speed-up"] = base["cpu s"] / row["cpu s"]
            gap = abs(row["evidence"] - base["evidence"]) / abs(base["evidence"])
            row["evidence vs 1 rank"] = gap


def _uptime() -> str:
    return subprocess.run(
        ["uptime"], check=False, capture_output=True, text=True
    ).stdout.strip()


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def table(rows: list[dict]) -> str:
    """The markdown table of the rows."""
    header = [
        "structure", "N", "ranks", "fit s", "cpu s / rank", "speed-up wall (cpu)",
        "wait s", "all-reduce s", "comm. share", "all-reduces", "bytes (formula)",
    ]  # fmt: skip
    body = []
    for r in sorted(
        rows, key=lambda r: (STRUCTURES.index(r["structure"]), r["N"], r["ranks"])
    ):
        share = (r["wait s"] + r["reduce s"]) / r["fit s"]
        formula = r.get("formula bytes")
        size = "0" if r["ranks"] == 1 else _fmt_bytes(r["bytes"])
        if formula is not None:
            size += (
                " (= formula)" if r["bytes match formula"] else f" (formula {formula})"
            )
        body.append([
            r["structure"], str(r["N"]), str(r["ranks"]), f"{r['fit s']:.3f}",
            f"{r['cpu s']:.3f}", f"{r['speed-up']:.2f} ({r['cpu speed-up']:.2f})",
            f"{r['wait s']:.3f}", f"{r['reduce s']:.3f}", f"{share:.0%}",
            str(r["calls"]), size,
        ])  # fmt: skip
    return markdown_table(header, body)


def write(rows: list[dict], load: list[str], args: argparse.Namespace) -> None:
    """Print the table; write ``args.out`` ``.md`` and ``.json``."""
    print(table(rows))
    print("\n".join(load))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "rows": rows,
        "uptime": load,
        "commit": _commit(),
        "args": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
        },
    }
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    write_markdown(payload, args.out)


HEADER = """# Distributed fit: ranks x data size (gloo, CPU)

Generated by

```
OMP_NUM_THREADS=1 nice -n 10 python -m experiments.bench_distributed
```

(commit `{commit}`; JSON: [bench_distributed.json](bench_distributed.json)). All-weights
Laplace of a tanh MLP 64-32-10 (P = 2,410, random initialization, Gaussian inputs,
random labels), `la.fit` on contiguous shards of N / ranks points (batches of 128), one
thread per rank, median of {repeats} fits after a warm-up. `fit s`: wall-clock seconds
of the slowest rank; `cpu s / rank`: its process CPU seconds; speed-up: one rank's
time over this one's, wall-clock and (in parentheses) CPU; `wait s`: the handshake's
all-gather, i.e. waiting for the other ranks; `all-reduce s`: the all-reduce(s) of the
sums; comm. share: (wait + all-reduce) / fit, wall-clock; bytes: summed over the tensors
handed to `all_reduce`, checked against `message_entries` x 8 (float64).

**The machine has 2 cores shared with other jobs** (load below): 4 ranks cannot be
faster than 2, and wall-clock times follow the load of other jobs more than the ranks.
The CPU time per rank is the measurement of the compute per rank; see
[the distributed guide](../distributed.md) for the reading.
"""


def write_markdown(payload: dict[str, Any], out: Path) -> None:
    """The markdown page of a run (``payload`` as saved in the JSON)."""
    rows = payload["rows"]
    ok = all(r["identical on every rank"] for r in rows) and all(
        r.get("evidence vs 1 rank", 0) < EVIDENCE_TOL
        and r.get("bytes match formula", True)
        for r in rows
    )
    summary = "yes" if ok else "NO (see the JSON)"
    header = HEADER.format(
        commit=payload.get("commit", "?"), repeats=payload["args"]["repeats"]
    )
    out.with_suffix(".md").write_text(
        f"{header}\n{table(rows)}\n\n"
        f"Evidence bitwise equal on every rank, within {EVIDENCE_TOL:g} of one rank "
        "(float32 model, float64 curvature), bytes equal "
        f"to the formula: {summary}.\n\nLoad (`uptime`) before and after each world "
        "size:\n\n```\n" + "\n".join(payload["uptime"]) + "\n```\n"
    )


def _commit() -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        check=False,
        capture_output=True,
        text=True,
    ).stdout.strip()


if __name__ == "__main__":
    main()
