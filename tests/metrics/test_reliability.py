"""The reliability diagram renders, saves a PNG and explains a missing matplotlib."""

from __future__ import annotations

import sys

import pytest

from bayescurv import metrics
from tests.metrics.problems import PROBS, TARGETS, calibrated_problem


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
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'bayescurv\[plot\]'"):
        metrics.reliability_diagram(PROBS, TARGETS)
