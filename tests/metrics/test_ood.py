"""OOD scores, AUROC and FPR@95: scikit-learn, hand-computed values, properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from sklearn import metrics as skm

from bayescurv import metrics
from tests.metrics.problems import HYPOTHESIS, SKLEARN_TOL, random_problem, tied_scores


@pytest.mark.parametrize(
    ("n_in", "n_out", "seed"), [(1, 1, 0), (20, 33, 1), (500, 400, 2)]
)
def test_ood_metrics_against_sklearn(n_in, n_out, seed):
    s_in, s_out = tied_scores(n_in, seed, shift=1.0), tied_scores(n_out, seed + 9, 0.0)
    labels = np.r_[np.ones(n_in), np.zeros(n_out)]
    scores = torch.cat([s_in, s_out]).numpy()
    if n_in > 1:  # roc_auc_score needs both classes; (1, 1) is checked by hand below
        assert metrics.auroc(s_in, s_out) == pytest.approx(
            skm.roc_auc_score(labels, scores), abs=SKLEARN_TOL
        )
    fpr, tpr, _ = skm.roc_curve(labels, scores, drop_intermediate=False)
    expected_fpr = fpr[np.searchsorted(tpr, 0.95, side="left")]
    assert metrics.fpr_at_95_tpr(s_in, s_out) == pytest.approx(expected_fpr)


def test_ood_metrics_by_hand():
    s_in = torch.tensor([3.0, 2.0, 2.0, 1.0])
    s_out = torch.tensor([2.0, 0.0])
    # pairs won: 3>2, 3>0, 2=2 (x2: 1/2 each), 2>0 (x2), 1<2, 1>0 -> 6 / 8
    assert metrics.auroc(s_in, s_out) == 0.75
    assert metrics.auroc(s_out, s_in) == 0.25
    # k = ceil(0.95 * 4) = 4 -> threshold 1.0; out-scores >= 1: {2.0}
    assert metrics.fpr_at_95_tpr(s_in, s_out) == 0.5
    # 20 in-samples: k = 19, threshold = 2nd smallest in-score (exact 95%)
    s_in = torch.arange(20.0)
    assert metrics.fpr_at_95_tpr(s_in, torch.tensor([0.5, 1.0, 1.5])) == pytest.approx(
        2 / 3
    )
    assert metrics.auroc(torch.tensor([5.0]), torch.tensor([5.0])) == 0.5


def test_ood_scores_by_hand():
    probs = torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    torch.testing.assert_close(
        metrics.max_probability(probs), torch.tensor([1.0, 1 / 3], dtype=torch.float64)
    )
    entropy = torch.tensor([0.0, math.log(3)], dtype=torch.float64)
    torch.testing.assert_close(metrics.predictive_entropy(probs), entropy)
    torch.testing.assert_close(metrics.negative_entropy(probs), -entropy)
    binary = metrics.predictive_entropy(torch.tensor([0.5], dtype=torch.float64))
    torch.testing.assert_close(binary, torch.tensor([math.log(2)], dtype=torch.float64))


@HYPOTHESIS
@given(n_in=st.integers(1, 50), n_out=st.integers(1, 50), seed=st.integers(0, 2**16))
def test_ood_metric_properties(n_in, n_out, seed):
    s_in, s_out = tied_scores(n_in, seed, 0.5), tied_scores(n_out, seed + 1, 0.0)
    area = metrics.auroc(s_in, s_out)
    assert 0 <= area <= 1
    assert metrics.auroc(s_out, s_in) == pytest.approx(1 - area)
    # invariant under strictly increasing maps of the scores
    assert metrics.auroc(s_in.exp(), s_out.exp()) == pytest.approx(area)
    fpr = metrics.fpr_at_95_tpr(s_in, s_out)
    assert 0 <= fpr <= 1
    assert metrics.fpr_at_95_tpr(s_in + 100, s_out) == 0  # separated: no false positive


@HYPOTHESIS
@given(n=st.integers(1, 40), n_classes=st.integers(2, 8), seed=st.integers(0, 2**16))
def test_score_and_scoring_rule_ranges(n, n_classes, seed):
    probs, targets = random_problem(n, n_classes, seed)
    entropy = metrics.predictive_entropy(probs)
    assert (entropy >= 0).all()
    assert (entropy <= math.log(n_classes) + 1e-12).all()
    assert (metrics.max_probability(probs) >= 1 / n_classes - 1e-12).all()
    assert 0 <= metrics.brier_score(probs, targets) <= 2
    assert metrics.nll(probs, targets) >= 0
