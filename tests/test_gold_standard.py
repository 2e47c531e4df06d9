"""The gold-standard study (``experiments/gold_standard.py``): scores and a tiny run."""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from experiments import gold_report, gold_standard
from experiments.gold_methods import (
    DEFAULT,
    Prediction,
    laplace_variants,
    pairwise_probit,
)
from experiments.gold_page import Run
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


def test_ties_share_a_rank() -> None:
    scores = {"a": {"d": 0.5}, "b": {"d": 0.5 * (1 + 1e-12)}, "c": {"d": 0.1}}
    assert [gold_report.rank_of(scores, "d", n) for n in "abc"] == [2, 2, 1]
    scores["b"]["d"] = 0.6
    assert [gold_report.rank_of(scores, "d", n) for n in "abc"] == [2, 3, 1]


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_every_variant_is_in_the_table(likelihood: str) -> None:
    names = {v.name for v in laplace_variants(likelihood)}
    assert DEFAULT[likelihood].name in names
    for subset in ("all", "last_layer"):
        for structure in ("full", "kron", "diag", "lowrank", "gp", "gp 50 points"):
            for prior in ("fixed", "evidence"):
                assert any(
                    n.startswith(f"LA {subset} {structure}, {prior}, glm")
                    for n in names
                )
    assert any(", nn" in n for n in names)
    assert not any(n.startswith("LA last_layer") and ", nn" in n for n in names)
    assert not any(" gp" in n and ", nn" in n for n in names)


def test_gp_rows_follow_the_kernel_size() -> None:
    """All data where N C rows fit, subsets smaller than the data only."""

    def gp_kinds(n_train: int, n_outputs: int) -> set[str]:
        variants = laplace_variants("classification", n_train, n_outputs)
        return {v.kind for v in variants if v.structure == "gp"}

    assert gp_kinds(150, 2) == {"gp", "gp 50 points"}  # moons
    assert gp_kinds(1401, 10) == {"gp 50 points", "gp 300 points"}  # digits
    assert gp_kinds(40, 2) == {"gp"}
    every = laplace_variants("classification")
    assert {v.kind for v in every if v.structure != "gp"} == {
        "full",
        "kron",
        "diag",
        "lowrank",
    }


TINY = [
    replace(PROBLEMS["regression"], widths=(1, 3, 1), nuts=TINY_NUTS),
    replace(PROBLEMS["moons"], widths=(2, 3, 2), nuts=TINY_NUTS),
]


@pytest.fixture(scope="module")
def tiny_results() -> list[gold_standard.ProblemResult]:
    """Both likelihoods end to end on tiny networks and a tiny NUTS budget."""
    return [
        gold_standard.run_problem(p, seed=0, map_steps=20, n_samples=20) for p in TINY
    ]


def tiny_run(problems: tuple[str, ...], commit: str = "abc1234") -> Run:
    return Run(problems, "test", commit, {"wall": 60.0, "cpu": 60.0, "load": 0.0})


def test_all_data_gp_repeats_the_full_rows(tiny_results) -> None:
    """The GP on all data is the weight-space GGN Laplace: the same scores."""
    for result in tiny_results:
        gp_rows = [n for n in result.scores if " gp, " in n]
        assert gp_rows
        assert any(" gp 50 points, " in n for n in result.scores)
        for name in gp_rows:
            full = result.scores[name.replace(" gp, ", " full, ")]
            for key, value in result.scores[name].items():
                if key != "seconds":
                    assert math.isclose(value, full[key], rel_tol=1e-6), (name, key)
        tuned = result.tuned_priors
        assert math.isclose(tuned["all", "gp"], tuned["all", "full"], rel_tol=1e-6)


def test_tiny_run_writes_the_page(tiny_results, tmp_path: Path) -> None:
    for result in tiny_results:
        assert result.nuts.weights.shape == (2, 4, result.problem.num_weights)
        assert gold_standard.REFERENCE in result.scores
        assert all(math.isfinite(v["dist/all"]) for v in result.scores.values())
    run = tiny_run(("regression", "moons"))
    page = gold_standard.write_page(tiny_results, tmp_path, [run]).read_text()
    for heading in ("## NUTS convergence", "## regression", "## moons", "## Where"):
        assert heading in page
    assert page.count("rows of the GP on all data repeat their") == 2
    assert "| last_layer gp 50 points |" in page
    assert "The closest function-space (GP) row of each kind" in page
    assert "Generated by `test` at commit `abc1234`" in page
    assert (tmp_path / "gold_standard_moons.png").exists()
    assert (tmp_path / "gold_standard_regression.png").exists()
    # --render writes the same page from saved results
    saved = tmp_path / "study.pt"
    gold_standard.save_study(saved, (tiny_results, [run]))
    gold_standard.main(["--render", str(saved), "--out", str(tmp_path / "again")])
    assert (tmp_path / "again" / "gold_standard.md").read_text() == page


def test_render_merges_runs(tiny_results, tmp_path: Path) -> None:
    """A later file's problem replaces an earlier one's; each run keeps its own."""
    first, second = tmp_path / "first.pt", tmp_path / "second.pt"
    # the first version of the file: one command and cost, no runs
    cost = {"wall": 60.0, "cpu": 60.0, "load": 0.0}
    torch.save({"results": tiny_results, "cost": cost, "command": "old"}, first)
    gold_standard.save_study(second, (tiny_results[:1], [tiny_run(("regression",))]))
    results, runs = gold_standard.merge_studies(
        [gold_standard.load_study(first), gold_standard.load_study(second)]
    )
    assert [r.problem.name for r in results] == ["regression", "moons"]
    assert results[0] is not tiny_results[0]  # the second file's copy
    assert [(r.command, r.commit, r.problems) for r in runs] == [
        ("test", "abc1234", ("regression",)),
        ("old", "unknown", ("moons",)),
    ]
    page = gold_standard.write_page(results, tmp_path, runs).read_text()
    assert "- regression: `test` at commit `abc1234`" in page
    assert "- moons: `old` at commit `unknown`" in page


def test_rescore_reproduces_the_scores(tiny_results, tmp_path: Path) -> None:
    """Same code, same MAPs: every method scores as before against the saved draws."""
    saved = tmp_path / "study.pt"
    gold_standard.save_study(saved, (tiny_results[1:], [tiny_run(("moons",))]))
    out = tmp_path / "rescored"
    (result,) = gold_standard.main(
        ["--rescore", str(saved), "--out", str(out), "--save", str(tmp_path / "r.pt")]
    )
    old = tiny_results[1]
    assert torch.equal(result.nuts.weights, old.nuts.weights)  # the saved draws
    for name, scores in old.scores.items():
        for key, value in scores.items():
            if key != "seconds":
                assert math.isclose(result.scores[name][key], value, rel_tol=1e-9)
    page = (out / "gold_standard.md").read_text()
    assert "reusing the NUTS draws" in page
    assert "`test` at commit `abc1234`" in page
    # a MAP that does not reproduce the saved one refuses the draws
    other = replace(old, scores={**old.scores, "MAP": {"dist/all": 1.0}})
    gold_standard.save_study(saved, ([other], [tiny_run(("moons",))]))
    with pytest.raises(ValueError, match="NUTS draws belong to another MAP"):
        gold_standard.main(["--rescore", str(saved), "--out", str(out)])


def test_studies_saved_under_main_load(
    tiny_results, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A study saved by the script's first version names ``__main__.ProblemResult``."""
    main_module = sys.modules["__main__"]
    cls = gold_standard.ProblemResult
    monkeypatch.setattr(cls, "__module__", "__main__")
    monkeypatch.setattr(main_module, "ProblemResult", cls, raising=False)
    saved = tmp_path / "main.pt"
    cost = {"wall": 60.0, "cpu": 60.0, "load": 0.0}
    torch.save({"results": tiny_results, "cost": cost, "command": "old"}, saved)
    monkeypatch.delattr(main_module, "ProblemResult")
    with pytest.raises(AttributeError, match="ProblemResult"):
        torch.load(saved, weights_only=False)
    results, runs = gold_standard.load_study(saved)
    assert [r.problem.name for r in results] == ["regression", "moons"]
    assert runs[0].command == "old"


def test_pairwise_probit_closed_forms() -> None:
    """Two classes: the binary probit of the difference; a shared shift: no change."""
    gen = torch.Generator().manual_seed(0)
    f_mu = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    root = torch.randn(6, 2, 2, generator=gen, dtype=torch.float64)
    f_var = root @ root.mT
    probs = pairwise_probit(f_mu, f_var)
    gap = f_mu[:, 1] - f_mu[:, 0]
    diff_var = f_var[:, 0, 0] + f_var[:, 1, 1] - 2 * f_var[:, 0, 1]
    expected = torch.sigmoid(gap / torch.sqrt(1 + math.pi / 8 * diff_var))
    assert_close(probs[:, 1], expected, "binary probit")
    mu3 = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    root3 = torch.randn(6, 3, 3, generator=gen, dtype=torch.float64)
    var3 = root3 @ root3.mT
    shifted = var3 + 25.0 * torch.ones(3, 3, dtype=torch.float64)  # a common shift
    assert_close(pairwise_probit(mu3, shifted), pairwise_probit(mu3, var3), "shift")
    certain = pairwise_probit(mu3, torch.zeros_like(var3))
    assert_close(certain, mu3.softmax(-1), "no variance: softmax")
