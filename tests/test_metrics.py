"""bayescurv.metrics: scikit-learn cross-checks, hand-computed values, properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from bayescurv import metrics

# Named tolerances: float64 sums over a few hundred samples vs. scikit-learn (numpy).
SKLEARN_TOL = 1e-10
# A perfectly calibrated sample of N_CALIBRATED points has ECE ~ sqrt(1 / N_bin).
N_CALIBRATED = 20_000
CALIBRATED_ECE_TOL = 0.02

HYPOTHESIS = settings(max_examples=40, deadline=None, database=None)

# (n, n_classes, seed): random softmax probabilities and targets
CLASSIFICATION_CASES = [(1, 2, 0), (7, 2, 1), (200, 3, 2), (300, 10, 3)]
CLASSIFICATION_IDS = [f"N{n}-C{c}-seed{s}" for n, c, s in CLASSIFICATION_CASES]


def random_problem(n: int, n_classes: int, seed: int) -> tuple[torch.Tensor, ...]:
    """``[N, C]`` float64 softmax probabilities (some confident) and targets."""
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, n_classes, generator=gen, dtype=torch.float64)
    targets = torch.randint(n_classes, (n,), generator=gen)
    return logits.softmax(dim=1), targets


def calibrated_problem(n: int, n_classes: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Targets drawn from the probabilities themselves: calibrated by construction."""
    gen = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(n, n_classes, generator=gen, dtype=torch.float64)
    probs = logits.softmax(dim=1)
    return probs, torch.multinomial(probs, 1, generator=gen).squeeze(1)


def tied_scores(n: int, seed: int, shift: float) -> torch.Tensor:
    """Scores rounded to one decimal, so that ties within and across sets occur."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=gen, dtype=torch.float64) + shift).round(
        decimals=1
    )


# ---------------------------------------------------------------- scikit-learn


@pytest.mark.parametrize(
    ("n", "n_classes", "seed"), CLASSIFICATION_CASES, ids=CLASSIFICATION_IDS
)
def test_multiclass_against_sklearn(n, n_classes, seed):
    probs, targets = random_problem(n, n_classes, seed)
    p, y, labels = probs.numpy(), targets.numpy(), list(range(n_classes))
    expected = {
        "accuracy": skm.accuracy_score(y, p.argmax(1)),
        "nll": skm.log_loss(y, p, labels=labels),
        "brier": skm.brier_score_loss(y, p, labels=labels, scale_by_half=False),
    }
    actual = {
        "accuracy": metrics.accuracy(probs, targets),
        "nll": metrics.nll(probs, targets),
        "brier": metrics.brier_score(probs, targets),
    }
    for name, value in expected.items():
        assert actual[name] == pytest.approx(value, abs=SKLEARN_TOL), name


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_against_sklearn(seed):
    probs, targets = random_problem(150, 2, seed)
    p1, y = probs[:, 1], targets
    assert metrics.accuracy(p1, y) == skm.accuracy_score(y, p1 > 0.5)
    assert metrics.nll(p1, y) == pytest.approx(
        skm.log_loss(y, p1.numpy(), labels=[0, 1]), abs=SKLEARN_TOL
    )
    assert metrics.brier_score(p1, y) == pytest.approx(
        skm.brier_score_loss(y, p1.numpy()), abs=SKLEARN_TOL
    )
    # The two-column form of the same predictions: same accuracy/NLL/ECE, 2x Brier.
    assert metrics.accuracy(probs, y) == metrics.accuracy(p1, y)
    assert metrics.nll(probs, y) == pytest.approx(metrics.nll(p1, y))
    assert metrics.brier_score(probs, y) == pytest.approx(
        2 * metrics.brier_score(p1, y)
    )
    assert metrics.expected_calibration_error(probs, y) == pytest.approx(
        metrics.expected_calibration_error(p1, y)
    )


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


# ---------------------------------------------------------------- by hand


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


def test_nll_clamps_zero_probabilities():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    targets = torch.tensor([1, 0])
    eps64 = torch.finfo(torch.float64).eps
    assert metrics.nll(probs, targets) == pytest.approx(
        (-math.log(eps64) + math.log(2)) / 2
    )
    assert metrics.nll(probs.float(), targets) == pytest.approx(
        (-math.log(torch.finfo(torch.float32).eps) + math.log(2)) / 2
    )
    assert metrics.nll(probs, targets, eps=1e-3) == pytest.approx(
        (-math.log(1e-3) + math.log(2)) / 2
    )


def test_ece_and_mce_by_hand_with_empty_bins():
    # 5 bins of width 0.2; confidences 0.3 (bin 1), 0.5, 0.55 (bin 2), 0.95 (bin 4);
    # bins 0 and 3 are empty.
    probs = torch.tensor(
        [
            [0.3, 0.3, 0.3, 0.1],
            [0.5, 0.2, 0.2, 0.1],
            [0.1, 0.55, 0.25, 0.1],
            [0.95, 0.05, 0.0, 0.0],
        ],
        dtype=torch.float64,
    )
    targets = torch.tensor([0, 0, 2, 0])  # correct: yes (tie -> 0), yes, no, yes
    bins = metrics.calibration_bins(probs, targets, n_bins=5)
    assert bins.counts.tolist() == [0, 1, 2, 0, 1]
    torch.testing.assert_close(
        bins.accuracy[[1, 2, 4]], torch.tensor([1.0, 0.5, 1.0], dtype=torch.float64)
    )
    assert bins.accuracy[[0, 3]].isnan().all()
    gaps = [abs(1 - 0.3), abs(0.5 - 0.525), abs(1 - 0.95)]
    expected_ece = (gaps[0] + 2 * gaps[1] + gaps[2]) / 4
    assert metrics.expected_calibration_error(
        probs, targets, n_bins=5
    ) == pytest.approx(expected_ece)
    assert metrics.maximum_calibration_error(probs, targets, 5) == pytest.approx(0.7)


def test_confidence_on_a_bin_edge_joins_the_lower_bin():
    probs = torch.tensor([[0.6, 0.4], [0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    bins = metrics.calibration_bins(probs, torch.tensor([0, 0, 0]), n_bins=5)
    # (0.4, 0.6] holds 0.5 and 0.6; (0.8, 1.0] holds 1.0
    assert bins.counts.tolist() == [0, 0, 2, 0, 1]


def test_ece_binary_is_top_label():
    p1 = torch.tensor([0.1, 0.8, 0.5], dtype=torch.float64)  # conf 0.9, 0.8, 0.5
    targets = torch.tensor([0, 0, 0])  # predictions 0, 1, 0 -> correct, wrong, correct
    ece = metrics.expected_calibration_error(p1, targets, n_bins=2)
    # bin (0, 0.5]: {0.5, correct}; bin (0.5, 1]: {0.9 correct, 0.8 wrong}
    assert ece == pytest.approx((abs(1 - 0.5) + 2 * abs(0.5 - 0.85)) / 3)


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


# ---------------------------------------------------------------- properties


@HYPOTHESIS
@given(
    n=st.integers(1, 60),
    n_classes=st.integers(2, 6),
    n_bins=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
def test_calibration_error_properties(n, n_classes, n_bins, seed):
    probs, targets = random_problem(n, n_classes, seed)
    ece = metrics.expected_calibration_error(probs, targets, n_bins)
    mce = metrics.maximum_calibration_error(probs, targets, n_bins)
    assert 0 <= ece <= mce <= 1
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    permuted = metrics.expected_calibration_error(
        probs[permutation], targets[permutation], n_bins
    )
    assert permuted == pytest.approx(ece)
    if n_bins == 1:  # one bin: |accuracy - mean confidence|
        mean_confidence = probs.max(dim=1).values.mean().item()
        assert ece == pytest.approx(
            abs(metrics.accuracy(probs, targets) - mean_confidence)
        )


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


@pytest.mark.parametrize("n_classes", [2, 10])
def test_calibrated_data_has_small_ece(n_classes):
    probs, targets = calibrated_problem(N_CALIBRATED, n_classes, seed=n_classes)
    assert metrics.expected_calibration_error(probs, targets) < CALIBRATED_ECE_TOL
    # the same probabilities, made over-confident, are detected
    sharp = (3 * probs.log()).softmax(dim=1)
    assert metrics.expected_calibration_error(sharp, targets) > 5 * CALIBRATED_ECE_TOL


# ---------------------------------------------------------------- errors

PROBS = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
TARGETS = torch.tensor([0, 1])

CLASSIFICATION_ERRORS = [
    ("not-a-tensor", PROBS.numpy(), TARGETS, TypeError, "probs must be a torch.Tensor"),
    ("empty", torch.empty(0, 3), TARGETS, ValueError, "probs is empty"),
    ("integer-probs", PROBS.long(), TARGETS, TypeError, "floating-point"),
    ("3d-probs", PROBS[None], TARGETS, ValueError, r"shape \[N, C\]"),
    ("one-column", PROBS[:, :1], TARGETS, ValueError, "single class column"),
    (
        "nan",
        torch.tensor([[0.5, float("nan")], [0.4, 0.6]]),
        TARGETS,
        ValueError,
        "probs contains NaN",
    ),
    ("inf", torch.tensor([0.5, float("inf")]), TARGETS, ValueError, "infinite"),
    (
        "logits",
        torch.tensor([[2.0, -1.0], [0.4, 0.6]]),
        TARGETS,
        ValueError,
        r"outside \[0, 1\]",
    ),
    (
        "binary-above-1",
        torch.tensor([0.5, 1.5]),
        TARGETS,
        ValueError,
        r"outside \[0, 1\]",
    ),
    (
        "not-normalized",
        torch.tensor([[0.5, 0.4], [0.4, 0.6]]),
        TARGETS,
        ValueError,
        r"row 0 sums to 0\.9",
    ),
    ("targets-not-tensor", PROBS, [0, 1], TypeError, "targets must be a torch.Tensor"),
    (
        "shape-mismatch",
        PROBS,
        torch.tensor([0, 1, 1]),
        ValueError,
        r"shape \[N\] = \[2\]",
    ),
    ("one-hot", PROBS, torch.eye(2), ValueError, "one-hot"),
    (
        "fractional-targets",
        PROBS,
        torch.tensor([0.0, 0.5]),
        ValueError,
        "integer class indices",
    ),
    (
        "out-of-range",
        PROBS,
        torch.tensor([0, 2]),
        ValueError,
        r"targets out of range: found class index 2, expected indices in \[0, 1\]",
    ),
    (
        "negative-target",
        PROBS,
        torch.tensor([-1, 0]),
        ValueError,
        "targets out of range: found class index -1",
    ),
    (
        "nan-targets",
        PROBS,
        torch.tensor([0.0, float("nan")]),
        ValueError,
        "targets contains NaN",
    ),
]
CLASSIFICATION_METRICS = [
    metrics.accuracy,
    metrics.nll,
    metrics.brier_score,
    metrics.expected_calibration_error,
    metrics.maximum_calibration_error,
]


@pytest.mark.parametrize("metric", CLASSIFICATION_METRICS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    ("probs", "targets", "error", "match"),
    [case[1:] for case in CLASSIFICATION_ERRORS],
    ids=[case[0] for case in CLASSIFICATION_ERRORS],
)
def test_classification_errors(metric, probs, targets, error, match):
    with pytest.raises(error, match=match):
        metric(probs, targets)


@pytest.mark.parametrize(
    "score",
    [metrics.max_probability, metrics.predictive_entropy, metrics.negative_entropy],
    ids=lambda f: f.__name__,
)
def test_ood_score_errors(score):
    with pytest.raises(ValueError, match=r"row 1 sums to 1\.1"):
        score(torch.tensor([[0.5, 0.5], [0.6, 0.5]]))
    with pytest.raises(ValueError, match="probs is empty"):
        score(torch.empty(0))


SCORE_ERRORS = [
    (
        "not-a-tensor",
        [1.0, 2.0],
        torch.ones(3),
        TypeError,
        "scores_in must be a torch.Tensor",
    ),
    ("empty", torch.ones(3), torch.empty(0), ValueError, "scores_out is empty"),
    ("2d", torch.ones(3, 1), torch.ones(3), ValueError, r"scores_in must be a 1-d"),
    (
        "nan",
        torch.ones(3),
        torch.tensor([0.0, float("nan")]),
        ValueError,
        "scores_out contains NaN",
    ),
    (
        "complex",
        torch.ones(3, dtype=torch.complex64),
        torch.ones(3),
        TypeError,
        "real-valued",
    ),
]


@pytest.mark.parametrize(
    "metric", [metrics.auroc, metrics.fpr_at_95_tpr], ids=lambda f: f.__name__
)
@pytest.mark.parametrize(
    ("scores_in", "scores_out", "error", "match"),
    [case[1:] for case in SCORE_ERRORS],
    ids=[case[0] for case in SCORE_ERRORS],
)
def test_detection_errors(metric, scores_in, scores_out, error, match):
    with pytest.raises(error, match=match):
        metric(scores_in, scores_out)


@pytest.mark.parametrize("n_bins", [0, -3, 2.5, True])
def test_n_bins_must_be_a_positive_integer(n_bins):
    with pytest.raises(ValueError, match="n_bins must be a positive integer"):
        metrics.expected_calibration_error(PROBS, TARGETS, n_bins=n_bins)


@pytest.mark.parametrize("eps", [0.0, 1.0, -1e-3])
def test_nll_eps_must_be_a_probability(eps):
    with pytest.raises(ValueError, match=r"eps must be in \(0, 1\)"):
        metrics.nll(PROBS, TARGETS, eps=eps)


def test_float_targets_holding_whole_numbers_are_accepted():
    assert metrics.accuracy(PROBS, TARGETS.double()) == metrics.accuracy(PROBS, TARGETS)
    assert metrics.accuracy(PROBS[:, 1], TARGETS.bool()) == 1.0


# ---------------------------------------------------------------- plot


def test_reliability_diagram_saves_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    probs, targets = calibrated_problem(500, 10, seed=0)
    figure = metrics.reliability_diagram(probs, targets, title="calibrated")
    assert figure.axes[0].get_title() == "calibrated"
    path = tmp_path / "reliability.png"
    figure.savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 1000


def test_reliability_diagram_draws_into_given_axes():
    figure_module = pytest.importorskip("matplotlib.figure")
    figure = figure_module.Figure()
    left, right = figure.subplots(1, 2)
    returned = metrics.reliability_diagram(PROBS, TARGETS, n_bins=4, ax=right)
    assert returned is figure
    assert len(right.patches) > 0
    assert len(left.patches) == 0


def test_reliability_diagram_without_matplotlib(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'bayescurv\[plot\]'"):
        metrics.reliability_diagram(PROBS, TARGETS)
