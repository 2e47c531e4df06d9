r"""Adversarial sweep of the Laplace API: every case is ok, a clear error, or a finding.

Each case does what a new user might (bad inputs at fit and predict, unusual models,
saved state, float32 numerics, scale) and is classified as

* ``ok``: it ran, and where a dense float64 reference exists (``torch.func`` GGN of
  a float64 copy, :math:`J \Lambda^{-1} J^\top` for the GLM variance) the result
  matches it; documented warnings were given;
* ``clear error``: the case expected a refusal and got a ``ValueError``,
  ``TypeError``, ``KeyError``, ``NotImplementedError`` or bayescurv's own error
  (``NotFittedError``, ``MemoryBudgetError``, ...) raised from bayescurv's code with a
  message;
* ``crash``: any other exception (from torch internals, an ``AttributeError``, an
  ``IndexError``, ...), or a clear error where the case expected a result;
* ``silent wrong``: a result where an error was expected, a result off the dense
  reference, a non-finite result, or a missing warning.

Run: ``OMP_NUM_THREADS=1 python -m experiments.adversarial_sweep`` (under a minute on
a CPU); writes ``docs/results/adversarial_sweep.md``. ``--out PATH`` writes
elsewhere, ``--only FAMILY`` runs one family.
"""

from __future__ import annotations

import argparse
import copy
import re
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from experiments.sweep_cases import FAMILIES, Case, SilentWrong

CLEAR_TYPES = (ValueError, TypeError, KeyError, NotImplementedError)
OUTCOMES = ["ok", "clear error", "crash", "silent wrong"]


@dataclass
class Result:
    """One case's outcome and a one-line reason."""

    case: Case
    outcome: str
    detail: str


def _from_bayescurv(error: BaseException) -> bool:
    """Whether the innermost frame that raised is bayescurv's own code."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and "/bayescurv/" in frames[-1].filename.replace("\\", "/")


def _is_clear(error: BaseException) -> bool:
    own = type(error).__module__.startswith("bayescurv")
    typed = isinstance(error, CLEAR_TYPES) or own
    return typed and _from_bayescurv(error) and len(str(error)) >= 20


def classify(case: Case) -> Result:
    """Run one case and classify it (see the module doc)."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            note = case.run()
        messages = [str(w.message) for w in caught]
    except SilentWrong as wrong:
        return Result(case, "silent wrong", str(wrong))
    except Exception as error:
        return _refused(case, error)
    if case.expect == "error":
        return Result(case, "silent wrong", f"accepted: {note or 'no error'}")
    if case.warns and not any(re.search(case.warns, m) for m in messages):
        return Result(case, "silent wrong", f"no warning matching {case.warns!r}")
    return Result(case, "ok", note or "")


def _refused(case: Case, error: Exception) -> Result:
    """A clear error where one was expected, else a crash."""
    message = f"{type(error).__name__}: {_one_line(error)}"
    if not _is_clear(error):
        return Result(case, "crash", message)
    if case.expect == "ok":
        return Result(case, "crash", f"refused a valid case: {message}")
    if case.match and not re.search(case.match, str(error)):
        return Result(case, "crash", f"an error about something else: {message}")
    return Result(case, "clear error", message)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:160] + ("..." if len(text) > 160 else "")


def write_report(results: list[Result], path: Path, seconds: float) -> None:
    """The markdown table of counts and every case's outcome."""
    counts = Counter(r.outcome for r in results)
    families = sorted({r.case.family for r in results}, key=list(FAMILIES).index)
    lines = [
        "# Adversarial sweep of the Laplace API",
        "",
        f"{len(results)} cases, run with `python -m experiments.adversarial_sweep` "
        f"({seconds:.0f} s, torch {torch.__version__}). Outcomes as defined in the "
        "script's docstring: ok (dense float64 reference matched where one "
        "exists), clear error (a refusal that names the problem), crash, silent "
        "wrong.",
        "",
        "| family | " + " | ".join(OUTCOMES) + " |",
        "|---|" + "---|" * len(OUTCOMES),
    ]
    for family in families:
        mine = Counter(r.outcome for r in results if r.case.family == family)
        lines.append(
            f"| {family} | " + " | ".join(str(mine[o]) for o in OUTCOMES) + " |"
        )
    lines.append(
        "| **total** | " + " | ".join(f"**{counts[o]}**" for o in OUTCOMES) + " |"
    )
    lines += ["", "## Every case", "", "| case | outcome | detail |", "|---|---|---|"]
    for r in results:
        detail = r.detail.replace("|", "\\|")
        lines.append(f"| {r.case.family}/{r.case.name} | {r.outcome} | {detail} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def run(families: dict[str, Callable[[], list[Case]]]) -> list[Result]:
    """Classify every case of ``families``, printing the findings as they come."""
    results = []
    for family, make in families.items():
        for case in make():
            state = copy.deepcopy(torch.random.get_rng_state())
            torch.manual_seed(0)
            result = classify(case)
            torch.random.set_rng_state(state)
            results.append(result)
            if result.outcome in ("crash", "silent wrong"):
                print(f"{result.outcome:>12}  {family}/{case.name}: {result.detail}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results/adversarial_sweep.md")
    parser.add_argument("--only", choices=list(FAMILIES), default=None)
    args = parser.parse_args()
    chosen = {args.only: FAMILIES[args.only]} if args.only else FAMILIES
    start = time.perf_counter()
    results = run(chosen)
    seconds = time.perf_counter() - start
    counts = Counter(r.outcome for r in results)
    print(f"{len(results)} cases: " + ", ".join(f"{counts[o]} {o}" for o in OUTCOMES))
    write_report(results, Path(args.out), seconds)


if __name__ == "__main__":
    main()
