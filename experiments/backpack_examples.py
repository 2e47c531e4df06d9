"""Run BackPACK's own examples twice: with BackPACK, and with its imports swapped.

Reads the examples from a checkout of BackPACK's repository (nothing is copied into
this project): the website's code samples (``docs_src/splash``), the "How to use
BackPACK" page (``docs_src/rtd/main-api.rst``), the basic-usage example and the
use cases (``docs_src/examples``). Each runs in its own process, once as written and
once with ``from backpack import ...`` / ``from backpack.extensions import ...``
replaced by ``bayescurv.compat.backpack`` / ``bayescurv.compat.backpack.extensions``
(no other change). Both runs see the same synthetic MNIST-shaped data (no network:
BackPACK's ``load_mnist_dataset`` is replaced by a seeded random dataset) and the same
seed; afterwards every BackPACK savefield on every parameter of every module the
example left behind (curvature-matrix products applied to a fixed random matrix) and
every parameter value are compared. Monte Carlo savefields are compared by shape.

Needs an environment with ``backpack-for-pytorch`` (and torchvision, einops) and
bayescurv importable (run from the repository root)::

    python -m experiments.backpack_examples --backpack-repo PATH [--only NAME ...]

Prints one row per example: whether each run succeeded, how many values were
compared and the largest relative difference.
"""

from __future__ import annotations

import argparse
import html
import io
import os
import re
import subprocess
import sys
import tempfile
import traceback
import types
from contextlib import redirect_stdout
from pathlib import Path

import torch

from bayescurv.compat.backpack import extensions as compat_extensions

ROOT = Path(__file__).resolve().parents[1]
SAVEFIELDS = (
    "grad",
    "grad_batch",
    "batch_l2",
    "sum_grad_squared",
    "variance",
    "batch_dot",
    "diag_ggn_exact",
    "diag_ggn_exact_batch",
    "diag_h",
    "diag_h_batch",
    "sqrt_ggn_exact",
    "kflr",
    "kfra",
)
RANDOM_FIELDS = ("diag_ggn_mc", "diag_ggn_mc_batch", "sqrt_ggn_mc", "kfac")
PRODUCTS = ("hmp", "ggnmp", "pchmp", "pchmp_clip", "pchmp_abs")
SWAPS = (
    (
        r"^from backpack\.extensions import",
        "from bayescurv.compat.backpack.extensions import",
    ),
    (r"^from backpack import", "from bayescurv.compat.backpack import"),
)
DEEP_IMPORT = re.compile(r"^from backpack\.extensions\.[\w.]+ import ([\w, ]+)$", re.M)
RTOL, ATOL = 1e-4, 1e-6  # float32 examples; the two runs reduce in different orders


def examples(repo: Path) -> dict[str, str]:
    """Example name -> source, from a BackPACK checkout."""
    found = {}
    splash = (repo / "docs_src/splash/_includes/code-samples.html").read_text()
    for i, code in enumerate(re.findall(r"<code>(.*?)</code>", splash, re.DOTALL)):
        text = html.unescape(re.sub(r"<[^>]+>", "", code))
        if "extensions." in text and "import extensions" not in text:
            # NOTE [The website samples' missing import]: three samples call
            # extensions.X() without importing extensions (a NameError with BackPACK
            # itself); the one missing line is added, and swapped like all imports.
            text = "from backpack import extensions\n" + text
        found[f"website-sample-{i + 1}"] = text
    rst = (repo / "docs_src/rtd/main-api.rst").read_text()
    blocks = re.findall(r"\.\. code-block:: python\n\n((?:    .*\n|\n)+)", rst)
    found["how-to-use"] = "\n".join(
        "\n".join(line[4:] for line in b.splitlines()) for b in blocks
    )
    for path in sorted((repo / "docs_src/examples").glob("*/example_*.py")):
        found[path.stem] = path.read_text()
    return found


def swap_imports(source: str) -> str:
    """Replace BackPACK's ``backpack``/``extend``/extensions imports, nothing else.

    An extension class imported from the module that defines it (``from
    backpack.extensions.secondorder.diag_ggn import DiagGGNExact``) is imported from
    ``bayescurv.compat.backpack.extensions`` instead; imports of BackPACK's internals
    (module extensions, ``hessianfree``, ``utils``, ``custom_module``) stay.
    """
    for pattern, replacement in SWAPS:
        source = re.sub(pattern, replacement, source, flags=re.MULTILINE)

    def deep(match: re.Match) -> str:
        names = [n.strip() for n in match[1].split(",")]
        if all(n in compat_extensions.__all__ for n in names):
            return f"from bayescurv.compat.backpack.extensions import {match[1]}"
        return match[0]

    return DEEP_IMPORT.sub(deep, source)


def synthetic_mnist() -> torch.utils.data.Dataset:
    """1,024 MNIST-shaped samples (seeded): inputs ``[1, 28, 28]``, labels 0-9."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 1, 28, 28, generator=gen).to(torch.get_default_dtype())
    y = torch.randint(0, 10, (1024,), generator=gen)
    return torch.utils.data.TensorDataset(x, y)


def _offline_data() -> None:
    """No downloads: BackPACK's MNIST and the docs' ``utils.load_data`` are random."""
    import backpack.utils.examples as bp_examples  # noqa: PLC0415 (optional dependency)

    bp_examples.load_mnist_dataset = synthetic_mnist
    utils = types.ModuleType("utils")
    utils.load_data = (
        lambda: (  # the "How to use" page's placeholder loader
            synthetic_mnist().tensors[0][:64].flatten(1),
            synthetic_mnist().tensors[1][:64],
        )
    )
    sys.modules["utils"] = utils


def _collect(namespace: dict) -> dict[str, object]:
    """Savefields and parameter values of every module the example left behind."""
    values: dict[str, object] = {}
    gen = torch.Generator().manual_seed(0)
    for var, module in sorted(namespace.items()):
        if not isinstance(module, torch.nn.Module):
            continue
        for name, p in module.named_parameters():
            key = f"{var}.{name}"
            values[f"{key}:value"] = p.detach().clone()
            for field in SAVEFIELDS + RANDOM_FIELDS:
                if hasattr(p, field) and getattr(p, field) is not None:
                    values[f"{key}:{field}"] = getattr(p, field)
            for field in PRODUCTS:
                if callable(getattr(p, field, None)):
                    mat = torch.randn(2, *p.shape, generator=gen, dtype=p.dtype)
                    values[f"{key}:{field}"] = getattr(p, field)(mat).detach()
    return values


def child(source_file: Path, variant: str, out: Path, float64: bool) -> None:
    """Run one example in this process and save what it left behind."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    plt.show = lambda *args, **kwargs: None
    _offline_data()
    source = source_file.read_text()
    if variant == "compat":
        source = swap_imports(source)
    namespace = {"__name__": "__main__"}
    stdout, error = io.StringIO(), None
    if float64:  # see --float64
        torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    try:
        with redirect_stdout(stdout):
            exec(compile(source, str(source_file), "exec"), namespace)
    except BaseException:  # reported in the table, not swallowed
        error = traceback.format_exc(limit=-3)
    values = _collect(namespace)
    torch.save({"stdout": stdout.getvalue(), "error": error, "values": values}, out)


def _run(name: str, source: str, variant: str, workdir: Path, float64: bool) -> dict:
    src = workdir / f"{name}.py"
    src.write_text(source)
    out = workdir / f"{name}.{variant}.pt"
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--child", str(src), variant, str(out)]
    cmd += ["--float64"] if float64 else []
    proc = subprocess.run(
        cmd, cwd=workdir, env=env, capture_output=True, text=True, check=False
    )
    if not out.exists():
        return {"stdout": "", "error": proc.stderr[-2000:], "values": {}}
    return torch.load(out, weights_only=False)


def _flat(value: object) -> list[torch.Tensor]:
    return list(value) if isinstance(value, list) else [value]


def align(theirs: dict, ours: dict) -> dict:
    """``ours`` with parameters renamed to BackPACK's where its converter renamed them.

    ``extend(model, use_converter=True)`` returns a traced copy with other parameter
    names in BackPACK; the compat layer returns the model. Parameters are matched by
    their (identical) values.
    """
    renamed: dict[str, str] = {}
    unmatched = {k for k in ours if k.endswith(":value") and k not in theirs}
    for key in [k for k in theirs if k.endswith(":value") and k not in ours]:
        match = next(
            (
                k
                for k in sorted(unmatched)
                if ours[k].shape == theirs[key].shape
                and torch.equal(ours[k], theirs[key])
            ),
            None,
        )
        if match is not None:
            unmatched.discard(match)
            renamed[match.removesuffix(":value")] = key.removesuffix(":value")
    out = {}
    for key, value in ours.items():
        param, field = key.split(":")
        out[f"{renamed.get(param, param)}:{field}"] = value
    return out


def compare(theirs: dict, ours: dict) -> tuple[int, float, list[str]]:
    """Number of compared values, largest relative difference, mismatches."""
    ours = align(theirs, ours)
    count, worst, problems = 0, 0.0, []
    for key, a in theirs.items():
        if key not in ours:
            problems.append(f"missing {key}")
            continue
        pairs = list(zip(_flat(a), _flat(ours[key]), strict=False))
        if len(_flat(a)) != len(_flat(ours[key])) or any(
            x.shape != y.shape for x, y in pairs
        ):
            problems.append(f"shape {key}")
            continue
        count += 1
        if key.split(":")[1] in RANDOM_FIELDS:
            continue
        for expected, actual in pairs:
            x, y = expected.double(), actual.double()
            worst = max(worst, ((x - y).norm() / x.norm().clamp(min=1e-12)).item())
            if not torch.allclose(y, x, rtol=RTOL, atol=ATOL):
                problems.append(f"values {key}")
    return count, worst, problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backpack-repo", type=Path)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument(
        "--float64",
        action="store_true",
        help="default dtype float64 in both runs (training examples amplify float32 "
        "rounding differences step by step)",
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1], Path(args.child[2]), args.float64)
        return
    print("| example | BackPACK | bayescurv.compat | values compared | max rel. diff |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, source in examples(args.backpack_repo).items():
            if args.only and name not in args.only:
                continue
            theirs = _run(name, source, "backpack", Path(tmp), args.float64)
            ours = _run(name, source, "compat", Path(tmp), args.float64)
            count, worst, problems = compare(theirs["values"], ours["values"])
            status = [_status(theirs), _status(ours)]
            print(f"| {name} | {status[0]} | {status[1]} | {count} | {worst:.1e} |")
            for line in problems[:5]:
                print(f"|   | mismatch: {line} | | | |")
            for run, label in [(theirs, "BackPACK"), (ours, "compat")]:
                if run["error"]:
                    last = run["error"].strip().splitlines()[-1]
                    print(f"|   | {label} error: {last[:150]} | | | |")
            sys.stdout.flush()


def _status(run: dict) -> str:
    return "ok" if run["error"] is None else "error"


if __name__ == "__main__":
    main()
