"""Benchmark: time and peak memory of each engine extension relative to a gradient step.

Models (synthetic data, ``nn.CrossEntropyLoss(reduction="mean")``):

* ``mlp``: Flatten, 784-512-256-10 with ReLU, on inputs ``[128, 1, 28, 28]``;
* ``3c3d10`` / ``3c3d100``: DeepOBS' CIFAR 3C3D net (three conv + max-pool blocks,
  then 512-256-C) with C = 10 / 100 classes, on inputs ``[64, 3, 32, 32]``;
* ``resnet18`` (only when named in ``--models``): torchvision's ResNet-18
  (``experiments/resnet.py``) in eval mode with 10 classes on inputs
  ``[16, 3, 32, 32]``, whose deep convolutions see 4x4 to 1x1 maps. The Hessian
  diagonals are skipped (its residual graph needs per-sample Hessians w.r.t. each
  convolution's output, 16 GiB at this batch) and so is BackPACK (residual
  connections need its module converter, which this benchmark does not use).

For each extension the cost of ``engine.backprop(model, loss, x, y, [extension])`` is
divided by the cost of a plain gradient step (forward + ``loss.backward()``) measured
in the same run; both include the forward pass and start from ``model.zero_grad()``.
If BackPACK (``backpack-for-pytorch``) is importable, its extension with the same name
is measured the same way on an extended copy of the model (``n/a`` otherwise).

Time: the gradient step, our extension and BackPACK's take turns (after one warm-up
call each) and each ratio is median(method) / median(gradient step) over ``--repeats``
rounds, so drift in machine load affects all three alike; ``vs BP`` is
median(ours) / median(BackPACK) of the same rounds. The thread count is torch's
default (``--threads``). ``--clock cpu`` times this process's CPU time instead of wall
time: with ``--threads 1`` on a shared machine it is far less sensitive to the other
jobs (time spent waiting for a core does not count; page faults do).

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` above the memory allocated before
the call. On CPU torch keeps no allocator statistics, so each memory measurement runs in
a fresh child process forked from a ``forkserver`` that has imported torch but never run
a workload, with fixed glibc malloc thresholds (see ``start_memory_server``). The child
builds the model and data, calls the method once on two samples (lazy kernel
initialization), resets its peak resident set size to the current one
(``/proc/self/clear_refs``; Linux), calls the method once on the full batch and reads
the new peak (``VmHWM``). The increase is the call's peak working memory (activations,
gradients, results, temporaries) above model + data; the ratio divides it by the same
increase for a gradient step. RSS counts touched pages, not tensors, so the ratios are
approximate (about a MB of allocator and page-granularity noise, which matters for the
small MLP, whose gradient step needs only a few MB).

Extra rows: ``DiagGGNExact-nograd`` is ``DiagGGNExact`` with ``accumulate_grad=False``
(no ``.grad``, so no gradient backward pass); ``Jacobian`` / ``Jacobian-factored`` are
``engine.Jacobian()`` / ``engine.Jacobian(factored=True)`` without a loss
(``loss_func=None``), and ``func:Jacobian`` the same per-sample Jacobians from
``torch.func`` (``vmap`` over samples of ``jacrev``), the baseline for them.

Extensions whose result alone would exceed ``--max-result-gb`` (e.g. ``SqrtGGNExact`` on
``3c3d100``: ``[C, N, *p]`` is 100 x 64 x 0.9 M floats, about 22 GB) are skipped, and so
are extensions on models they do not support (``KFRA`` needs a chain of ``Linear``
layers and activations: MLP only). The Kronecker extensions (``KFAC``, ``KFLR``,
``KFRA``) use the default ``kfac_approx="expand"`` (KFC on convolutions); the rows
``KFAC-reduce`` / ``KFLR-reduce`` use ``kfac_approx="reduce"``. On convolutions
BackPACK 1.7 computes neither: its factors are ``[B_reduce, L * A_expand]`` (L output
locations), so its ``B`` costs what our ``reduce`` one does and its ``A`` what our
``expand`` one does. Both our rows are compared with BackPACK's ``KFAC``/``KFLR``.

``--versus A,B`` instead times only two rows against each other, called alternately
(median of ``--repeats`` pairs), which is less sensitive to machine load than two
ratios to the gradient step measured one after the other, e.g. ``--versus
DiagGGNExact,DiagGGNExact-nograd`` for what ``accumulate_grad=False`` saves.

Run: ``python -m experiments.bench_engine`` from the repository root (``--quick`` for a
smoke test); ``-m`` imports the checkout's own ``bayescurv``, while ``python
experiments/bench_engine.py`` imports the installed one. Results of the issue-13 run:
docs/results/bench_engine.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from bayescurv import engine
from experiments.resnet import ResNet18

try:
    import backpack
    from backpack import extensions as backpack_extensions
except ImportError:  # optional comparison
    backpack = None
    backpack_extensions = None

EXTENSIONS = (
    "BatchGrad",
    "BatchL2Grad",
    "SumGradSquared",
    "Variance",
    "BatchDotGrad",
    "DiagGGNExact",
    "DiagGGNMC",
    "BatchDiagGGNExact",
    "BatchDiagGGNMC",
    "SqrtGGNExact",
    "SqrtGGNMC",
    "DiagHessian",
    "BatchDiagHessian",
    "KFAC",
    "KFLR",
    "KFRA",
    "KFAC-reduce",
    "KFLR-reduce",
    "DiagGGNExact-nograd",
    "Jacobian",
    "Jacobian-factored",
    "func:Jacobian",
)
"""Rows: engine extensions (``-nograd``: with ``accumulate_grad=False``;
``Jacobian-factored``: ``Jacobian(factored=True)``) and ``func:Jacobian``, the
per-sample Jacobians from ``torch.func`` (``vmap`` over samples of ``jacrev``)."""
UNSUPPORTED = {
    "KFRA": {"3c3d10", "3c3d100", "resnet18"},
    "DiagHessian": {"resnet18"},
    "BatchDiagHessian": {"resnet18"},
}
"""Extensions a model does not support (the engine raises on them)."""
GRADIENT = "gradient"
BACKPACK_PREFIX = "backpack:"
FUNC_JACOBIAN = "func:Jacobian"
DEFAULT_JSON = Path(__file__).parent / "results" / "bench_engine.json"


def mlp(num_classes: int) -> nn.Module:
    """Fully connected 784-512-256-C network with ReLU for ``[N, 1, 28, 28]``."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 512),
        nn.ReLU(),
        nn.Linear(512, 256),
        nn.ReLU(),
        nn.Linear(256, num_classes),
    )


def cnn_3c3d(num_classes: int) -> nn.Module:
    """DeepOBS' 3C3D network for ``[N, 3, 32, 32]`` (CIFAR) inputs."""
    features = nn.Sequential(
        nn.Conv2d(3, 64, 5),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(64, 96, 3),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(96, 128, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Flatten(),
    )
    with torch.no_grad():
        flat = features(torch.zeros(1, 3, 32, 32)).shape[1]
    return nn.Sequential(
        *features,
        nn.Linear(flat, 512),
        nn.ReLU(),
        nn.Linear(512, 256),
        nn.ReLU(),
        nn.Linear(256, num_classes),
    )


def resnet18(num_classes: int) -> nn.Module:
    """ResNet-18 (torchvision's architecture) in eval mode.

    Per-sample quantities need a forward whose samples do not interact, so the
    BatchNorm layers use their running statistics.
    """
    return ResNet18(num_classes).eval()


@dataclass(frozen=True)
class ModelSpec:
    """How to build one benchmark model and its data."""

    build: Callable[[int], nn.Module]
    num_classes: int
    input_shape: tuple[int, ...]
    batch_size: int
    quick_batch_size: int


MODELS = {
    "mlp": ModelSpec(mlp, 10, (1, 28, 28), 128, 16),
    "3c3d10": ModelSpec(cnn_3c3d, 10, (3, 32, 32), 64, 4),
    "3c3d100": ModelSpec(cnn_3c3d, 100, (3, 32, 32), 64, 4),
    "resnet18": ModelSpec(resnet18, 10, (3, 32, 32), 16, 2),
}
DEFAULT_MODELS = ("mlp", "3c3d10", "3c3d100")
NO_BACKPACK = {"resnet18"}
"""Models BackPACK is not run on (residual connections need its converter)."""


@dataclass(frozen=True)
class Setting:
    """Everything a (child) process needs to rebuild a problem; picklable."""

    model: str
    batch_size: int
    device: str
    seed: int = 0


@dataclass(frozen=True)
class Problem:
    """A model, its loss and one batch of synthetic data."""

    model: nn.Module
    loss_func: nn.Module
    inputs: Tensor
    targets: Tensor
    num_classes: int


def make_problem(setting: Setting) -> Problem:
    """Build the model and a random batch, identically in every process."""
    spec = MODELS[setting.model]
    torch.manual_seed(setting.seed)
    device = torch.device(setting.device)
    model = spec.build(spec.num_classes).to(device)
    inputs = torch.randn(setting.batch_size, *spec.input_shape, device=device)
    targets = torch.randint(spec.num_classes, (setting.batch_size,), device=device)
    loss_func = nn.CrossEntropyLoss(reduction="mean")
    return Problem(model, loss_func, inputs, targets, spec.num_classes)


def gradient_step(problem: Problem) -> Tensor:
    """Forward pass and ``loss.backward()``."""
    problem.model.zero_grad()
    loss = problem.loss_func(problem.model(problem.inputs), problem.targets)
    loss.backward()
    return loss


def build_extension(name: str) -> tuple[engine.Extension, bool]:
    """The extension of a row name and whether it accumulates ``.grad``."""
    base, _, variant = name.removeprefix("func:").partition("-")
    if base == "Jacobian":
        return engine.Jacobian(factored=variant == "factored"), False
    if variant == "reduce":
        return getattr(engine, base)(kfac_approx="reduce"), True
    return getattr(engine, base)(), variant != "nograd"


def engine_step(
    problem: Problem, ext: engine.Extension, accumulate_grad: bool
) -> engine.BackpropResult:
    """Forward pass and ``engine.backprop`` with one extension.

    The Jacobian needs no loss: it is called with ``loss_func=None``.
    """
    problem.model.zero_grad()
    if isinstance(ext, engine.Jacobian):
        return engine.backprop(problem.model, None, problem.inputs, None, [ext])
    return engine.backprop(
        problem.model,
        problem.loss_func,
        problem.inputs,
        problem.targets,
        [ext],
        accumulate_grad=accumulate_grad,
    )


def func_jacobian(problem: Problem) -> dict[str, Tensor]:
    """Per-sample Jacobians ``[N, C, *p]`` with ``vmap`` over samples of ``jacrev``."""
    params = {n: p.detach() for n, p in problem.model.named_parameters()}

    def single(theta: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(problem.model, theta, (x[None],)).reshape(-1)

    return vmap(jacrev(single), in_dims=(None, 0))(params, problem.inputs)


def has_backpack(name: str) -> bool:
    """Whether BackPACK is installed and has an extension called ``name``."""
    return backpack_extensions is not None and hasattr(backpack_extensions, name)


def backpack_runner(
    problem: Problem, name: str, library: ModuleType | None = None
) -> Callable[[], Tensor]:
    """A gradient step with BackPACK's extension ``name`` on an extended model copy.

    The copy keeps the plain model free of BackPACK's hooks, which would slow down the
    reference gradient step. ``library`` is a module with BackPACK's API (``extend``,
    ``backpack``, ``extensions``); default: BackPACK itself.
    """
    # BackPACK's full backward hooks warn on every call when the input needs no grad
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    library = backpack if library is None else library
    model = library.extend(copy.deepcopy(problem.model))
    loss_func = library.extend(copy.deepcopy(problem.loss_func))
    ext_cls = getattr(library.extensions, name)

    def step() -> Tensor:
        model.zero_grad()
        loss = loss_func(model(problem.inputs), problem.targets)
        with library.backpack(ext_cls()):
            loss.backward()
        return loss

    return step


def make_runner(problem: Problem, method: str) -> Callable[[], object]:
    """``"gradient"``, an engine extension name or ``"backpack:<name>"`` as a call."""
    if method == GRADIENT:
        return partial(gradient_step, problem)
    if method.startswith(BACKPACK_PREFIX):
        return backpack_runner(problem, method.removeprefix(BACKPACK_PREFIX))
    if method == FUNC_JACOBIAN:
        return partial(func_jacobian, problem)
    return partial(engine_step, problem, *build_extension(method))


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
"""``--clock``: wall-clock time, or this process's CPU time (user + system)."""
_clock = CLOCKS["wall"]


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call on the selected clock (``--clock``)."""
    synchronize(device)
    start = _clock()
    fn()
    synchronize(device)
    return _clock() - start


def median_times(
    base: Callable[[], object],
    run: Callable[[], object],
    repeats: int,
    device: torch.device,
) -> tuple[float, float]:
    """Median seconds of ``run`` and ``base``, called alternately after a warm-up."""
    base_s, run_s = round_robin([base, run], repeats, device)
    return run_s, base_s


def round_robin(
    runs: list[Callable[[], object]], repeats: int, device: torch.device
) -> list[float]:
    """Median seconds of each call, called in turn ``repeats`` times after a warm-up."""
    for run in runs:
        run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, spent in zip(runs, times, strict=True):
            spent.append(seconds(run, device))
    return [statistics.median(spent) for spent in times]


def _status_bytes(field: str) -> int:
    """A memory field of ``/proc/self/status`` (Linux) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak_rss() -> int:
    """Reset the peak RSS to the current RSS and return it (bytes).

    Linux (>= 4.0) resets the high-water mark via ``/proc/self/clear_refs``; elsewhere
    the previous peak is returned, which can hide increases smaller than the warm-up's.
    """
    clear_refs = Path("/proc/self/clear_refs")
    if clear_refs.exists():
        clear_refs.write_text("5")
        return _status_bytes("VmRSS")
    return _peak_rss()


def _peak_rss() -> int:
    """Peak resident set size (bytes) since start-up or the last reset."""
    if Path("/proc/self/status").exists():
        return _status_bytes("VmHWM")
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes vs KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _peak_rss_increase(setting: Setting, method: str, send: Connection) -> None:
    """Send the peak RSS increase of one full-batch call (runs in a child process)."""
    problem = make_problem(setting)
    run = make_runner(problem, method)
    small = dataclasses.replace(
        problem, inputs=problem.inputs[:2], targets=problem.targets[:2]
    )
    make_runner(small, method)()
    problem.model.zero_grad()
    before = _reset_peak_rss()
    run()
    send.send(_peak_rss() - before)


def _cuda_peak_increase(setting: Setting, method: str) -> int:
    run = make_runner(make_problem(setting), method)
    run()
    synchronize(torch.device(setting.device))
    torch.cuda.reset_peak_memory_stats(setting.device)
    before = torch.cuda.memory_allocated(setting.device)
    run()
    return torch.cuda.max_memory_allocated(setting.device) - before


def start_memory_server() -> None:
    """Configure the clean parent process of the CPU memory measurements.

    # NOTE [Fixed malloc thresholds]
    # glibc raises its mmap threshold after large frees, after which freed tensors stay
    # resident in the heap and a later, larger call can reuse them without raising the
    # RSS. Fixed thresholds put every tensor above 64 KiB into its own mapping that is
    # returned on free, so the peak RSS tracks the peak of live tensors. glibc reads
    # these variables at start-up, so they only affect the forkserver and its children.
    """
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**16))
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(2**17))
    multiprocessing.set_forkserver_preload(["__main__", "torch", "backpack"])


def peak_memory(setting: Setting, method: str) -> int:
    """Bytes of peak working memory of one call of ``method`` above model + data."""
    if torch.device(setting.device).type == "cuda":
        return _cuda_peak_increase(setting, method)
    ctx = multiprocessing.get_context("forkserver")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_peak_rss_increase, args=(setting, method, send))
    child.start()
    send.close()
    try:
        return receive.recv()
    except EOFError:
        raise RuntimeError(
            f"Memory measurement of {method} on {setting.model} failed "
            "(see the child's traceback above)."
        ) from None
    finally:
        child.join()


def result_bytes(ext: engine.Extension, problem: Problem) -> int:
    """Size of the extension's result (BackPACK's has the same shapes)."""
    if not ext.reductions:  # Kronecker factors: two small matrices per layer
        return 0
    num_params = sum(p.numel() for p in problem.model.parameters())
    batch_size = problem.inputs.shape[0]
    columns = {
        "exact": problem.num_classes,
        "identity": problem.num_classes,
        "mc": ext.mc_samples,
    }.get(ext.columns.value, 1)
    per_param = {"per_sample": columns * batch_size, "batch_squared": batch_size}
    factor = per_param.get(ext.reductions[0].value, 1)
    return factor * num_params * problem.inputs.element_size()


def measure(
    problem: Problem,
    setting: Setting,
    methods: list[str],
    base_memory: int,
    repeats: int,
) -> list[dict[str, float]]:
    """Time and memory ratios of each method to a gradient step, timed in turns."""
    device = torch.device(setting.device)
    runs = [make_runner(problem, m) for m in (GRADIENT, *methods)]
    base_s, *run_s = round_robin(runs, repeats, device)
    return [
        {
            "time_ratio": s / base_s,
            "memory_ratio": peak_memory(setting, method) / max(base_memory, 1),
            "seconds": s,
            "gradient_seconds": base_s,
        }
        for method, s in zip(methods, run_s, strict=True)
    ]


def bench_extension(
    problem: Problem,
    setting: Setting,
    name: str,
    base_memory: int,
    args: argparse.Namespace,
) -> dict[str, object]:
    """Ours and (if available) BackPACK's ratios for one extension."""
    if setting.model in UNSUPPORTED.get(name, ()):
        return {"skipped": f"{name} does not support {setting.model}"}
    size = result_bytes(build_extension(name)[0], problem)
    if size > args.max_result_gb * 2**30:
        return {"skipped": f"result alone needs {size / 2**30:.1f} GB"}
    # the -reduce rows against BackPACK's only convention (see the module docstring)
    theirs = name.removesuffix("-reduce")
    compare = has_backpack(theirs) and setting.model not in NO_BACKPACK
    methods = [name] + ([BACKPACK_PREFIX + theirs] if compare else [])
    values = measure(problem, setting, methods, base_memory, args.repeats)
    row: dict[str, object] = dict(zip(("ours", "backpack"), values, strict=False))
    if "backpack" in row:
        row["vs_backpack"] = values[0]["seconds"] / values[1]["seconds"]
    return row


def format_row(model: str, name: str, row: dict[str, object]) -> str:
    """One table line: time and memory ratios, ours then BackPACK's, ours / BackPACK."""
    if "skipped" in row:
        cells, note = ["skip"] * 5, f"  ({row['skipped']})"
    else:
        cells, note = [], ""
        for who in ("ours", "backpack"):
            values = row.get(who)
            for key in ("time_ratio", "memory_ratio"):
                cells.append("n/a" if values is None else f"{values[key]:.2f}")
        versus = row.get("vs_backpack")
        cells.append("n/a" if versus is None else f"{versus:.2f}")
    return f"{model:<9}{name:<21}" + "".join(f"{c:>10}" for c in cells) + note


def bench_model(model: str, args: argparse.Namespace) -> dict[str, object]:
    """Measure every requested extension on one model and print its table rows."""
    spec = MODELS[model]
    batch_size = args.batch_size or (
        spec.quick_batch_size if args.quick else spec.batch_size
    )
    setting = Setting(model, batch_size, args.device)
    problem = make_problem(setting)
    base_memory = peak_memory(setting, GRADIENT)
    rows = {}
    for name in args.extensions:
        rows[name] = bench_extension(problem, setting, name, base_memory, args)
        print(format_row(model, name, rows[name]), flush=True)
    base_times = [
        row["ours"]["gradient_seconds"] for row in rows.values() if "ours" in row
    ]
    base_ms = 1e3 * statistics.median(base_times) if base_times else float("nan")
    print(
        f"{'':<9}(gradient step: batch {batch_size}, {base_ms:.1f} ms, "
        f"peak +{base_memory / 2**20:.0f} MB)",
        flush=True,
    )
    return {
        "batch_size": batch_size,
        "gradient_ms": base_ms,
        "gradient_peak_bytes": base_memory,
        "extensions": rows,
    }


def bench_versus(model: str, args: argparse.Namespace) -> dict[str, float]:
    """Time ratio of two methods called alternately (``--versus A,B``: B / A)."""
    spec = MODELS[model]
    batch_size = args.batch_size or (
        spec.quick_batch_size if args.quick else spec.batch_size
    )
    problem = make_problem(Setting(model, batch_size, args.device))
    first, second = args.versus
    second_s, first_s = median_times(
        make_runner(problem, first),
        make_runner(problem, second),
        args.repeats,
        torch.device(args.device),
    )
    print(
        f"{model:<9}{second} / {first}: {second_s / first_s:.2f} "
        f"({1e3 * second_s:.1f} ms / {1e3 * first_s:.1f} ms, batch {batch_size})",
        flush=True,
    )
    return {"ratio": second_s / first_s, "seconds": [first_s, second_s]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` lowers repeats and batch sizes."""
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test (< 60 s)")
    parser.add_argument(
        "--models", default=",".join(DEFAULT_MODELS), help=f"of {', '.join(MODELS)}"
    )
    parser.add_argument("--extensions", default=",".join(EXTENSIONS))
    parser.add_argument(
        "--repeats", type=int, default=None, help="default 5 (quick: 1)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="override the models' batch size"
    )
    parser.add_argument("--device", default=default_device)
    parser.add_argument(
        "--threads", type=int, default=None, help="default: torch's default"
    )
    parser.add_argument(
        "--max-result-gb", type=float, default=None, help="default 4 (quick: 0.5)"
    )
    parser.add_argument(
        "--versus",
        default=None,
        help="A,B: only the time ratio B / A of two rows called alternately",
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or CPU time of this process (use with --threads 1)",
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument(
        "--markdown", type=Path, default=None, help="also write the table here"
    )
    args = parser.parse_args(argv)
    args.models = args.models.split(",")
    args.extensions = args.extensions.split(",")
    if args.versus is not None:
        args.versus = args.versus.split(",")
        if len(args.versus) != 2:
            parser.error(
                "--versus needs two rows, e.g. DiagGGNExact,DiagGGNExact-nograd"
            )
    methods = set(args.extensions) | set(args.versus or ())
    unknown = set(args.models) - set(MODELS) | methods - {*EXTENSIONS, GRADIENT}
    if unknown:
        parser.error(f"unknown models/extensions: {sorted(unknown)}")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    if args.max_result_gb is None:
        args.max_result_gb = 0.5 if args.quick else 4.0
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the table and write the JSON."""
    args = parse_args(argv)
    global _clock  # noqa: PLW0603 (the benchmark's one setting for all timings)
    _clock = CLOCKS[args.clock]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.versus is not None:
        for model in args.models:
            bench_versus(model, args)
        return
    start_memory_server()
    bp_version = getattr(backpack, "__version__", "installed") if backpack else None
    config = {
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "quick": args.quick,
        "clock": args.clock,
        "backpack": bp_version,
    }
    print(f"ratios to a gradient step (forward + loss.backward()); {config}")
    print(f"{'model':<9}{'extension':<21}{'time':>10}{'memory':>10}", end="")
    print(f"{'BP time':>10}{'BP memory':>10}{'vs BP':>10}")
    config["load"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    results = {"config": config, "models": {}}
    for model in args.models:
        results["models"][model] = bench_model(model, args)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    config["load_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    args.json.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")
    if args.markdown is not None:
        args.markdown.write_text(markdown_table(results))
        print(f"wrote {args.markdown}")


def markdown_table(results: dict[str, object]) -> str:
    """The results as a Markdown table (time ratios, ours / BackPACK, memory)."""
    config = results["config"]
    lines = [
        "| model | extension | ours (gradient steps) | BackPACK | ours / BackPACK "
        "| memory ours | memory BackPACK |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, entry in results["models"].items():
        for name, row in entry["extensions"].items():
            if "skipped" in row:
                continue
            ours, bp = row["ours"], row.get("backpack")
            cells = [
                f"{ours['time_ratio']:.2f}",
                "n/a" if bp is None else f"{bp['time_ratio']:.2f}",
                f"{row['vs_backpack']:.2f}" if "vs_backpack" in row else "n/a",
                f"{ours['memory_ratio']:.2f}",
                "n/a" if bp is None else f"{bp['memory_ratio']:.2f}",
            ]
            lines.append(f"| {model} | {name} | " + " | ".join(cells) + " |")
    load = [config.get("load"), config.get("load_end")]
    loads = ", ".join("n/a" if x is None else f"{x[0]:.1f}" for x in load)
    lines += [
        "",
        f"torch {config['torch']}, BackPACK {config['backpack']}, {config['threads']} "
        f"thread(s), {config['clock']} clock, median of {config['repeats']} rounds; "
        f"1-min load average at start and end: {loads}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
