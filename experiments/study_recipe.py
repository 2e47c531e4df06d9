"""The recipe study (issue 16): a data-chosen Laplace recipe against its baselines.

Compares, on every setup (data set x architecture) and three training seeds:

* **MAP**, **MAP + temperature** (one scalar on the validation NLL), a **deep
  ensemble** of 5 (the MAP and four more seeds), the **LA defaults** (no arguments),
  **LA marglik-trained** (``marglik_training``, Immer et al., 2021) and the
  **recipe** (:func:`bayescurv.recipes.calibrated` with the validation split),
  see :mod:`experiments.baselines`;
* on the data sets of :mod:`experiments.benchmarks` (in-distribution test set, a
  shifted test set, an OOD set), with :mod:`bayescurv.metrics`.

The recipe's design (its selection rule and search space) was frozen on the
**design setups** (digits with the two MLPs, :data:`SETUPS` ``design=True``) before
any other setup was run; the report shows them apart from the **held-out** ones.

Networks: ``mlp-1`` (one hidden layer of 100 ReLU units), ``mlp-2`` (two of 128),
``cnn`` (:func:`experiments.models.small_cnn`) and ``resnet``
(:func:`experiments.models.small_resnet`, BatchNorm, eval mode after training);
Adam, learning rate 1e-3, weight decay 5e-4, batch 64, :data:`EPOCHS` per data set.
Trained weights and per-seed results are cached under the git-ignored
``experiments/results/recipe_study/`` (delete it to start afresh), so an interrupted
run resumes and ``--report-only`` redraws the report without computing.

Writes ``docs/results/recipe_study_<part>.md`` and its PNGs. Run from the repository
root, single-threaded (hours of CPU for everything; the design setups take minutes)::

    OMP_NUM_THREADS=1 nice python -m experiments.study_recipe --part classification
    OMP_NUM_THREADS=1 nice python -m experiments.study_recipe --part regression
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bayescurv import Laplace, metrics, recipes
from bayescurv.curvature import NotPositiveDefiniteError
from bayescurv.laplace import marglik_training
from experiments import baselines, benchmarks, models, recipe_report
from experiments.benchmarks import Benchmark

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "experiments" / "results" / "recipe_study"
ENSEMBLE_SIZE = 5
EPOCHS = {
    "digits": 100,
    "mnist1d": 100,
    "breast_cancer": 300,
    "diabetes": 400,
    "friedman": 200,
    "gap_toy": 1000,
}
"""Training epochs per data set (about 2,000-4,000 Adam steps each)."""
FRONTIER_TEMPERATURES = {
    "classification": tuple(10.0 ** (-k / 2) for k in range(7)),
    "regression": tuple(10.0 ** (-k / 2) for k in range(-6, 7)),
}
"""Temperatures of the frontier curves (seed 0), half decades: 1 to 1e-3 (the
classification recipes chose T <= 1 on the design setups), 1e3 to 1e-3."""

Build = Callable[[Benchmark, int], nn.Module]
ARCHITECTURES: dict[str, Build] = {
    "mlp-1": lambda b, seed: models.mlp(b.n_inputs, 100, b.n_outputs, seed=seed),
    "mlp-2": lambda b, seed: models.mlp(b.n_inputs, 128, 128, b.n_outputs, seed=seed),
    "cnn": lambda b, seed: models.small_cnn(
        b.n_outputs, seed, tuple(b.test[0].shape[1:])
    ),
    "resnet": lambda b, seed: models.small_resnet(
        b.n_outputs, seed, tuple(b.test[0].shape[1:])
    ),
}


@dataclass(frozen=True)
class Setup:
    """A data set, an architecture, and whether the recipe was designed on it."""

    bench: str
    arch: str
    design: bool = False

    @property
    def key(self) -> str:
        """``"<data set>-<architecture>"``."""
        return f"{self.bench}-{self.arch}"


SETUPS = {
    "classification": (
        Setup("digits", "mlp-1", design=True),
        Setup("digits", "mlp-2", design=True),
        Setup("digits", "cnn"),
        Setup("digits", "resnet"),
        Setup("mnist1d", "mlp-1"),
        Setup("mnist1d", "mlp-2"),
        Setup("mnist1d", "cnn"),
        Setup("mnist1d", "resnet"),
        Setup("breast_cancer", "mlp-1"),
        Setup("breast_cancer", "mlp-2"),
    ),
    "regression": tuple(
        Setup(bench, arch)
        for bench in ("diabetes", "friedman", "gap_toy")
        for arch in ("mlp-1", "mlp-2")
    ),
}
"""The setups of each part; the recipe was designed on ``design=True`` only."""


class Trainer:
    """Trains (or loads from :data:`CACHE`) the networks of one setup and seed."""

    def __init__(self, setup: Setup, bench: Benchmark, seed: int) -> None:
        self.setup, self.bench, self.seed = setup, bench, seed
        self.build = ARCHITECTURES[setup.arch]
        self.epochs = EPOCHS[setup.bench]
        self.prefix = CACHE / f"{setup.key}-s{seed}"

    def member(self, j: int) -> tuple[nn.Module, float]:
        """Ensemble member ``j`` (member 0 is the MAP) and its training seconds."""
        init = self.seed + 1000 * j
        model = self.build(self.bench, init)
        path = Path(f"{self.prefix}-m{j}.pt")
        if path.exists():
            saved = torch.load(path)
            model.load_state_dict(saved["state"])
            return model.eval(), saved["seconds"]
        start = time.process_time()
        loss = nn.MSELoss() if self.bench.task == "regression" else None
        models.train_map(
            model, self.bench.train, epochs=self.epochs, seed=init, loss_func=loss
        )
        seconds = time.process_time() - start
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state": model.state_dict(), "seconds": seconds}, path)
        return model.eval(), seconds

    def marglik(self) -> tuple[baselines.Predict | None, float, str | None]:
        """``marglik_training`` from the MAP's initialization: predictive, seconds.

        All-weights KFAC, layer-wise prior (the function's defaults), Adam with
        learning rate 1e-3 for the data set's epochs, an evidence step every
        ``epochs // 20`` epochs. The cache keeps the weights and hyperparameters; a
        cached run refits the Laplace approximation with them. If the training
        fails (a hyperparameter diverges and the posterior precision is no longer
        positive definite), the predictive is ``None`` and the error is returned
        (and cached) instead.
        """
        path = Path(f"{self.prefix}-marglik.pt")
        if not path.exists():
            torch.save(self._marglik_training(), path)
        saved = torch.load(path)
        if "failed" in saved:
            return None, saved["seconds"], saved["failed"]
        model = self.build(self.bench, self.seed)
        model.load_state_dict(saved["state"])
        la = Laplace(
            model.eval(), self.bench.task, subset_of_weights="all",
            hessian_structure="kron", prior_precision=saved["prior_precision"],
            sigma_noise=saved["sigma_noise"],
        )  # fmt: skip
        la.fit(self.bench.train)
        predict = baselines.laplace_predictive(la, self.bench.task)
        return predict, saved["seconds"], None

    def _marglik_training(self) -> dict:
        """Run ``marglik_training``; what :meth:`marglik` caches."""
        model = self.build(self.bench, self.seed)
        start = time.process_time()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)  # the loader's batch order
                la, model, _, _ = marglik_training(
                    model, self.bench.train, self.bench.task, n_epochs=self.epochs,
                    marglik_frequency=max(1, self.epochs // 20),
                )  # fmt: skip
        except NotPositiveDefiniteError as error:
            return {"failed": str(error), "seconds": time.process_time() - start}
        return {
            "state": model.state_dict(),
            "prior_precision": la.prior_precision,
            "sigma_noise": la.sigma_noise,
            "seconds": time.process_time() - start,
        }


def evaluate(predict: baselines.Predict, bench: Benchmark) -> dict[str, float]:
    """The study's metrics of one predictive on the test, shift and OOD inputs.

    Returns:
        ``{metric: value}``: classification ``accuracy``, ``NLL``, ``ECE``,
        ``Brier``, ``shift accuracy``, ``shift NLL``, ``shift ECE``, ``OOD AUROC``
        (max-probability score); regression ``RMSE``, ``NLL``, ``shift RMSE``,
        ``shift NLL``, ``OOD AUROC`` (negative predictive std as the score).
    """
    (x, y), (x_shift, y_shift), x_ood = bench.test, bench.shift, bench.ood
    test = baselines.chunked(predict, x)
    shift = baselines.chunked(predict, x_shift)
    ood = baselines.chunked(predict, x_ood)
    if bench.task == "regression":
        result = _regression_metrics(*test, y)
        shifted = _regression_metrics(*shift, y_shift)
        score_in, score_out = -test[1].sqrt(), -ood[1].sqrt()
    else:
        result = _classification_metrics(test, y)
        shifted = _classification_metrics(shift, y_shift)
        score_in, score_out = (
            metrics.max_probability(test),
            metrics.max_probability(ood),
        )
    result |= {f"shift {k}": v for k, v in shifted.items() if k in SHIFT_KEYS}
    result["OOD AUROC"] = metrics.auroc(score_in.flatten(), score_out.flatten())
    return result


SHIFT_KEYS = ("accuracy", "NLL", "ECE", "RMSE")


def _classification_metrics(probs: torch.Tensor, y: torch.Tensor) -> dict:
    return {
        "accuracy": metrics.accuracy(probs, y),
        "NLL": metrics.nll(probs, y),
        "ECE": metrics.expected_calibration_error(probs, y),
        "Brier": metrics.brier_score(probs, y),
    }


def _regression_metrics(mean: torch.Tensor, var: torch.Tensor, y: torch.Tensor):
    nll = 0.5 * ((y - mean).square() / var + var.log() + math.log(2 * math.pi))
    return {
        "RMSE": (y - mean).square().mean().sqrt().item(),
        "NLL": nll.mean().item(),
    }


def _timed(fit: Callable[[], object]) -> tuple[object, float]:
    """``fit()`` and the CPU seconds it took."""
    start = time.process_time()
    result = fit()
    return result, time.process_time() - start


def _fits(trainer: Trainer) -> tuple[dict[str, tuple], dict[str, object]]:
    """Every method's predictive and CPU seconds; the recipe's choices and TS scale."""
    bench, task = trainer.bench, trainer.bench.task
    members = [trainer.member(j) for j in range(ENSEMBLE_SIZE)]
    model, seconds = members[0]
    nets = [m for m, _ in members]
    regression = task == "regression"
    sigmas = (
        [baselines.residual_std(m, bench.train) for m in nets] if regression else []
    )
    fits = {"MAP": (baselines.map_predictive(model, task, *sigmas[:1]), seconds)}
    (predict, scale), seconds = _timed(
        lambda: baselines.temperature_scaled(model, bench.val, task)
    )
    fits["MAP + temperature"] = (predict, seconds)
    fits["deep ensemble (5)"] = (
        baselines.ensemble(nets, task, sigmas),
        sum(s for _, s in members),
    )
    fits["LA defaults"] = _timed(
        lambda: baselines.library_defaults(model, bench.train, task)
    )
    predict, seconds, failed = trainer.marglik()
    fits["LA marglik-trained"] = (predict, seconds)
    (post, _), seconds = _timed(
        lambda: baselines.recipe(model, bench.train, bench.val, task)
    )
    fits["recipe"] = (post, seconds)
    c = post.choices
    extra = {
        "failed": {"LA marglik-trained": failed} if failed else {},
        "scale": scale,
        "recipe": {
            "structure": c.structure, "temperature": c.temperature, "link": c.link,
            "prior_precision": c.prior_precision, "sigma_noise": c.sigma_noise,
            "val_nll": c.val_nll, "n_val": c.n_val, "repr": repr(post),
        },
    }  # fmt: skip
    return fits, extra


def run_seed(setup: Setup, seed: int) -> dict:
    """Every method on one setup and seed (cached as JSON under :data:`CACHE`)."""
    path = CACHE / f"{setup.key}-s{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    bench = benchmarks.BENCHMARKS[setup.bench](seed)
    fits, extra = _fits(Trainer(setup, bench, seed))
    results = {
        name: None if predict is None else evaluate(predict, bench)
        for name, (predict, _) in fits.items()
    }
    for name, (_, seconds) in fits.items():  # NaN: a method that gave no predictive
        results[name] = results[name] or dict.fromkeys(results["MAP"], math.nan)
        results[name]["seconds"] = seconds
    run = {"methods": results, **extra, "commit": code_commit()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run, indent=1))
    return run


@functools.cache
def code_commit() -> str:
    """The commit of the code that computes a run (``+changes`` if it differs).

    Recorded in every cached run, so a report that mixes runs of different code
    (see :func:`experiments.recipe_report.provenance`) says so. Cached: :func:`main`
    asks first, so a commit made while a long run goes on does not relabel it.
    """

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        )
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--", "bayescurv", "experiments")
    return commit + ("+changes" if changed else "")


def frontier(setup: Setup, structure: str, links: list) -> list[dict]:
    """The recipe's family along :data:`FRONTIER_TEMPERATURES` (seed 0, cached).

    All weights, ``structure``, the prior precision (and noise) by the evidence at
    each temperature, each link: what the validation search chooses from, evaluated
    on the test, shift and OOD sets.
    """
    path = CACHE / f"{setup.key}-frontier.json"
    if path.exists():
        return json.loads(path.read_text())
    bench = benchmarks.BENCHMARKS[setup.bench](0)
    model, _ = Trainer(setup, bench, 0).member(0)
    task = bench.task
    rows = []
    for temperature in FRONTIER_TEMPERATURES[task]:
        la = Laplace(
            model, task, subset_of_weights="all", hessian_structure=structure,
            temperature=temperature,
        )  # fmt: skip
        la.fit(bench.train)
        la.optimize_prior_precision(
            method="marglik", tune_sigma_noise=task == "regression"
        )
        for link in links:
            if link is None:
                predict = baselines.laplace_predictive(la, task)
            else:
                predict = functools.partial(la, link_approx=link)
            row = {"temperature": temperature, "link": link}
            rows.append(row | evaluate(predict, bench))
    path.write_text(json.dumps(rows, indent=1))
    return rows


def setup_info(setup: Setup) -> dict:
    """Split sizes (seed 0), parameter count, shift and OOD of a setup."""
    bench = benchmarks.BENCHMARKS[setup.bench](0)
    model = ARCHITECTURES[setup.arch](bench, 0)
    return {
        "n_train": len(bench.train.dataset),
        "n_val": len(bench.val.dataset),
        "n_test": len(bench.test[1]),
        "params": sum(p.numel() for p in model.parameters()),
        "classes": bench.n_outputs,
        "shift": bench.shift_name,
        "ood": bench.ood_name,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=(*SETUPS, "all"), default="all")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds")
    parser.add_argument(
        "--setups", nargs="*", default=None,
        help="only these setup keys, e.g. digits-mlp-1 (default: all of the part)",
    )  # fmt: skip
    parser.add_argument(
        "--report-only", action="store_true",
        help="draw the report from the cached results of the finished setups",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    return parser.parse_args(argv)


def run_part(part: str, args: argparse.Namespace) -> dict:
    """Results ``{setup key: {"runs": [...], "frontier": [...]}}`` of one part."""
    done = {}
    for setup in SETUPS[part]:
        if args.setups is not None and setup.key not in args.setups:
            continue
        paths = [CACHE / f"{setup.key}-s{s}.json" for s in range(args.seeds)]
        if args.report_only and not all(p.exists() for p in paths):
            continue
        start = time.perf_counter()
        runs = [run_seed(setup, seed) for seed in range(args.seeds)]
        recipe = runs[0]["recipe"]
        links = [None] if part == "regression" else list(recipes.LINKS)
        rows = frontier(setup, recipe["structure"], links)
        done[setup.key] = {
            "setup": setup, "runs": runs, "frontier": rows, "info": setup_info(setup),
        }  # fmt: skip
        print(f"{setup.key}: {time.perf_counter() - start:.0f} s", flush=True)
    return done


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    code_commit()  # the code this process imported (see its doc)
    torch.set_num_threads(args.threads)
    parts = tuple(SETUPS) if args.part == "all" else (args.part,)
    for part in parts:
        done = run_part(part, args)
        if not done:
            print(f"{part}: nothing finished yet")
            continue
        paths = recipe_report.write(part, done, args.seeds, args.out)
        print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
