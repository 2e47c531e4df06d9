"""How close is each Laplace variant to the true posterior? NUTS as the gold standard.

On three small Bayesian neural networks (:mod:`experiments.gold_problems`: a 1-D
regression with a gap, two moons, digits with a 4-unit net), Pyro's NUTS samples the
posterior of the :class:`~bayescurv.laplace.pyro_model.BayesianNetwork` with one
fixed Gaussian prior (:mod:`experiments.gold_nuts`). Every Laplace variant (subset x
structure x prior x predictive, :mod:`experiments.gold_methods`), the MAP and a deep
ensemble of 5 are scored against it (:mod:`experiments.gold_report`): predictive
NLL on test data and a distance between predictive distributions per test point.

Writes ``gold_standard.md`` and PNGs into ``--out`` (default ``docs/results``)::

    OMP_NUM_THREADS=1 nice -n 10 python -m experiments.gold_standard
    python -m experiments.gold_standard --quick --problems moons --out /tmp/gold
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch
from torch import Tensor

from experiments import gold_report as report
from experiments.gold_methods import (
    DEFAULT,
    ENSEMBLE_SIZE,
    STRUCTURES,
    SUBSETS,
    Fitted,
    Prediction,
    laplace_variants,
    map_prediction,
    methods,
)
from experiments.gold_nuts import NutsRun, diagnostics, run_nuts
from experiments.gold_problems import PROBLEMS, Data, Problem, quick, train_map

REFERENCE = "NUTS"
FLOOR = "NUTS half vs half (noise floor)"


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
    problem: Problem, seed: int, map_steps: int = 2000, n_samples: int = 1000
) -> ProblemResult:
    """MAPs, NUTS, every method and their scores on one problem.

    Args:
        problem: The problem.
        seed: Data split, NUTS and Monte Carlo seed.
        map_steps: Adam and L-BFGS steps of every MAP (at most).
        n_samples: Draws of every Monte Carlo predictive.
    """
    data = problem.make_data(seed)
    begin = time.perf_counter()
    nets = [train_map(problem, data, s, map_steps) for s in range(ENSEMBLE_SIZE)]
    fitted = Fitted(problem, data, nets, n_samples, seed)
    seconds = {"map": time.perf_counter() - begin}
    nuts = run_nuts(problem, data, fitted.nets[0], seed)
    seconds["nuts"] = nuts.seconds
    inputs = evaluation_inputs(data)
    ref, halves, function_diagnostics = nuts_predictions(problem, fitted, nuts, inputs)
    scores = {
        REFERENCE: scores_of(ref, ref, fitted),
        FLOOR: scores_of(halves[0], halves[1], fitted),
    }
    plots = {REFERENCE: ref.get("grid", ref["test"])}
    begin = time.perf_counter()
    for name, method in methods(problem.likelihood).items():
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


# ------------------------------------------------------------------ the report
TOP = 5
"""A method is "among the closest" if it is in the top ``TOP`` by test distance."""
METHOD_ROWS = 12
"""Variants listed in the summary's rank table (plus the default and baselines)."""


def _contenders(result: ProblemResult) -> dict[str, dict[str, float]]:
    """The scored methods without the NUTS reference rows."""
    return {k: v for k, v in result.scores.items() if k not in {REFERENCE, FLOOR}}


def _columns(result: ProblemResult) -> list[str]:
    regions = list(result.data.regions)
    grid = ["dist/grid"] if "dist/grid" in result.scores["MAP"] else []
    dists = [*(f"dist/{r}" for r in regions), *grid]
    return [*dists, *(f"nll/{r}" for r in regions), "seconds"]


def setup_section(results: Sequence[ProblemResult]) -> list[str]:
    """The problems, and how prior, distances and NUTS are set up."""
    header = ["problem", "data and network", "weights", "prior precision", "NUTS"]
    rows = [
        [
            r.problem.name,
            r.problem.description,
            str(r.problem.num_weights),
            f"{r.problem.prior_precision:g}",
            f"{r.problem.nuts.chains} chains x ({r.problem.nuts.warmup} warm-up + "
            f"{r.problem.nuts.samples} draws), max tree depth "
            f"{r.problem.nuts.max_tree_depth}",
        ]
        for r in results
    ]
    return ["## Setup", "", report.markdown_table(header, rows), "", SETUP_TEXT, ""]


SETUP_TEXT = """\
**Prior.** Every weight has the prior N(0, 1/π) with the precision π of the table,
the same for NUTS, the MAP (it minimizes the negative log joint of the same
`BayesianNetwork`), the deep ensemble and the Laplace rows marked `fixed`: the clean
comparison. Rows marked `evidence` replace it by one scalar prior precision that
maximizes the Laplace evidence (`la.optimize_prior_precision(method="marglik")`, the
library's default), so they approximate the posterior under another prior than the
one NUTS samples (tuned values below); that is part of what the library default
does. The regression noise sigma = 0.1 (the toy's) is fixed everywhere.

**Scores.** Per test point, against the NUTS predictive: classification
KL(p_NUTS ‖ p_method) of the class probabilities; regression the Wasserstein-2
distance between the Gaussians N(m, s²) with the predictive mean and variance of f
(`dist/*`, averaged over the points of a region; `dist/grid` for moons is the KL on a
grid around the data, where the predictive should become uncertain). `nll/*`: the
predictive negative log likelihood of the test targets (regression: of y = f + ε, the
mixture over draws for sampling methods; MAP: N(f, σ²)). Monte Carlo predictives
(`mc`, `nn`) use 1,000 draws. `NUTS` is NUTS's own NLL; `NUTS half vs half` the
distance between the predictives of the first and the second half of the chains, a
floor below which differences are NUTS's own noise. `seconds`: wall clock of
the method's predictions (the first row of each fitted approximation includes its
fit and evidence tuning).

**NUTS.** Pyro's NUTS on the potential `-BayesianNetwork.log_joint` (the model of
`bayescurv.laplace.pyro.to_pyro`), in coordinates whitened by the all-weights full
Laplace covariance at the MAP (a dense mass matrix: the target is unchanged, only the
sampler's efficiency), with step size and a diagonal mass matrix adapted in warm-up,
target acceptance 0.8. A BNN posterior has many modes, and chains started at the MAPs
of different initializations stay in their own (in a smoke test, split R-hat of the
predictions up to 8.7 on digits): their pooled draws would weigh the modes equally,
not by their mass. The gold standard here is therefore the posterior of the basin of
the MAP that every Laplace approximation expands around: all chains start there, from
independent draws of that Laplace posterior, and R-hat checks that they agree. The
deep ensemble averages five basins; its distance to NUTS includes the spread between
modes, which no single-basin method can have."""


def nuts_section(results: Sequence[ProblemResult]) -> list[str]:
    """R-hat and ESS of the predictions, divergences and cost per problem."""
    header = [
        "problem",
        "R-hat max",
        "R-hat median",
        "ESS min",
        "ESS median",
        "divergences",
        "gradients",
        "NUTS seconds",
        "weights: R-hat median",
    ]
    rows = []
    for r in results:
        d = r.function_diagnostics
        rows.append(
            [
                r.problem.name,
                f"{d['rhat_max']:.3f}",
                f"{d['rhat_median']:.3f}",
                f"{d['ess_min']:.0f}",
                f"{d['ess_median']:.0f}",
                str(r.nuts.divergences),
                str(r.nuts.gradient_evaluations),
                f"{r.nuts.seconds:.0f}",
                f"{r.weight_rhat:.2f}",
            ]
        )
    text = (
        "Split R-hat and bulk ESS over the chains of every prediction at the test "
        "points (regression: f; classification: the class probabilities). R-hat of "
        "the weights themselves (last column) is large whenever chains sit in "
        "symmetric copies of one mode (hidden units permuted or sign-flipped), which "
        "give the same function; the predictions are what the study compares."
    )
    tuned = tuned_priors(results)
    return [
        "## NUTS convergence",
        "",
        report.markdown_table(header, rows),
        "",
        text,
        "",
        "Evidence-tuned scalar prior precisions (π of NUTS in the setup table):",
        "",
        tuned,
        "",
    ]


def tuned_priors(results: Sequence[ProblemResult]) -> str:
    """The ``marglik``-tuned prior precision of every (subset, structure) at T=1."""
    tuned = [r.tuned_priors for r in results]
    keys = sorted({key for values in tuned for key in values})
    header = ["problem", *(f"{subset} {structure}" for subset, structure in keys)]
    rows = [
        [r.problem.name, *(f"{values[k]:.3g}" if k in values else "" for k in keys)]
        for r, values in zip(results, tuned, strict=True)
    ]
    return report.markdown_table(header, rows)


def problem_section(result: ProblemResult, figures: dict[str, str]) -> list[str]:
    """One problem's score table, its closest methods and the default's rank."""
    problem, contenders = result.problem, _contenders(result)
    name = report.distance_name(problem.likelihood)
    lines = [
        f"## {problem.name}",
        "",
        f"{problem.description}; methods sorted by the mean {name} to NUTS on the "
        f"test points (`dist/all`). MAP test {result.map_quality}.",
        "",
        report.score_table(result.scores, _columns(result), "dist/all"),
        "",
    ]
    ensemble = contenders[f"deep ensemble ({ENSEMBLE_SIZE})"]["dist/all"]
    if math.isclose(ensemble, contenders["MAP"]["dist/all"], rel_tol=1e-6):
        lines += [
            f"The {ENSEMBLE_SIZE} initializations reach the same predictions (one "
            "mode up to the symmetries of the hidden units): the ensemble is the MAP.",
            "",
        ]
    keys = {"dist/all": "the test points", "dist/grid": "the grid"}
    for key, where in keys.items():
        if key in contenders["MAP"]:
            lines.append(closest_line(contenders, key, where, problem.likelihood))
    lines += ["", *(f"![{caption}]({path})" for caption, path in figures.items())]
    return [*lines, ""]


def closest_line(
    contenders: dict[str, dict[str, float]], key: str, where: str, likelihood: str
) -> str:
    """The ``TOP`` closest methods by ``key`` and the library default's rank."""
    default = DEFAULT[likelihood].name
    top = ", ".join(f"`{n}`" for n in report.closest(contenders, key, TOP))
    rank = report.rank_of(contenders, key, default)
    return (
        f"- On {where}: closest {TOP} {top}; the library default (`{default}`) "
        f"ranks {rank} of {len(contenders)}."
    )


def map_quality(fitted: Fitted) -> str:
    """MAP's test accuracy (classification) or RMSE against the targets."""
    data = fitted.data
    pred = map_prediction(fitted, data.x_test)
    if pred.probs is not None:
        accuracy = (pred.probs.argmax(-1) == data.y_test).double().mean().item()
        return f"accuracy {accuracy:.3f}"
    rmse = (pred.f_mean - data.y_test[:, 0]).square().mean().sqrt().item()
    return f"RMSE {rmse:.3f} (all grid points, noise std 0.1)"


def best_per_structure(results: Sequence[ProblemResult]) -> str:
    """For every subset x structure, its closest variant's distance per problem."""
    header = ["subset, structure", *(r.problem.name for r in results)]
    rows = []
    for subset in SUBSETS:
        for structure in STRUCTURES:
            prefix = f"LA {subset} {structure},"
            row = [f"{subset} {structure}"]
            for r in results:
                mine = {k: v for k, v in _contenders(r).items() if k.startswith(prefix)}
                best = min(mine, key=lambda n, m=mine: m[n]["dist/all"])
                row.append(f"{mine[best]['dist/all']:.3g} ({best[len(prefix) + 1 :]})")
            rows.append(row)
    return report.markdown_table(header, rows)


AXES = {
    "subset": lambda v: v.subset,
    "structure": lambda v: v.structure,
    "prior": lambda v: v.prior,
    "predictive": lambda v: v.how,
}
"""Attributes along which the Laplace variants (at T = 1) are grouped."""


def axis_table(results: Sequence[ProblemResult], axis: str) -> str:
    """Median (and smallest) distance to NUTS of the variants grouped by ``axis``."""
    groups: dict[str, dict[str, list[float]]] = {}
    for r in results:
        for variant in laplace_variants(r.problem.likelihood):
            if variant.temperature != 1:
                continue
            label = AXES[axis](variant)
            values = groups.setdefault(label, {}).setdefault(r.problem.name, [])
            values.append(r.scores[variant.name]["dist/all"])
    rows = [
        [
            label,
            *(
                f"{statistics.median(cells[r.problem.name]):.3g} "
                f"({min(cells[r.problem.name]):.3g})"
                if r.problem.name in cells
                else ""
                for r in results
            ),
        ]
        for label, cells in groups.items()
    ]
    return report.markdown_table([axis, *(r.problem.name for r in results)], rows)


def rank_table(results: Sequence[ProblemResult]) -> tuple[str, dict[str, float]]:
    """Ranks by test distance per problem; rows sorted by mean relative rank."""
    relative: dict[str, list[float]] = {}
    cells: dict[str, dict[str, str]] = {}
    for r in results:
        contenders = _contenders(r)
        for name in contenders:
            rank = report.rank_of(contenders, "dist/all", name)
            relative.setdefault(name, []).append(rank / len(contenders))
            cells.setdefault(name, {})[r.problem.name] = f"{rank}/{len(contenders)}"
    mean = {name: sum(v) / len(v) for name, v in relative.items()}
    order = sorted(mean, key=mean.get)
    keep = set(order[:METHOD_ROWS]) | {d.name for d in DEFAULT.values()}
    keep |= {"MAP", f"deep ensemble ({ENSEMBLE_SIZE})"}
    rows = [
        [
            name,
            *(cells[name].get(r.problem.name, "") for r in results),
            f"{mean[name]:.2f}",
        ]
        for name in order
        if name in keep
    ]
    header = ["method", *(r.problem.name for r in results), "mean rank / N"]
    return report.markdown_table(header, rows), mean


def verdict(result: ProblemResult) -> str:
    """Is the library default among the closest; and its posterior's best link."""
    contenders = _contenders(result)
    default = DEFAULT[result.problem.likelihood]
    rank = report.rank_of(contenders, "dist/all", default.name)
    best = report.closest(contenders, "dist/all", 1)[0]
    same_posterior = [
        v.name
        for v in laplace_variants(result.problem.likelihood)
        if (v.subset, v.structure, v.prior, v.temperature)
        == (default.subset, default.structure, default.prior, default.temperature)
        and v != default
    ]
    line = (
        f"- {result.problem.name}: closest `{best}` "
        f"({contenders[best]['dist/all']:.3g}; NUTS floor "
        f"{result.scores[FLOOR]['dist/all']:.3g}); the default ranks {rank} of "
        f"{len(contenders)} ({contenders[default.name]['dist/all']:.3g}): among the "
        f"closest {TOP}? {'**yes**' if rank <= TOP else '**no**'}"
    )
    if same_posterior:
        other = min(same_posterior, key=lambda n: contenders[n]["dist/all"])
        line += (
            f"; its posterior with the predictive `{other.split(', ')[-1]}` ranks "
            f"{report.rank_of(contenders, 'dist/all', other)} "
            f"({contenders[other]['dist/all']:.3g})"
        )
    return line + "."


def summary_section(results: Sequence[ProblemResult]) -> list[str]:
    """Where each variant is closest, and whether the default is among the closest."""
    table, _ = rank_table(results)
    verdicts = [verdict(r) for r in results]
    return [
        "## Where each variant is closest",
        "",
        "The closest variant of every subset and structure per problem (mean "
        "distance to NUTS on the test points; prior and predictive in brackets):",
        "",
        best_per_structure(results),
        "",
        "Along each option, the median (in brackets: the smallest) distance of the "
        "Laplace variants that share it (T = 1):",
        "",
        *(line for axis in AXES for line in (axis_table(results, axis), "")),
        f"Ranks by the same distance (1 = closest; the {METHOD_ROWS} best by mean "
        "relative rank, the defaults and the baselines):",
        "",
        table,
        "",
        "The library's documented default (last-layer KFAC, evidence-tuned prior, "
        "probit):",
        "",
        *verdicts,
        "",
    ]


# ------------------------------------------------------------------- the plots
def write_figures(result: ProblemResult, out: Path) -> dict[str, str]:
    """The problem's predictive plot (regression, moons), as ``{caption: file}``."""
    data, name = result.data, result.problem.name
    path = out / f"gold_standard_{name}.png"
    if result.problem.likelihood == "regression":
        report.plot_regression(
            data.x_train,
            data.y_train,
            data.x_grid,
            result.plots,
            result.plots[REFERENCE],
            path,
        )
        return {f"{name}: mean ± 2 std of f (dashed: NUTS)": path.name}
    if data.x_grid is not None and data.x_grid.shape[1] == 2:
        probs = {k: v.probs for k, v in result.plots.items()}
        report.plot_moons(data.x_train, data.y_train, data.x_grid, probs, path)
        return {f"{name}: predicted probability of class 1": path.name}
    return {}


def write_distance_plot(results: Sequence[ProblemResult], out: Path) -> str:
    """Bars of the closest methods per problem; returns the file name."""
    panels = {
        r.problem.name: (
            {k: v["dist/all"] for k, v in _contenders(r).items()},
            r.scores[FLOOR]["dist/all"],
            f"mean {report.distance_name(r.problem.likelihood)} to NUTS (test)",
        )
        for r in results
    }
    path = out / "gold_standard_distances.png"
    report.plot_distances(panels, path)
    return path.name


# -------------------------------------------------------------------- the page
def write_page(
    results: Sequence[ProblemResult], out: Path, command: str, cost: dict[str, float]
) -> Path:
    """Write ``gold_standard.md`` (and its figures) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Gold standard: Laplace approximations against NUTS",
        "",
        f"Generated by `{command}` in {cost['wall'] / 60:.1f} min wall clock "
        f"({cost['cpu'] / 60:.1f} min CPU, one thread; load average "
        f"{cost['load']:.1f} on {os.cpu_count()} shared cores). NUTS took "
        f"{sum(r.nuts.seconds for r in results) / 60:.1f} min of it.",
        "",
        "How close is each Laplace approximation's predictive to the true posterior "
        "predictive? Pyro's NUTS samples the posterior of small Bayesian neural "
        "networks; every Laplace variant (subset x structure x prior x predictive), "
        "the MAP and a deep ensemble of 5 are scored against it.",
        "",
        *setup_section(results),
        *nuts_section(results),
    ]
    for result in results:
        lines += problem_section(result, write_figures(result, out))
    lines += summary_section(results)
    distances = write_distance_plot(results, out)
    lines += [f"![closest methods per problem]({distances})", ""]
    path = out / "gold_standard.md"
    path.write_text("\n".join(lines))
    return path


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
    parser.add_argument(
        "--render", type=Path, help="write the page from results saved by --save"
    )
    return parser.parse_args(argv)


def run_study(args: argparse.Namespace) -> dict[str, object]:
    """Every problem of ``args``, timed: ``{"results", "cost", "command"}``."""
    torch.set_num_threads(1)
    pyro.enable_validation(False)  # validation checks cost more than the small nets
    begin, begin_cpu = time.perf_counter(), time.process_time()
    results = []
    for name in args.problems:
        problem = quick(PROBLEMS[name]) if args.quick else PROBLEMS[name]
        results.append(run_problem(problem, args.seed, 300 if args.quick else 2000))
        print(f"{name}: done after {time.perf_counter() - begin:.0f} s", flush=True)
    cost = {
        "wall": time.perf_counter() - begin,
        "cpu": time.process_time() - begin_cpu,
        "load": os.getloadavg()[0],
    }
    return {"results": results, "cost": cost, "command": _command(args)}


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
    """Run the study (or load a saved one) and write the page.

    Returns:
        The per-problem results.
    """
    args = parse_args(argv)
    if args.render is not None:
        study = torch.load(args.render, weights_only=False)
    else:
        study = run_study(args)
        if args.save is not None:
            torch.save(study, args.save)
    path = write_page(study["results"], args.out, study["command"], study["cost"])
    print(path.read_text())
    return study["results"]


if __name__ == "__main__":
    main()
