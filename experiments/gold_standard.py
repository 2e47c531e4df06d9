"""How close is each Laplace variant to the true posterior? NUTS as the gold standard.

On three small Bayesian neural networks (:mod:`experiments.gold_problems`: a 1-D
regression with a gap, two moons, digits with a 4-unit net), Pyro's NUTS samples the
posterior of the :class:`~bayescurv.laplace.pyro_model.BayesianNetwork` with one
fixed Gaussian prior (:mod:`experiments.gold_nuts`). Every Laplace variant (subset x
structure x prior x predictive, :mod:`experiments.gold_methods`), the MAP and a deep
ensemble of 5 are scored against it (:mod:`experiments.gold_report`): predictive
NLL on test data and a distance between predictive distributions per test point.

Writes ``gold_standard.md`` and PNGs into ``--out`` (default ``docs/results``,
:mod:`experiments.gold_page`)::

    OMP_NUM_THREADS=1 nice -n 10 python -m experiments.gold_standard --save study.pt
    python -m experiments.gold_standard --quick --problems moons --out /tmp/gold

NUTS is the expensive part (most of an hour on a shared core). ``--save`` keeps the
results with their NUTS draws; ``--render A.pt B.pt`` writes the page from saved
results (later files replace earlier ones' problems, e.g. one problem run again);
``--rescore A.pt`` retrains the MAPs and scores every method again against the saved
NUTS draws (new Laplace variants or library changes without rerunning NUTS)::

    python -m experiments.gold_standard --problems regression --save reg.pt
    python -m experiments.gold_standard --render study.pt reg.pt
    python -m experiments.gold_standard --rescore study.pt --save rescored.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import pickle
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import Tensor

from experiments import gold_report as report
from experiments.gold_methods import (
    DEFAULT,
    ENSEMBLE_SIZE,
    Fitted,
    Prediction,
    map_prediction,
    methods,
)
from experiments.gold_nuts import NutsRun, diagnostics, run_nuts
from experiments.gold_page import Run, write_page
from experiments.gold_problems import PROBLEMS, Data, Problem, quick, train_map
from experiments.gold_report import FLOOR, REFERENCE

__all__ = ["FLOOR", "REFERENCE", "ProblemResult", "main", "run_problem", "write_page"]


@dataclass
class ProblemResult:
    """Everything the page needs about one problem (plain data: ``torch.save``-able).

    Attributes:
        problem: The problem.
        data: Its data.
        nuts: The NUTS run.
        function_diagnostics: R-hat and ESS of the predictions at the test points.
        weight_rhat: Median split R-hat of the weights.
        scores: ``{method: {metric: value}}``; metrics ``nll/<region>``,
            ``dist/<region>`` (and ``dist/grid``), ``seconds``.
        plots: Grid (else test) predictions of the plotted methods.
        seconds: Wall-clock seconds of the MAP training, NUTS and the methods.
        tuned_priors: Evidence-tuned prior precision per (subset, structure).
        map_quality: MAP's test accuracy or RMSE, as text.
        seed: The data split, NUTS and Monte Carlo seed.
        map_steps: Adam and L-BFGS steps of every MAP (at most).
        n_samples: Draws of every Monte Carlo predictive.
    """

    problem: Problem
    data: Data
    nuts: NutsRun
    function_diagnostics: dict[str, float]
    weight_rhat: float
    scores: dict[str, dict[str, float]]
    plots: dict[str, Prediction]
    seconds: dict[str, float]
    tuned_priors: dict[tuple[str, str], float]
    map_quality: str
    seed: int = 0
    map_steps: int = 2000
    n_samples: int = 1000


def scores_of(
    pred: dict[str, Prediction], ref: dict[str, Prediction], fitted: Fitted
) -> dict[str, float]:
    """NLL per test region and distance to the reference per region (and grid)."""
    data, sigma = fitted.data, fitted.problem.sigma_noise
    nll = report.nll(pred["test"], data.y_test, sigma)
    dist = report.distance(pred["test"], ref["test"])
    scores = {}
    for region, mask in data.regions.items():
        scores[f"nll/{region}"] = nll[mask].mean().item()
        scores[f"dist/{region}"] = dist[mask].mean().item()
    if "grid" in pred:
        scores["dist/grid"] = report.distance(pred["grid"], ref["grid"]).mean().item()
    return scores


def evaluation_inputs(data: Data) -> dict[str, Tensor]:
    """Test inputs, plus the grid where it differs from the test set."""
    inputs = {"test": data.x_test}
    if data.x_grid is not None and data.x_grid is not data.x_test:
        inputs["grid"] = data.x_grid
    return inputs


def nuts_predictions(
    problem: Problem, fitted: Fitted, nuts: NutsRun, inputs: dict[str, Tensor]
) -> tuple[dict[str, Prediction], list[dict[str, Prediction]], dict[str, float]]:
    """The NUTS predictive, that of each half of the chains, and its diagnostics.

    Returns:
        The predictive of all draws and of the two halves of the chains per input
        set, and the R-hat / ESS of the predictions at the test points.
    """
    model = problem.bayesian(fitted.nets[0])
    with torch.no_grad():
        outputs = {k: model.outputs(nuts.weights, x) for k, x in inputs.items()}
    half = nuts.weights.shape[0] // 2

    def predictive(part: slice) -> dict[str, Prediction]:
        return {
            k: Prediction.from_outputs(v[part].flatten(0, 1), problem.likelihood)
            for k, v in outputs.items()
        }

    functions = outputs["test"]
    if problem.likelihood == "classification":
        functions = functions.softmax(-1)
    halves = [predictive(slice(0, half)), predictive(slice(half, None))]
    return predictive(slice(None)), halves, diagnostics(functions)


def run_problem(
    problem: Problem,
    seed: int,
    map_steps: int = 2000,
    n_samples: int = 1000,
    nuts: NutsRun | None = None,
) -> ProblemResult:
    """MAPs, NUTS, every method and their scores on one problem.

    Args:
        problem: The problem.
        seed: Data split, NUTS and Monte Carlo seed.
        map_steps: Adam and L-BFGS steps of every MAP (at most).
        n_samples: Draws of every Monte Carlo predictive.
        nuts: Draws of an earlier run (with the same seed) instead of new ones.
    """
    data = problem.make_data(seed)
    begin = time.perf_counter()
    nets = [train_map(problem, data, s, map_steps) for s in range(ENSEMBLE_SIZE)]
    fitted = Fitted(problem, data, nets, n_samples, seed)
    seconds = {"map": time.perf_counter() - begin}
    nuts = nuts or run_nuts(problem, data, fitted.nets[0], seed)
    seconds["nuts"] = nuts.seconds
    inputs = evaluation_inputs(data)
    ref, halves, function_diagnostics = nuts_predictions(problem, fitted, nuts, inputs)
    scores = {
        REFERENCE: scores_of(ref, ref, fitted),
        FLOOR: scores_of(halves[0], halves[1], fitted),
    }
    plots = {REFERENCE: ref.get("grid", ref["test"])}
    begin = time.perf_counter()
    table = methods(problem.likelihood, len(data.x_train), problem.widths[-1])
    for name, method in table.items():
        start = time.perf_counter()
        pred = {k: method(fitted, x) for k, x in inputs.items()}
        scores[name] = scores_of(pred, ref, fitted)
        scores[name]["seconds"] = time.perf_counter() - start
        if _plotted(name, problem):
            plots[name] = pred.get("grid", pred["test"])
    seconds["methods"] = time.perf_counter() - begin
    tuned = {
        key[:2]: la.prior_precision.item()
        for key, la in fitted.laplace.items()
        if key[2] == "evidence" and key[3] == 1.0
    }
    return ProblemResult(
        problem,
        data,
        nuts,
        function_diagnostics,
        diagnostics(nuts.weights)["rhat_median"],
        scores,
        plots,
        seconds,
        tuned,
        map_quality(fitted),
        seed,
        map_steps,
        n_samples,
    )


def _plotted(name: str, problem: Problem) -> bool:
    default = DEFAULT[problem.likelihood].name
    glm = "glm probit" if problem.likelihood == "classification" else "glm"
    return name in {
        "MAP",
        f"deep ensemble ({ENSEMBLE_SIZE})",
        default,
        f"LA all full, fixed, {glm}",
        f"LA all kron, fixed, {glm}",
    }


def map_quality(fitted: Fitted) -> str:
    """MAP's test accuracy (classification) or RMSE against the targets."""
    data = fitted.data
    pred = map_prediction(fitted, data.x_test)
    if pred.probs is not None:
        accuracy = (pred.probs.argmax(-1) == data.y_test).double().mean().item()
        return f"accuracy {accuracy:.3f}"
    rmse = (pred.f_mean - data.y_test[:, 0]).square().mean().sqrt().item()
    return f"RMSE {rmse:.3f} (all grid points, noise std 0.1)"


# ------------------------------------------------------------ saved studies
Study = tuple[list[ProblemResult], list[Run]]
"""Per-problem results and the runs that produced them."""

MAP_RTOL = 1e-6
"""A retrained MAP must reproduce the saved MAP's scores to this relative tolerance."""


def git_commit() -> str:
    """The checked-out commit, ``+dirty`` with changed tracked files, or "unknown"."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], check=False, capture_output=True, text=True
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "-uno") else "")


def save_study(path: Path, study: Study) -> None:
    """Save results and runs (``torch.save``; NUTS draws included)."""
    results, runs = study
    torch.save({"results": results, "runs": runs}, path)


# NOTE [Saved under __main__]
# Run as ``python -m experiments.gold_standard``, this module is ``__main__``, and a
# study saved by a first version named its classes ``__main__.ProblemResult``; the
# script now runs through its importable name (the end of the file), and loading
# maps ``__main__`` back to it.
class _StudyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "__main__":
            module = "experiments.gold_standard"
        return super().find_class(module, name)


class _StudyPickle:
    """The ``pickle_module`` of :func:`load_study` (see the NOTE)."""

    Unpickler = _StudyUnpickler
    load = pickle.load
    __name__ = "pickle"


def load_study(path: Path) -> Study:
    """Results and runs saved by :func:`save_study`.

    Files of the first version (one ``command`` and ``cost``, no runs) become one
    run whose commit is the file's ``commit`` entry, else ``"unknown"``.
    """
    saved = torch.load(path, weights_only=False, pickle_module=_StudyPickle)
    results = saved["results"]
    if "runs" in saved:
        return results, saved["runs"]
    names = tuple(r.problem.name for r in results)
    commit = saved.get("commit", "unknown")
    return results, [Run(names, saved["command"], commit, saved["cost"])]


def merge_studies(studies: Sequence[Study]) -> Study:
    """One result per problem (a later study's replaces an earlier one's).

    Returns:
        The results in :data:`PROBLEMS` order and the runs that produced them, each
        listing only the problems whose results it still provides.
    """
    owner: dict[str, tuple[ProblemResult, Run]] = {}
    for results, runs in studies:
        for result in results:
            name = result.problem.name
            owner[name] = (result, next(r for r in runs if name in r.problems))
    order = [n for n in PROBLEMS if n in owner] + [
        n for n in owner if n not in PROBLEMS
    ]
    runs: list[Run] = []
    for name in order:
        run = owner[name][1]
        if all(r is not run for r in runs):
            runs.append(run)
    kept = [
        dataclasses.replace(run, problems=tuple(n for n in order if owner[n][1] is run))
        for run in runs
    ]
    return [owner[n][0] for n in order], kept


# ------------------------------------------------------------------ the runs
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--problems", nargs="+", choices=list(PROBLEMS), default=list(PROBLEMS)
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: tiny NUTS budget"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument(
        "--save", type=Path, help="also save the results (torch.save) to this file"
    )
    saved = parser.add_mutually_exclusive_group()
    saved.add_argument(
        "--render",
        type=Path,
        nargs="+",
        help="write the page from results saved by --save (later files win)",
    )
    saved.add_argument(
        "--rescore",
        type=Path,
        nargs="+",
        help="retrain the MAPs and score every method against saved NUTS draws",
    )
    return parser.parse_args(argv)


class _Timer:
    """Wall and CPU seconds since creation, and the load average at the end."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def cost(self) -> dict[str, float]:
        return {
            "wall": time.perf_counter() - self.wall,
            "cpu": time.process_time() - self.cpu,
            "load": os.getloadavg()[0],
        }


def _setup() -> None:
    torch.set_num_threads(1)
    pyro.enable_validation(False)  # validation checks cost more than the small nets


def run_study(args: argparse.Namespace) -> Study:
    """Every problem of ``args`` (with new NUTS chains), timed."""
    _setup()
    timer, results, commit = _Timer(), [], git_commit()
    for name in args.problems:
        problem = quick(PROBLEMS[name]) if args.quick else PROBLEMS[name]
        results.append(run_problem(problem, args.seed, 300 if args.quick else 2000))
        print(f"{name}: done after {timer.cost()['wall']:.0f} s", flush=True)
    names = tuple(args.problems)
    return results, [Run(names, _command(args), commit, timer.cost())]


def rescore(study: Study, args: argparse.Namespace) -> Study:
    """The saved problems of ``args.problems`` scored again with their NUTS draws.

    Raises:
        ValueError: If a retrained MAP does not reproduce the saved MAP's scores
            (the NUTS draws would then surround another network).
    """
    _setup()
    timer, results, origins, commit = _Timer(), [], [], git_commit()
    saved, runs = study
    for old in saved:
        if old.problem.name not in args.problems:
            continue
        new = run_problem(
            old.problem, old.seed, old.map_steps, old.n_samples, nuts=old.nuts
        )
        _check_same_map(old, new)
        results.append(new)
        origins.append(next(r for r in runs if old.problem.name in r.problems))
        print(f"{old.problem.name}: rescored after {timer.cost()['wall']:.0f} s")
    names = tuple(r.problem.name for r in results)
    command = "python -m experiments.gold_standard --rescore " + " ".join(
        str(p) for p in args.rescore
    )
    origin = origins[0] if len({id(o) for o in origins}) == 1 else None
    return results, [Run(names, command, commit, timer.cost(), origin)]


def _check_same_map(old: ProblemResult, new: ProblemResult) -> None:
    for key, value in old.scores["MAP"].items():
        if key != "seconds" and abs(new.scores["MAP"][key] - value) > MAP_RTOL * abs(
            value
        ):
            raise ValueError(
                f"rescore: the retrained MAP of {old.problem.name} scores {key} = "
                f"{new.scores['MAP'][key]:.6g}, the saved one {value:.6g}; the NUTS "
                "draws belong to another MAP (different code or threads). Run NUTS "
                "again instead."
            )


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces the study's results."""
    parts = ["OMP_NUM_THREADS=1 nice -n 10 python -m experiments.gold_standard"]
    if args.problems != list(PROBLEMS):
        parts.append("--problems " + " ".join(args.problems))
    if args.quick:
        parts.append("--quick")
    if args.seed:
        parts.append(f"--seed {args.seed}")
    return " ".join(parts)


def main(argv: Sequence[str] | None = None) -> list[ProblemResult]:
    """Run the study (or rescore or load saved ones) and write the page.

    Returns:
        The per-problem results on the page.
    """
    args = parse_args(argv)
    if args.render is not None:
        study = merge_studies([load_study(p) for p in args.render])
    elif args.rescore is not None:
        study = rescore(merge_studies([load_study(p) for p in args.rescore]), args)
    else:
        study = run_study(args)
    if args.save is not None:
        save_study(args.save, study)
    path = write_page(study[0], args.out, study[1])
    print(path.read_text())
    return study[0]


if __name__ == "__main__":
    # through the importable module: saved results name its classes, not __main__'s
    importlib.import_module("experiments.gold_standard").main()
