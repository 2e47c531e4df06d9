"""The README demo: a short Laplace study on scikit-learn's digits.

Trains the MLP ``models.mlp(64, 100, 10)`` to the MAP on the digits split of
``experiments.data`` (1,401 train / 270 test 8x8 images, shipped with
scikit-learn, nothing downloaded), then puts post-hoc Laplace approximations on it
with the public API only (``from bayescurv import Laplace``) and compares them
with MAP:

* **Laplace defaults**, exactly as a user writes them, with no other arguments::

      la = Laplace(model, "classification")
      la.fit(train_loader)
      la.optimize_prior_precision()
      probs = la(x)

  so this row follows the library's defaults whatever they are at run time (its
  ``posterior`` column names the weight subset and structure they resolved to);
* **LA recommended**, the recipe the study recommends (``docs/laplace.md``,
  "Recommended recipe"): all-weights KFAC with ``temperature=0.2``, the default
  evidence tuning and ``la(x, link_approx="bridge_norm")``;
* named recipes with every option spelled out: all-weights KFAC and all-weights
  diagonal, each fit on the training set, with a scalar prior precision tuned by
  the marginal likelihood (``method="marglik"``) and the GLM predictive with the
  probit link.

Metrics (``bayescurv.metrics`` through ``experiments.evaluation``): accuracy, NLL,
ECE (15 bins) and Brier score on the test digits; NLL and ECE on the test digits
rotated by 60 degrees; AUROC of the max-probability score for test digits against
uniform noise and inverted digits pooled (540 inputs).

Prints one markdown table (a row per method), writes PNG plots (NLL, ECE and
accuracy against rotation 0-180 degrees; reliability diagrams on the test digits
and on the digits rotated 60 degrees) to ``--out`` and prints their paths, then
the wall time. Seeded and deterministic (single-threaded by default); about 10 s
on one core, including the MAP training.

Run from the repository root: ``python experiments/demo.py`` (or
``python -m experiments.demo``). Flags: ``--epochs`` (MAP training, default 100),
``--methods`` (a subset of the Laplace rows), ``--out`` (default
``docs/results/demo/``), ``--seed``, ``--threads``. The engine-cost demo is
``python experiments/demo_engine.py``.
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
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parent.parent
if __package__ in {None, ""}:
    # NOTE [run as a script]: `python experiments/demo.py` puts experiments/ on
    # sys.path, not the repository root, and the experiment helpers import each
    # other as `experiments.*` (the package is not installed, only bayescurv is).
    # The root goes first, so bayescurv is imported from this checkout too.
    sys.path.insert(0, str(ROOT))

from bayescurv import Laplace  # noqa: E402
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


Method = Callable[[nn.Module, DataLoader], Fitted]
"""Fits a method to a trained model on the training loader."""


def _describe(la: Any) -> str:
    """``"last_layer kron, P=1,010"`` for a fitted ``Laplace(...)`` object."""
    return f"{la.subset.value} {la.hessian_structure.value}, P={la.num_params:,}"


def library_defaults(model: nn.Module, train_loader: DataLoader) -> Fitted:
    """The three lines of a user who takes every default of the library."""
    la = Laplace(model, "classification")
    la.fit(train_loader)
    la.optimize_prior_precision()
    return Fitted(la, _describe(la))


def recipe(subset: str, structure: str) -> Method:
    """Laplace on ``subset`` with ``structure``: marglik scalar prior, GLM probit."""

    def fit(model: nn.Module, train_loader: DataLoader) -> Fitted:
        la = Laplace(
            model,
            "classification",
            subset_of_weights=subset,
            hessian_structure=structure,
        )
        la.fit(train_loader)
        la.optimize_prior_precision(method="marglik", prior_structure="scalar")
        predict = functools.partial(la, pred_type="glm", link_approx="probit")
        return Fitted(predict, _describe(la))

    return fit


def recommended(model: nn.Module, train_loader: DataLoader) -> Fitted:
    """The recipe recommended by the study (``docs/laplace.md``).

    All-weights KFAC, a cold posterior (``temperature=0.2``), the library's
    evidence tuning and the normalized Laplace bridge.
    """
    la = Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure="kron",
        temperature=0.2,
    )
    la.fit(train_loader)
    la.optimize_prior_precision()
    predict = functools.partial(la, link_approx="bridge_norm")
    return Fitted(predict, _describe(la) + ", T=0.2, bridge_norm")


METHODS: dict[str, tuple[str, Method]] = {
    "defaults": ("LA defaults", library_defaults),
    "recommended": ("LA recommended", recommended),
    "all-kron": ("LA all kron", recipe("all", "kron")),
    "all-diag": ("LA all diag", recipe("all", "diag")),
}
"""The Laplace rows, by their ``--methods`` key: ``(row label, fit)``."""


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
        "--epochs", type=int, default=100, help="MAP training epochs (default 100)"
    )
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
        help="Laplace rows to run (MAP always runs); default: all",
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
    loaders = data.digits_loaders(seed=0)
    sets = evaluation_sets(loaders, seed=0)
    model = models.train_map(
        models.mlp(64, 100, 10, seed=args.seed), loaders.train, epochs=args.epochs,
        seed=args.seed,
    )  # fmt: skip
    trained = time.perf_counter()
    panels: dict[str, dict] = {"test": {}, f"rot{SHIFT_ANGLE}": {}}
    predict_map = functools.partial(models.predict_probs, model)
    results = {"MAP": ("point estimate", evaluate(predict_map, sets, "MAP", panels))}
    for key in args.methods:
        name, fit = METHODS[key]
        fitted = fit(model, loaders.train)
        results[name] = (fitted.posterior, evaluate(fitted.predict, sets, name, panels))
    table = comparison_table(results)
    plots = write_plots(results, panels, args.out)
    print(
        f"MLP 64-100-10 on digits, MAP: Adam, {args.epochs} epochs, seed {args.seed}. "
        f"Test: {len(sets.test[1])} digits; {SHIFT_ANGLE}°: the same digits rotated; "
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
