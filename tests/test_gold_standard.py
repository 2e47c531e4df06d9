"""The gold-standard study (``experiments/gold_standard.py``): scores and a tiny run."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from experiments import gold_report, gold_standard
from experiments.gold_methods import DEFAULT, Prediction, laplace_variants
from experiments.gold_problems import PROBLEMS, NutsSettings
from tests.conftest import assert_close

TINY_NUTS = NutsSettings(chains=2, warmup=4, samples=4, max_tree_depth=3)


def test_kl_and_w2_closed_forms() -> None:
    probs = torch.tensor([[0.5, 0.5], [0.9, 0.1]], dtype=torch.float64)
    other = torch.tensor([[0.25, 0.75], [0.9, 0.1]], dtype=torch.float64)
    kl = gold_report.distance(Prediction(probs=other), Prediction(probs=probs))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert_close(kl, torch.tensor([expected, 0.0], dtype=torch.float64), "KL")
    one = Prediction(
        f_mean=torch.tensor([0.0]).double(), f_var=torch.tensor([4.0]).double()
    )
    two = Prediction(
        f_mean=torch.tensor([3.0]).double(), f_var=torch.tensor([1.0]).double()
    )
    w2 = gold_report.distance(one, two)
    assert_close(w2, torch.tensor([math.sqrt(9 + 1)], dtype=torch.float64), "W2")


def test_nll_of_a_mixture_of_equal_draws_is_gaussian() -> None:
    f = torch.tensor([0.3, -1.0], dtype=torch.float64)
    y = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    mixture = Prediction.from_outputs(f.expand(5, 2)[..., None], "regression")
    gaussian = Prediction(f_mean=f, f_var=torch.zeros(2, dtype=torch.float64))
    expected = -torch.distributions.Normal(f, 0.5).log_prob(y[:, 0])
    assert_close(gold_report.nll(mixture, y, 0.5), expected, "mixture")
    assert_close(gold_report.nll(gaussian, y, 0.5), expected, "gaussian")
    probs = torch.tensor([[0.2, 0.8]], dtype=torch.float64)
    nll = gold_report.nll(Prediction(probs=probs), torch.tensor([1]), 1.0)
    assert_close(nll, torch.tensor([-math.log(0.8)], dtype=torch.float64), "NLL")


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_every_variant_is_in_the_table(likelihood: str) -> None:
    names = {v.name for v in laplace_variants(likelihood)}
    assert DEFAULT[likelihood].name in names
    for subset in ("all", "last_layer"):
        for structure in ("full", "kron", "diag", "lowrank"):
            for prior in ("fixed", "evidence"):
                assert any(
                    n.startswith(f"LA {subset} {structure}, {prior}, glm")
                    for n in names
                )
    assert any(", nn" in n for n in names)
    assert not any(n.startswith("LA last_layer") and ", nn" in n for n in names)


def test_tiny_run_writes_the_page(tmp_path: Path) -> None:
    """Both likelihoods end to end on tiny networks and a tiny NUTS budget."""
    problems = [
        replace(PROBLEMS["regression"], widths=(1, 3, 1), nuts=TINY_NUTS),
        replace(PROBLEMS["moons"], widths=(2, 3, 2), nuts=TINY_NUTS),
    ]
    results = [
        gold_standard.run_problem(p, seed=0, map_steps=20, n_samples=20)
        for p in problems
    ]
    for result in results:
        assert result.nuts.weights.shape == (2, 4, result.problem.num_weights)
        assert gold_standard.REFERENCE in result.scores
        assert all(math.isfinite(v["dist/all"]) for v in result.scores.values())
    cost = {"wall": 1.0, "cpu": 1.0, "load": 0.0}
    page = gold_standard.write_page(results, tmp_path, "test", cost).read_text()
    for heading in ("## NUTS convergence", "## regression", "## moons", "## Where"):
        assert heading in page
    assert (tmp_path / "gold_standard_moons.png").exists()
    assert (tmp_path / "gold_standard_regression.png").exists()
    # --render writes the same page from saved results
    saved = tmp_path / "study.pt"
    torch.save({"results": results, "cost": cost, "command": "test"}, saved)
    gold_standard.main(["--render", str(saved), "--out", str(tmp_path / "again")])
    assert (tmp_path / "again" / "gold_standard.md").read_text() == page
