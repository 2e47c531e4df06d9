"""The Laplace study (Laplace Redux-style): MAP vs Laplace on digits and regression.

* ``--part classification``: the digits MLP (``mlp(64, 100, 10)``) and the small CNN,
  trained to the MAP exactly as in ``study_map_baseline`` (same seeds, so MAP's rows
  reproduce the baseline), against Laplace approximations of the same networks
  (last-layer kron / full, all-weights diag / kron; marglik prior tuning; probit)
  and the recommended recipe (:data:`experiments.laplace_recipes.RECOMMENDED`):
  in-distribution accuracy, NLL, ECE, Brier; NLL, ECE and accuracy on test digits
  rotated 0-180° (R-MNIST protocol); AUROC and FPR@95 on six derived OOD sets.
* ``--part regression``: the 1-D gap toy (mean ± predictive std per input region,
  plot) and diabetes (test NLL and RMSE), MAP vs Laplace
  (``experiments.laplace_regression``).

Writes ``docs/results/laplace_<part>.md`` and PNGs beside them, and prints them.
Run from the repository root (single-threaded; about 3 min CPU for
classification, 1 min for regression):
``python -m experiments.study_laplace --part classification`` (or ``regression``,
or ``all``).
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from experiments import data, laplace_regression, models, report
from experiments.evaluation import POOLED, evaluate_classifier, evaluation_sets
from experiments.laplace_recipes import RECOMMENDED, Recipe, fit_laplace, predictor
from experiments.report import fmt, markdown_table

CLASSIFIERS: dict[str, Callable[[int], nn.Module]] = {
    "mlp-100": lambda seed: models.mlp(64, 100, 10, seed=seed),
    "cnn": lambda seed: models.small_cnn(seed=seed),
}
METHODS: dict[str, Recipe | None] = {
    "MAP": None,
    "LA last-layer kron": Recipe(
        subset="last_layer", structure="kron", tuning="marglik", link="probit"
    ),
    "LA last-layer full": Recipe(
        subset="last_layer", structure="full", tuning="marglik", link="probit"
    ),
    "LA all diag": Recipe(
        subset="all", structure="diag", tuning="marglik", link="probit"
    ),
    "LA all kron": Recipe(
        subset="all", structure="kron", tuning="marglik", link="probit"
    ),
    "LA recommended": RECOMMENDED,
}
"""The compared methods (``None``: the MAP network's softmax)."""
COMPARED = {
    "in/NLL": ("in-distribution NLL", True),
    "in/ECE": ("in-distribution ECE", True),
    "in/Brier": ("in-distribution Brier", True),
    "rot/60/NLL": ("NLL at 60°", True),
    f"ood/{POOLED}/AUROC MSP": (f"AUROC {POOLED}", False),
}
"""Metric key -> (title, whether lower is better), for the comparison with MAP."""


def classification_runs(
    args: argparse.Namespace,
) -> tuple[dict[str, dict[str, list]], dict[str, dict[str, tuple[Tensor, Tensor]]]]:
    """``{model: {method: [result per seed]}}`` and seed-0 test predictions."""
    loaders = data.digits_loaders(seed=0)
    sets = evaluation_sets(loaders, seed=0)
    runs: dict[str, dict[str, list]] = {}
    reliability: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}
    for name, build in CLASSIFIERS.items():
        runs[name] = {method: [] for method in METHODS}
        reliability[name] = {}
        for seed in range(args.seeds):
            model = models.train_map(
                build(seed), loaders.train, epochs=args.epochs,
                weight_decay=args.weight_decay, seed=seed,
            )  # fmt: skip
            for method, recipe in METHODS.items():
                start = time.process_time()
                if recipe is None:
                    predict = functools.partial(models.predict_probs, model)
                else:
                    la = fit_laplace(model, loaders, recipe)
                    predict = predictor(la, recipe, seed)
                result = evaluate_classifier(predict, sets)
                result["cpu_seconds"] = time.process_time() - start
                runs[name][method].append(result)
                if seed == 0:
                    reliability[name][method] = (predict(sets.test[0]), sets.test[1])
            print(f"  {name} seed {seed} done", flush=True)
    return runs, reliability


def versus_map_line(
    title: str, base: float, values: dict[str, float], lower_is_better: bool = True
) -> str:
    """One markdown bullet: which methods (``{name: mean}``) beat MAP's ``base``."""
    better, worse = [], []
    for method, value in values.items():
        wins = value < base if lower_is_better else value > base
        (better if wins else worse).append(f"{method} ({value:.3f})")
    return (
        f"- {title} (MAP {base:.3f}): better than MAP: "
        f"{', '.join(better) or 'none'}; **not better: "
        f"{', '.join(worse) or 'none'}**."
    )


def versus_map(summaries: dict[str, report.Summary]) -> list[str]:
    """Which Laplace methods beat MAP on each compared metric (means over seeds)."""
    return [
        versus_map_line(
            title,
            summaries["MAP"][key][0],
            {m: s[key][0] for m, s in summaries.items() if m != "MAP"},
            lower_is_better,
        )
        for key, (title, lower_is_better) in COMPARED.items()
    ]


def classification_report(args: argparse.Namespace, times: tuple) -> str:
    """Run the classification part, write its PNGs, return its markdown."""
    runs, reliability = classification_runs(args)
    times = (time.perf_counter() - times[0], time.process_time() - times[1])
    sections = [
        "# Laplace study: classification on digits",
        f"Generated by `python -m experiments.study_laplace --part classification "
        f"--seeds {args.seeds} --epochs {args.epochs}` in {times[0]:.0f} s wall "
        f"clock, {times[1]:.0f} s CPU (1 thread). Mean ± std over {args.seeds} "
        "training seeds; MAP models, data and metrics as in "
        "[the MAP baseline](map_baseline.md). Laplace methods: fit on the 1,401 "
        "training digits, scalar prior precision tuned on the evidence (marglik), "
        "GLM predictive with the probit link; **LA recommended** is "
        f"`{RECOMMENDED.label()}` (see [the recipe search](recipe_search.md)).",
    ]
    for name, method_runs in runs.items():
        summaries = {m: report.summarize(r) for m, r in method_runs.items()}
        cpu = ", ".join(
            f"{m} {s['cpu_seconds'][0]:.1f} s"
            for m, s in summaries.items()
            if m != "MAP"
        )
        rotation = args.out / f"laplace_rotation_{name}.png"
        curves = {
            metric: {
                method: [s[f"rot/{a}/{metric}"] for a in data.ROTATION_ANGLES]
                for method, s in summaries.items()
            }
            for metric in ("NLL", "ECE", "accuracy")
        }
        report.plot_curves(curves, data.ROTATION_ANGLES, "rotation (degrees)", rotation)
        diagrams = args.out / f"laplace_reliability_{name}.png"
        keep = ("MAP", "LA last-layer kron", "LA all kron", "LA recommended")
        report.plot_reliability({m: reliability[name][m] for m in keep}, diagrams)
        sections += [
            f"## {name}",
            f"Laplace fit + tuning + evaluation, CPU seconds per seed: {cpu}.",
            "### In-distribution (test set)",
            report.in_distribution_table(summaries),
            "### Dataset shift: rotated test digits",
            f"![NLL, ECE and accuracy against rotation]({rotation.name})",
            "#### NLL",
            report.rotation_table(summaries, "NLL"),
            "#### ECE",
            report.rotation_table(summaries, "ECE"),
            "### Out-of-distribution detection (max-probability score)",
            "#### AUROC",
            report.ood_comparison_table(summaries, "AUROC MSP"),
            "#### FPR@95",
            report.ood_comparison_table(summaries, "FPR@95 MSP"),
            "### Reliability diagrams (seed 0)",
            f"![reliability diagrams]({diagrams.name})",
            "### Where Laplace does and does not beat MAP (means over seeds)",
            "\n".join(versus_map(summaries)),
        ]
    return "\n\n".join(sections) + "\n"


def regression_versus_map(summary: report.Summary, methods) -> list[str]:
    """Per column, which Laplace methods have a lower mean NLL than MAP."""
    columns = {
        **{f"toy/{r}/NLL": f"toy NLL ({r})" for r in laplace_regression.REGIONS},
        "diabetes/NLL": "diabetes NLL",
    }
    return [
        versus_map_line(
            title,
            summary[f"MAP/{key}"][0],
            {m: summary[f"{m}/{key}"][0] for m in methods if m != "MAP"},
        )
        for key, title in columns.items()
    ]


def regression_report(args: argparse.Namespace, times: tuple) -> str:
    """Run the regression part, write its PNG, return its markdown."""
    results, bands = [], None
    for seed in range(args.seeds):
        result, seed_bands = laplace_regression.regression_run(seed, args.epochs)
        results.append(result)
        bands = bands or seed_bands
    times = (time.perf_counter() - times[0], time.process_time() - times[1])
    summary = report.summarize(results)
    methods = laplace_regression.REGRESSION_METHODS
    header = ["method", *(f"toy NLL ({r})" for r in laplace_regression.REGIONS),
              "diabetes NLL", "diabetes RMSE"]  # fmt: skip
    rows = [
        [
            method,
            *(
                fmt(summary[f"{method}/toy/{r}/NLL"])
                for r in laplace_regression.REGIONS
            ),
            fmt(summary[f"{method}/diabetes/NLL"]),
            fmt(summary[f"{method}/diabetes/RMSE"], 1),
        ]
        for method in methods
    ]
    toy = data.gap_toy(seed=0)
    plot = args.out / "laplace_toy.png"
    shown = ("MAP", "LA last-layer kron", "LA all diag", "LA all kron", "LA all full")
    report.plot_regression_panels(
        toy.x_train, toy.y_train, toy.x_grid, toy.f_grid,
        {m: (bands[m].mean, bands[m].std) for m in shown}, plot,
    )  # fmt: skip
    rmse = [
        f"{r}: {fmt(summary[f'MAP/toy/{r}/RMSE'])}" for r in laplace_regression.REGIONS
    ]
    return "\n\n".join([
        "# Laplace study: regression",
        f"Generated by `python -m experiments.study_laplace --part regression "
        f"--seeds {args.seeds} --epochs {args.epochs}` in {times[0]:.0f} s wall "
        f"clock, {times[1]:.0f} s CPU (1 thread). Mean ± std over {args.seeds} "
        "training seeds. Networks and data as in [the MAP baseline](map_baseline.md)"
        " (gap toy: MLP 1-50-50-1; diabetes: MLP 10-50-1, original units). MAP: "
        "Gaussian predictive with the training residuals' std. Laplace: prior "
        "precision and `sigma_noise` tuned jointly on the evidence, GLM predictive "
        "of targets `la(x, noise=True)`. The GLM mean is MAP's, so the RMSE is the "
        f"same for every method (toy, against the true function: {'; '.join(rmse)}).",
        markdown_table(header, rows),
        f"![gap toy: mean ± 2 std per method (seed 0)]({plot.name})",
        "### Where Laplace does and does not beat MAP (mean NLL over seeds)",
        "\n".join(regression_versus_map(summary, methods)),
    ]) + "\n"  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--part", choices=("classification", "regression", "all"), default="all"
    )
    parser.add_argument("--seeds", type=int, default=3, help="training seeds")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    parts = ("classification", "regression") if args.part == "all" else (args.part,)
    for part in parts:
        times = (time.perf_counter(), time.process_time())
        build = classification_report if part == "classification" else regression_report
        text = build(args, times)
        path = args.out / f"laplace_{part}.md"
        path.write_text(text)
        print(text)
        pngs = sorted(p.name for p in args.out.glob("laplace_*.png"))
        print(f"wrote {path} and PNGs in {args.out}: {', '.join(pngs)}")


if __name__ == "__main__":
    main()
