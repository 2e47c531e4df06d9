"""laplace-torch's own test suite against bayescurv, with only the imports swapped.

Copies laplace-torch's ``tests/`` from a checkout, rewrites ``from laplace import`` to
``from bayescurv import`` and ``laplace.x`` to ``bayescurv.compat.laplace.x``, runs
pytest with a Python that has laplace-torch's test dependencies (torchvision,
backpack, curvlinops, asdl) and this repository on its path, and writes the pass
count with the failures grouped by test function.

Usage::

    python experiments/laplace_torch_suite.py --laplace-torch PATH/TO/laplace-torch \
        --python PATH/TO/venv/bin/python --out docs/results/laplace_torch_suite.md

``--files`` picks test files (default: the Laplace level, function-space files
included).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAPLACE_LEVEL = (
    "test_baselaplace.py",
    "test_laplace.py",
    "test_lllaplace.py",
    "test_subnetlaplace.py",
    "test_subset_params.py",
    "test_feature_extractor.py",
    "test_utils.py",
    "test_matrix.py",
    "test_metrics.py",
    "test_serialization.py",
    "test_functional_laplace.py",
    "test_functional_laplace_unit.py",
)
SWAPS = (
    (re.compile(r"^(\s*)from laplace import ", re.M), r"\1from bayescurv import "),
    (re.compile(r"^(\s*)from laplace\.", re.M), r"\1from bayescurv.compat.laplace."),
    (
        re.compile(r"^(\s*)import laplace\b", re.M),
        r"\1import bayescurv.compat.laplace",
    ),
)
OUTCOME = re.compile(r"^(FAILED|ERROR) (\S+?)(?:\[\S*\])?(?: - (.*))?$", re.M)
COUNTS = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)")


def swap_imports(directory: Path) -> None:
    """Rewrite laplace-torch imports to bayescurv's in every ``.py`` file."""
    for path in directory.rglob("*.py"):
        text = path.read_text()
        for pattern, replacement in SWAPS:
            text = pattern.sub(replacement, text)
        path.write_text(text)


def run(source: Path, python: str, files: list[str], workdir: Path) -> str:
    """Run the swapped suite; return pytest's output."""
    shutil.copytree(source / "tests", workdir / "tests")
    swap_imports(workdir / "tests")
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="400")
    command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    command += ["-p", "no:warnings", "-rfE", "--tb=line"]
    command += [f"tests/{name}" for name in files]
    done = subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, check=False
    )
    return done.stdout + done.stderr


def report(output: str, files: list[str]) -> str:
    """A markdown page: totals and failures per test function with a first reason."""
    counts = collections.Counter()
    for number, kind in COUNTS.findall(output.splitlines()[-1] if output else ""):
        counts[kind.rstrip("s") if kind.startswith("error") else kind] += int(number)
    failures: dict[str, list[str]] = collections.defaultdict(list)
    for _, test, reason in OUTCOME.findall(output):
        failures[test].append((reason or "").strip())
    ran = counts["passed"] + counts["failed"] + counts["error"]
    share = counts["passed"] / ran if ran else 0.0
    lines = [
        "# laplace-torch's test suite on bayescurv",
        "",
        "Produced by `python experiments/laplace_torch_suite.py` (see its docstring):",
        "laplace-torch's tests with only the imports swapped.",
        "",
        f"Files: {', '.join(f'`{name}`' for name in files)}.",
        "",
        f"**{counts['passed']} passed, {counts['failed']} failed, "
        f"{counts['error']} errors, {counts['skipped']} skipped "
        f"({share:.1%} of the tests that ran pass).**",
        "",
        "| test | failing cases | first message |",
        "| --- | --- | --- |",
    ]
    for test, reasons in sorted(failures.items()):
        message = reasons[0].replace("|", "\\|")[:160]
        lines.append(f"| `{test}` | {len(reasons)} | {message} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--laplace-torch", type=Path, required=True)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--files", nargs="*", default=list(LAPLACE_LEVEL))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        output = run(args.laplace_torch, args.python, args.files, Path(workdir))
    page = report(output, args.files)
    print(page)
    if args.out is not None:
        args.out.write_text(page)


if __name__ == "__main__":
    main()
