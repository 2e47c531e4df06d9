"""The dashboard renders every instrument to a PNG; a clear error without matplotlib."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from bayescurv import cockpit as ck
from bayescurv.cockpit.instrument import Track
from tests.cockpit.conftest import make_tiny, run_steps

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

pytest.importorskip("matplotlib")


def test_full_dashboard_writes_a_png(tmp_path):
    p = make_tiny("ce", "mean")
    instruments = ck.preset_instruments("full", ck.schedules.every(1))
    cockpit = run_steps(p, instruments, steps=4, generator=torch.Generator())
    path = cockpit.plot(tmp_path / "sub" / "dash.png", title="tiny")
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000


def test_dashboard_of_unusual_values_and_custom_instruments(tmp_path):
    history = {
        "norm_test": Track(
            "Norm test", "value", {0: 0.5, 1: math.inf, 2: math.nan}, 1.0
        ),
        "alpha": Track("alpha", "alpha", {0: 7.0, 1: -3.0, 2: math.nan}),
        "my_metric": Track("Mine", "unit", {0: -1.0, 1: 0.0}),
        "loss": Track("Loss", "loss", {}),
    }
    path = ck.dashboard(history, tmp_path / "odd.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_empty_history_raises(tmp_path):
    with pytest.raises(ValueError, match="Nothing to plot"):
        ck.dashboard({"loss": Track("Loss", "loss")}, tmp_path / "x.png")


def test_missing_matplotlib_raises_a_clear_import_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    history = {"loss": Track("Loss", "loss", {0: 1.0})}
    with pytest.raises(ImportError, match=r"pip install 'bayescurv\[plot\]'"):
        ck.dashboard(history, tmp_path / "x.png")
