"""Tables and Pareto plots of the recipe study (:mod:`experiments.study_recipe`).

:func:`write` turns the per-seed results of one part (classification or regression)
into ``docs/results/recipe_study_<part>.md`` and two PNGs: in-distribution NLL
against NLL under shift, and against OOD AUROC, one panel per setup, with every
method (mean and spread over seeds), the recipe's family along the temperature
(seed 0) and the target lines.

The targets (issue 16) compare the recipe with MAP and the temperature-scaled MAP of
the same seed. Classification: accuracy within 0.5 points of MAP's; in-distribution
NLL at most 1.1 x the temperature-scaled MAP's; NLL under shift at most 0.5 x MAP's;
OOD AUROC above MAP's and the temperature-scaled MAP's. Regression has no targets in
the issue; the analogues used here (Gaussian NLLs can be negative, so no ratios):
RMSE within 0.5 % of MAP's, NLL at most 0.1 nats above the noise-scaled MAP's, NLL
under shift below MAP's and the noise-scaled MAP's, OOD AUROC above both.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from experiments.report import fmt, markdown_table

MAP, SCALED, RECIPE = "MAP", "MAP + temperature", "recipe"
COLUMNS = {
    "classification": (
        "accuracy", "NLL", "ECE", "Brier", "shift accuracy", "shift NLL", "OOD AUROC",
    ),
    "regression": ("RMSE", "NLL", "shift RMSE", "shift NLL", "OOD AUROC"),
}  # fmt: skip
"""The metrics of the result tables, per part."""
TARGET_NAMES = {
    "classification": (
        "accuracy ±0.5 pts",
        "NLL ≤ 1.1 x scaled MAP",
        "shift NLL ≤ 0.5 x MAP",
        "AUROC > both",
    ),
    "regression": (
        "RMSE ≤ 1.005 x MAP",
        "NLL ≤ scaled MAP + 0.1",
        "shift NLL < both",
        "AUROC > both",
    ),
}
MARK = {True: "✓", False: "✗"}
Run = Mapping[str, Mapping[str, float]]
"""``{method: {metric: value}}`` of one seed (or means over seeds)."""


def targets(run: Run, task: str, method: str = RECIPE) -> list[bool]:
    """The four targets of ``method`` against MAP and the scaled MAP of ``run``."""
    r, m, t = run[method], run[MAP], run[SCALED]
    auroc = r["OOD AUROC"] > max(m["OOD AUROC"], t["OOD AUROC"])
    if task == "regression":
        return [
            r["RMSE"] <= 1.005 * m["RMSE"],
            r["NLL"] <= t["NLL"] + 0.1,
            r["shift NLL"] < min(m["shift NLL"], t["shift NLL"]),
            auroc,
        ]
    return [
        abs(r["accuracy"] - m["accuracy"]) <= 0.005 + 1e-9,
        r["NLL"] <= 1.1 * t["NLL"],
        r["shift NLL"] <= 0.5 * m["shift NLL"],
        auroc,
    ]


def summarize(runs: Sequence[Mapping[str, float]]) -> dict[str, tuple[float, float]]:
    """``{metric: (mean, std)}`` over the seeds with a finite value.

    A method that failed on a seed has NaN metrics there; NaN if it failed on all.
    """
    summary = {}
    for key in runs[0]:
        values = [run[key] for run in runs if math.isfinite(run[key])]
        if not values:
            summary[key] = (math.nan, math.nan)
            continue
        summary[key] = (statistics.fmean(values), _spread(values))
    return summary


def means(runs: Sequence[Run]) -> dict[str, dict[str, float]]:
    """``{method: {metric: mean over seeds}}``."""
    return {
        method: {k: v[0] for k, v in summarize([r[method] for r in runs]).items()}
        for method in runs[0]
    }


def _target_cells(mean: Run, task: str) -> list[str]:
    """Measured value and mark of each target (on the means over seeds)."""
    r, m, t = mean[RECIPE], mean[MAP], mean[SCALED]
    met = targets(mean, task)
    auroc = f"{r['OOD AUROC']:.3f} ({m['OOD AUROC']:.3f}, {t['OOD AUROC']:.3f})"
    if task == "regression":
        values = [
            f"{r['RMSE'] / m['RMSE']:.3f}",
            f"{r['NLL']:.3f} vs {t['NLL']:.3f}",
            f"{r['shift NLL']:.2f} vs {m['shift NLL']:.2f}, {t['shift NLL']:.2f}",
            auroc,
        ]
    else:
        values = [
            f"{100 * (r['accuracy'] - m['accuracy']):+.2f}",
            f"{r['NLL'] / t['NLL']:.2f}",
            f"{r['shift NLL'] / m['shift NLL']:.2f}",
            auroc,
        ]
    return [f"{MARK[ok]} {value}" for ok, value in zip(met, values, strict=True)]


def frontier_cell(done: Mapping, task: str) -> str:
    """Which points of the recipe's family meet all four targets at seed 0."""
    base = done["runs"][0]["methods"]
    hits = []
    for row in done["frontier"]:
        run = {MAP: base[MAP], SCALED: base[SCALED], RECIPE: row}
        if all(targets(run, task)):
            link = "" if row["link"] is None else f" {row['link']}"
            hits.append(f"T={row['temperature']:.2g}{link}")
    return ", ".join(hits) if hits else "none"


def frontier_best(done: Mapping, task: str) -> str:
    """The family's best shift NLL among its points that meet the NLL target (seed 0).

    How close the frontier comes to the target region: the lowest NLL under shift
    (relative to MAP's for classification) of the temperatures and links whose
    in-distribution NLL meets its target, with that point's accuracy change.
    """
    base = done["runs"][0]["methods"]
    m, t = base[MAP], base[SCALED]
    limit = 1.1 * t["NLL"] if task == "classification" else t["NLL"] + 0.1
    rows = [row for row in done["frontier"] if row["NLL"] <= limit]
    if not rows:
        return "no point meets the NLL target"
    row = min(rows, key=lambda r: r["shift NLL"])
    link = "" if row["link"] is None else f" {row['link']}"
    where = f"T={row['temperature']:.2g}{link}"
    if task == "regression":
        return f"{row['shift NLL']:.2f} ({where})"
    accuracy = 100 * (row["accuracy"] - m["accuracy"])
    ratio = row["shift NLL"] / m["shift NLL"]
    return f"{ratio:.2f} ({where}, accuracy {accuracy:+.1f})"


def targets_table(done: Mapping[str, Mapping], task: str) -> str:
    """Per setup: each target on the means, seeds meeting all, the family's hits."""
    rows = []
    for key, result in done.items():
        runs = [r["methods"] for r in result["runs"]]
        seeds = sum(all(targets(r, task)) for r in runs)
        cells = _target_cells(means(runs), task)
        row = [key, *cells, f"{seeds}/{len(runs)}", frontier_cell(result, task),
               frontier_best(result, task)]  # fmt: skip
        if task == "classification":
            row.append(_uniform_cell(means(runs), result["info"]["classes"]))
        rows.append(row)
    header = [
        "setup",
        *TARGET_NAMES[task],
        "seeds meeting all four",
        "family points meeting all four (seed 0)",
        "family: best shift NLL within the NLL target (seed 0)",
    ]
    if task == "classification":
        header.append("shift target vs uniform NLL")
    return markdown_table(header, rows)


def _uniform_cell(mean: Run, classes: int) -> str:
    """The shift target against ``log C``, the NLL of a uniform prediction.

    A posterior that only adds uncertainty to MAP's wrong predictions under shift
    moves their NLL towards ``log C``; a target below it needs better predictions.
    """
    target, uniform = 0.5 * mean[MAP]["shift NLL"], math.log(classes)
    return f"{target:.2f} {'<' if target < uniform else '≥'} {uniform:.2f}"


def methods_table(done: Mapping[str, Mapping], task: str) -> str:
    """Per setup and method: the four targets on the means over seeds."""
    methods = list(next(iter(done.values()))["runs"][0]["methods"])
    others = [m for m in methods if m not in (MAP, SCALED)]
    rows = []
    for key, result in done.items():
        mean = means([r["methods"] for r in result["runs"]])
        rows.append(
            [key, *("".join(MARK[ok] for ok in targets(mean, task, m)) for m in others)]
        )
    return markdown_table(["setup", *others], rows)


def results_table(result: Mapping, task: str) -> str:
    """Methods as rows, the part's metrics and CPU seconds as columns."""
    runs = [r["methods"] for r in result["runs"]]
    rows = []
    for method in runs[0]:
        summary = summarize([r[method] for r in runs])
        cells = [fmt(summary[c]) for c in COLUMNS[task]]
        done = sum(math.isfinite(r[method]["NLL"]) for r in runs)
        name = method if done == len(runs) else f"{method} ({done}/{len(runs)} seeds)"
        rows.append([name, *cells, f"{summary['seconds'][0]:.1f}"])
    return markdown_table(["method", *COLUMNS[task], "CPU s"], rows)


def choices_table(done: Mapping[str, Mapping]) -> str:
    """What the recipe chose, per setup and seed."""
    rows = []
    for key, result in done.items():
        for seed, run in enumerate(result["runs"]):
            c = run["recipe"]
            sigma = "—" if c["sigma_noise"] is None else f"{c['sigma_noise']:.3g}"
            rows.append([
                key, str(seed), c["structure"], f"{c['temperature']:.3g}",
                str(c["link"] or "—"), f"{c['prior_precision']:.3g}", sigma,
                f"{c['val_nll']:.3f} ({c['n_val']})",
            ])  # fmt: skip
    header = ["setup", "seed", "structure", "T", "link", "prior precision", "noise std",
              "val NLL (samples)"]  # fmt: skip
    return markdown_table(header, rows)


def _spread(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def setups_table(done: Mapping[str, Mapping]) -> str:
    """The data, shift, OOD set and network of every setup."""
    rows = []
    for key, result in done.items():
        info = result["info"]
        part = "design" if result["setup"].design else "held-out"
        sizes = f"{info['n_train']} / {info['n_val']} / {info['n_test']}"
        rows.append(
            [key, part, sizes, info["shift"], info["ood"], f"{info['params']:,}"]
        )
    header = ["setup", "part", "train / val / test", "shift", "OOD", "parameters"]
    return markdown_table(header, rows)


def _coordinates(run: Run, method: str, task: str, y: str) -> tuple[float, float]:
    """Plot position of ``method``: relative NLLs (classification) or absolute."""
    r = run[method]
    if task == "classification":
        x_value = r["NLL"] / run[SCALED]["NLL"]
        shift = r["shift NLL"] / run[MAP]["shift NLL"]
    else:
        x_value, shift = r["NLL"], r["shift NLL"]
    return x_value, shift if y == "shift" else r["OOD AUROC"]


def _target_lines(ax, runs: Sequence[Run], task: str, y: str) -> None:
    mean = means(runs)
    m, t = mean[MAP], mean[SCALED]
    ax.axvline(1.1 if task == "classification" else t["NLL"] + 0.1, color="gray",
               linestyle="--", linewidth=1)  # fmt: skip
    if y == "ood":
        level = max(m["OOD AUROC"], t["OOD AUROC"])
    elif task == "classification":
        level = 0.5
    else:
        level = min(m["shift NLL"], t["shift NLL"])
    ax.axhline(level, color="gray", linestyle="--", linewidth=1)


def _panel(ax, result: Mapping, task: str, y: str) -> None:
    """One setup: methods (mean ± std over seeds), the family at seed 0, targets."""
    runs = [r["methods"] for r in result["runs"]]
    for i, method in enumerate(runs[0]):
        points = [_coordinates(run, method, task, y) for run in runs]
        points = [p for p in points if all(map(math.isfinite, p))]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        ax.errorbar(
            statistics.fmean(xs), statistics.fmean(ys), xerr=_spread(xs),
            yerr=_spread(ys), fmt="o*"[method == RECIPE], markersize=9 if method ==
            RECIPE else 5, color=f"C{i}", label=method, capsize=2,
        )  # fmt: skip
    base = runs[0]
    links = sorted({row["link"] for row in result["frontier"]}, key=str)
    for style, link in zip(("-", ":"), links, strict=False):
        rows = [row for row in result["frontier"] if row["link"] == link]
        run = {**base}
        points = [
            _coordinates(run | {"family": row}, "family", task, y) for row in rows
        ]
        xs, ys = zip(*points, strict=True)
        label = "recipe family (seed 0)" + ("" if link is None else f", {link}")
        ax.plot(xs, ys, style, color="black", alpha=0.5, linewidth=1, label=label)
    _target_lines(ax, runs, task, y)
    part = "design" if result["setup"].design else "held-out"
    ax.set_title(f"{result['setup'].key} ({part})", fontsize="small")
    if task == "regression":
        ax.set_xscale("symlog")
        if y == "shift":
            ax.set_yscale("symlog")
    else:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter("{x:g}")
        ax.xaxis.set_minor_formatter("")


def plot_pareto(done: Mapping[str, Mapping], task: str, y: str, path: Path) -> None:
    """One panel per setup: in-distribution NLL against shift NLL or OOD AUROC."""
    from matplotlib.figure import Figure  # noqa: PLC0415

    cols = min(5 if len(done) > 6 else 3, len(done))
    rows = -(-len(done) // cols)
    figure = Figure(figsize=(3.3 * cols, 3.0 * rows + 0.8), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False).flatten()
    for ax, result in zip(axes, done.values(), strict=False):
        _panel(ax, result, task, y)
    for ax in axes[len(done) :]:
        ax.set_axis_off()
    relative = task == "classification"
    xlabel = "NLL / scaled MAP's" if relative else "NLL"
    ylabel = {
        "shift": "shift NLL / MAP's" if relative else "shift NLL",
        "ood": "OOD AUROC",
    }[y]
    for ax in axes[::cols]:
        ax.set_ylabel(ylabel)
    for ax in axes[-cols:]:
        ax.set_xlabel(xlabel)
    handles, labels = axes[0].get_legend_handles_labels()
    columns = max(2, min(4, cols))
    figure.legend(handles, labels, loc="outside lower center", ncols=columns,
                  fontsize="small")  # fmt: skip
    figure.savefig(path, dpi=110)


INTRO = """\
# Recipe study: {part}

Generated by `OMP_NUM_THREADS=1 nice python -m experiments.study_recipe --part {part}`
(cached results under `experiments/results/recipe_study/`; CPU seconds measured on a
shared 2-core machine, load {load}). {seeds} training seeds per setup: each seed
draws its own 60/15/25 % train/validation/test split and initialization. Methods:
**MAP**; **MAP + temperature** (the MAP's {scale} fitted on the validation NLL);
**deep ensemble (5)** (the MAP and four more seeds); **LA defaults**
(`Laplace(model, "{task}")`, `fit`, `optimize_prior_precision()`, `la(x)`); **LA
marglik-trained** (`marglik_training`: all-weights KFAC, layer-wise prior, trained
from the MAP's initialization); **recipe** (`bayescurv.recipes.calibrated(model,
train_loader, val_loader)`). The recipe's design was frozen on the **design** setups
(digits with the two MLPs) before any held-out setup was run; nothing of it was fitted
to a held-out setup. The **recipe family** curves are the candidates the recipe
chooses from (all weights, its structure, evidence-tuned prior at each temperature,
half decades of temperature: {frontier}) evaluated at seed 0: where no point of a
curve lies inside the target lines, no temperature of the family meets the targets.

Targets (on the means over seeds; issue 16): {targets}.
"""
CELL_TEXT = {
    "classification": (
        "accuracy: points vs MAP; NLL: ratio to the scaled MAP's; shift NLL: ratio "
        "to MAP's; AUROC: recipe (MAP, scaled MAP)"
    ),
    "regression": (
        "RMSE: ratio to MAP's; NLL: recipe vs scaled MAP; shift NLL: recipe vs MAP, "
        "scaled MAP; AUROC: recipe (MAP, scaled MAP)"
    ),
}
FRONTIER_RANGE = {"classification": "1 to 1e-3", "regression": "1e3 to 1e-3"}
TARGET_TEXT = {
    "classification": (
        "accuracy within 0.5 points of MAP's, in-distribution NLL at most 1.1 x the "
        "temperature-scaled MAP's, NLL under shift at most 0.5 x MAP's, OOD AUROC "
        "(max-probability score) above MAP's and the temperature-scaled MAP's"
    ),
    "regression": (
        "the issue has none for regression; the analogues here: RMSE within 0.5 % "
        "of MAP's, NLL at most 0.1 nats above the noise-scaled MAP's, NLL under shift "
        "below MAP's and the noise-scaled MAP's, OOD AUROC (negative predictive std "
        "as the score) above both. NLLs in standardized target units"
    ),
}


def _part_sections(title: str, done: Mapping[str, Mapping], task: str) -> list[str]:
    if not done:
        return []
    met = sum(
        all(targets(means([r["methods"] for r in d["runs"]]), task))
        for d in done.values()
    )
    return [
        f"## {title}: the recipe against the targets",
        f"All four targets met (on the means) on {met} of {len(done)} setups. Each "
        f"cell: ✓/✗ and the measured value ({CELL_TEXT[task]}).",
        targets_table(done, task),
        f"### {title}: every method against the same targets (means over seeds)",
        methods_table(done, task),
    ]


def provenance(done: Mapping[str, Mapping]) -> str:
    """Which code commit computed the runs of which setups, one line per commit.

    Runs cached before the commit was recorded count as ``"unrecorded"``.
    """
    setups: dict[str, list[str]] = {}
    for key, result in done.items():
        for commit in sorted(
            {run.get("commit", "unrecorded") for run in result["runs"]}
        ):
            setups.setdefault(commit, []).append(key)
    lines = [f"- commit {c}: {', '.join(keys)}" for c, keys in setups.items()]
    return "Runs (and the seed-0 family curves) computed with:\n\n" + "\n".join(lines)


def write(part: str, done: Mapping[str, Mapping], seeds: int, out: Path) -> list[Path]:
    """Write ``recipe_study_<part>.md`` and its two Pareto PNGs into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    plots = {y: out / f"recipe_study_{part}_{y}.png" for y in ("shift", "ood")}
    for y, path in plots.items():
        plot_pareto(done, part, y, path)
    design = {k: v for k, v in done.items() if v["setup"].design}
    held_out = {k: v for k, v in done.items() if not v["setup"].design}
    scale = "logit temperature" if part == "classification" else "noise std"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    sections = [
        INTRO.format(
            part=part,
            seeds=seeds,
            scale=scale,
            task=part,
            load=load,
            targets=TARGET_TEXT[part],
            frontier=FRONTIER_RANGE[part],
        ),
        "## Setups",
        setups_table(done),
        *_part_sections("Held-out setups", held_out, part),
        *_part_sections("Design setups", design, part),
        "## Pareto plots",
        f"In-distribution NLL against NLL under shift (dashed: the targets; the "
        f"target region is to the left of the vertical and below the horizontal "
        f"line):\n\n![shift]({plots['shift'].name})",
        f"In-distribution NLL against OOD AUROC (target region: left of the vertical, "
        f"above the horizontal line):\n\n![ood]({plots['ood'].name})",
        "## Results per setup (mean ± std over seeds)",
    ]
    for key, result in done.items():
        sections += [f"### {key}", results_table(result, part)]
    sections += ["## What the recipe chose", choices_table(done)]
    failures = [
        f"- {key}, seed {seed}: {method} failed ({message}); its metrics are NaN."
        for key, result in done.items()
        for seed, run in enumerate(result["runs"])
        for method, message in run.get("failed", {}).items()
    ]
    if failures:
        sections += ["## Failures", "\n".join(failures)]
    sections += ["## Provenance", provenance(done)]
    path = out / f"recipe_study_{part}.md"
    path.write_text("\n\n".join(sections) + "\n")
    return [path, *plots.values()]
