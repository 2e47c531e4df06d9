"""The README demo: uncertainty on scikit-learn's digits, MAP against its baselines.

Trains the MLP ``models.mlp(64, 100, 10)`` to the MAP on the digits split of
``experiments.data`` (1,257 train / 270 validation / 270 test 8x8 images, shipped
with scikit-learn, nothing downloaded) and compares, with the public API only:

* **MAP + temperature**: the MAP's logit temperature fitted on the validation NLL
  (Guo et al., 2017);
* **deep ensemble (5)**: the MAP and four more networks trained from other seeds;
* **LA defaults**, exactly as a user writes them, with no other arguments::

      la = Laplace(model, "classification")
      la.fit(train_loader)
      la.optimize_prior_precision()
      probs = la(x)

  so this row follows the library's defaults whatever they are at run time (its
  ``posterior`` column names the weight subset and structure they resolved to);
* **recipe**: ``bayescurv.recipes.calibrated(model, train_loader, val_loader)``,
  whose structure, prior precision, temperature and link are chosen by the
  evidence and the validation split (its ``posterior`` column shows the choices);
* on request (``--methods``), named Laplace recipes with every option spelled out:
  all-weights KFAC and all-weights diagonal, a scalar prior precision tuned by the
  marginal likelihood and the GLM predictive with the probit link.

Metrics (``bayescurv.metrics`` through ``experiments.evaluation``): accuracy, NLL,
ECE (15 bins) and Brier score on the test digits; NLL and ECE on the test digits
rotated by 60 degrees; AUROC of the max-probability score for test digits against
uniform noise and inverted digits pooled (540 inputs).

Prints one markdown table (a row per method), writes PNG plots (NLL, ECE and
accuracy against rotation 0-180 degrees; reliability diagrams on the test digits
and on the digits rotated 60 degrees) to ``--out`` and prints their paths, then
the wall time. Seeded and deterministic (single-threaded by default); about 30 s
on one core, including the training of the five networks.

Run from the repository root: ``python experiments/demo.py`` (or
``python -m experiments.demo``). Flags: ``--epochs`` (training, default 100),
``--methods`` (the rows after MAP), ``--out`` (default ``docs/results/demo/``),
``--seed``, ``--threads``. The engine-cost demo is
``python experiments/demo_engine.py``. The study behind the recipe:
``python -m experiments.study_recipe``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if __package__ in {None, ""}:
    # NOTE [run as a script]: `python experiments/demo.py` puts experiments/ on
    # sys.path, not the repository root, and the experiment helpers import each
    # other as `experiments.*` (the package is not installed, only bayescurv is).
    # The root goes first, so bayescurv is imported from this checkout too.
    sys.path.insert(0, str(ROOT))

from bayescurv import Laplace, recipes  # noqa: E402
from experiments import data, models, report  # noqa: E402
from experiments.evaluation import (  # noqa: E402
    POOLED,
    EvaluationSets,
    Predict,
    evaluate_classifier,
    evaluation_sets,
)

SHIFT_ANGLE = 60
"""Rotation (degrees) of the shifted test set in the table."""
VAL_FRACTION = 0.15
"""Fraction of the digits in the validation split (270 digits)."""
COLUMNS = {
    "accuracy": "in/accuracy",
    "NLL": "in/NLL",
    "ECE": "in/ECE",
    "Brier": "in/Brier",
    f"NLL {SHIFT_ANGLE}°": f"rot/{SHIFT_ANGLE}/NLL",
    f"ECE {SHIFT_ANGLE}°": f"rot/{SHIFT_ANGLE}/ECE",
    f"AUROC {POOLED}": f"ood/{POOLED}/AUROC MSP",
}
"""Table columns and their keys in ``evaluate_classifier``'s result."""


class Fitted(NamedTuple):
    """A method's predictive and a description of its posterior."""

    predict: Predict
    posterior: str


class Context(NamedTuple):
    """What a method may use: the trained MAP, the data splits, the training."""

    model: nn.Module
    loaders: data.Loaders
    epochs: int
    seed: int


Method = Callable[[Context], Fitted]
"""Fits a method to a trained model."""
ENSEMBLE_SIZE = 5


def _describe(la: Any) -> str:
    """``"last_layer kron, P=1,010"`` for a fitted ``Laplace(...)`` object."""
    return f"{la.subset.value} {la.hessian_structure.value}, P={la.num_params:,}"


def _train(seed: int, loaders: data.Loaders, epochs: int) -> nn.Module:
    """The demo's MLP trained to the MAP from initialization ``seed``."""
    return models.train_map(
        models.mlp(64, 100, 10, seed=seed), loaders.train, epochs=epochs, seed=seed
    )


def temperature_scaled(context: Context) -> Fitted:
    """The MAP's logits divided by a temperature fitted on the validation NLL."""
    x, y = context.loaders.val.dataset.tensors
    with torch.no_grad():
        logits = context.model(x)
    grid = torch.linspace(-4.0, 4.0, 801).exp()  # log-temperature steps of 0.01
    losses = torch.stack([nn.functional.cross_entropy(logits / t, y) for t in grid])
    temperature = grid[losses.argmin()].item()

    @torch.no_grad()
    def predict(x_new: torch.Tensor) -> torch.Tensor:
        return (context.model(x_new) / temperature).softmax(-1)

    return Fitted(predict, f"point estimate, T={temperature:.2f} (validation)")


def deep_ensemble(context: Context) -> Fitted:
    """The MAP and four more networks from other seeds, probabilities averaged."""
    seeds = [context.seed + 1000 * j for j in range(1, ENSEMBLE_SIZE)]
    others = [_train(seed, context.loaders, context.epochs) for seed in seeds]
    members = [context.model, *others]

    @torch.no_grad()
    def predict(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x).softmax(-1) for m in members]).mean(0)

    return Fitted(predict, f"{ENSEMBLE_SIZE} networks")


def library_defaults(context: Context) -> Fitted:
    """The three lines of a user who takes every default of the library."""
    la = Laplace(context.model, "classification")
    la.fit(context.loaders.train)
    la.optimize_prior_precision()
    return Fitted(la, _describe(la))


def calibrated_recipe(context: Context) -> Fitted:
    """``bayescurv.recipes.calibrated`` with the validation split."""
    post = recipes.calibrated(context.model, context.loaders.train, context.loaders.val)
    c = post.choices
    described = f"{_describe(post.la)}, T={c.temperature:.2g}, {c.link}"
    return Fitted(post, described)


def recipe(subset: str, structure: str) -> Method:
    """Laplace on ``subset`` with ``structure``: marglik scalar prior, GLM probit."""

    def fit(context: Context) -> Fitted:
        la = Laplace(
            context.model,
            "classification",
            subset_of_weights=subset,
            hessian_structure=structure,
        )
        la.fit(context.loaders.train)
        la.optimize_prior_precision(method="marglik", prior_structure="scalar")
        predict = functools.partial(la, pred_type="glm", link_approx="probit")
        return Fitted(predict, _describe(la))

    return fit


METHODS: dict[str, tuple[str, Method]] = {
    "temperature": ("MAP + temperature", temperature_scaled),
    "ensemble": (f"deep ensemble ({ENSEMBLE_SIZE})", deep_ensemble),
    "defaults": ("LA defaults", library_defaults),
    "recipe": ("recipe", calibrated_recipe),
    "all-kron": ("LA all kron", recipe("all", "kron")),
    "all-diag": ("LA all diag", recipe("all", "diag")),
}
"""The rows after MAP, by their ``--methods`` key: ``(row label, fit)``."""
DEFAULT_METHODS = ("temperature", "ensemble", "defaults", "recipe")
"""The rows of ``python experiments/demo.py`` without ``--methods``."""


def comparison_table(results: dict[str, tuple[str, dict[str, float]]]) -> str:
    """A row per method: its posterior, then the :data:`COLUMNS`."""
    rows = [
        [name, posterior, *(f"{result[key]:.3f}" for key in COLUMNS.values())]
        for name, (posterior, result) in results.items()
    ]
    return report.markdown_table(["method", "posterior", *COLUMNS], rows)


def write_plots(
    results: dict[str, tuple[str, dict[str, float]]],
    panels: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]],
    out: Path,
) -> list[Path]:
    """Rotation curves and reliability diagrams as PNGs in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rotation = out / "rotation.png"
    curves = {
        metric: {
            name: [(result[f"rot/{a}/{metric}"], 0.0) for a in data.ROTATION_ANGLES]
            for name, (_, result) in results.items()
        }
        # accuracy first: its legend fits in the empty upper right of that panel
        for metric in ("accuracy", "NLL", "ECE")
    }
    report.plot_curves(curves, data.ROTATION_ANGLES, "rotation (degrees)", rotation)
    paths = [rotation]
    for tag, panel in panels.items():
        path = out / f"reliability_{tag}.png"
        report.plot_reliability(panel, path)
        paths.append(path)
    return paths


def evaluate(
    predict: Predict, sets: EvaluationSets, name: str, panels: dict
) -> dict[str, float]:
    """All metrics of ``predict``; its reliability panels are added to ``panels``."""
    x, y = sets.test
    panels["test"][name] = (predict(x), y)
    panels[f"rot{SHIFT_ANGLE}"][name] = (predict(sets.rotated[SHIFT_ANGLE]), y)
    return evaluate_classifier(predict, sets)


class DemoResult(NamedTuple):
    """What :func:`main` printed: the table and the plot paths."""

    table: str
    plots: list[Path]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--epochs", type=int, default=100, help="training epochs (default 100)"
    )
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), default=list(DEFAULT_METHODS),
        help=f"rows after MAP (always run); default: {' '.join(DEFAULT_METHODS)}",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=ROOT / "docs" / "results" / "demo",
        help="directory of the PNG plots (default docs/results/demo/)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="initialization, batches")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (1: fastest for this small model on a shared CPU)",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> DemoResult:
    """Train, fit the Laplace rows, print the table, plot paths and wall time."""
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # the train loader's shuffling in fit()
    loaders = data.digits_loaders(seed=0, val_fraction=VAL_FRACTION)
    sets = evaluation_sets(loaders, seed=0)
    model = _train(args.seed, loaders, args.epochs)
    context = Context(model, loaders, args.epochs, args.seed)
    trained = time.perf_counter()
    panels: dict[str, dict] = {"test": {}, f"rot{SHIFT_ANGLE}": {}}
    predict_map = functools.partial(models.predict_probs, model)
    results = {"MAP": ("point estimate", evaluate(predict_map, sets, "MAP", panels))}
    for key in args.methods:
        name, fit = METHODS[key]
        fitted = fit(context)
        results[name] = (fitted.posterior, evaluate(fitted.predict, sets, name, panels))
    table = comparison_table(results)
    plots = write_plots(results, panels, args.out)
    print(
        f"MLP 64-100-10 on digits, MAP: Adam, {args.epochs} epochs, seed {args.seed}. "
        f"Validation: {len(loaders.val.dataset)} digits; test: {len(sets.test[1])} "
        f"digits; {SHIFT_ANGLE}°: the same digits rotated; "
        f"OOD: {len(sets.ood[POOLED])} noise + inverted digits, max-probability "
        "score.\n"
    )
    print(table)
    print("\nplots:")
    for path in plots:
        relative = os.path.relpath(path)
        print(f"  {path if relative.startswith('..') else relative}")
    wall = time.perf_counter() - start
    print(f"\nwall time: {wall:.1f} s (MAP training {trained - start:.1f} s)")
    return DemoResult(table, plots)


if __name__ == "__main__":
    main()
