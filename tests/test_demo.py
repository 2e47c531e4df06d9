"""The README demo (``experiments/demo.py``) on a tiny configuration."""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import pytest
import torch

from experiments import demo

TINY_METHODS = ["temperature", "ensemble", "defaults", "recipe", "all-diag"]
"""Rows of the tiny run: the baselines, the defaults, the recipe, a named recipe."""


def _cells(line: str) -> list[str]:
    """The cells of one markdown table line."""
    return [cell.strip() for cell in line.strip("|").split("|")]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[demo.DemoResult, str, Path]:
    out = tmp_path_factory.mktemp("demo")
    argv = ["--epochs", "1", "--methods", *TINY_METHODS, "--out", str(out)]
    printed, threads = io.StringIO(), torch.get_num_threads()
    # main() sets torch's thread count and seed, as a script does: restore both
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(printed):
        result = demo.main(argv)
    torch.set_num_threads(threads)
    return result, printed.getvalue(), out


def test_table_has_a_row_per_method_with_metrics_in_range(tiny_run):
    result, _, _ = tiny_run
    header, _, *rows = map(_cells, result.table.splitlines())
    assert header == ["method", "posterior", *demo.COLUMNS]
    names = [demo.METHODS[key][0] for key in TINY_METHODS]
    assert [row[0] for row in rows] == ["MAP", *names]
    for row in rows:
        values = [float(cell) for cell in row[2:]]
        assert len(values) == len(demo.COLUMNS)
        assert all(math.isfinite(v) and v >= 0 for v in values)
        accuracy, auroc = values[0], values[-1]
        assert accuracy <= 1
        assert auroc <= 1


def test_writes_nonempty_pngs(tiny_run):
    result, _, out = tiny_run
    assert [p.name for p in result.plots] == [
        "rotation.png",
        "reliability_test.png",
        "reliability_rot60.png",
    ]
    for path in result.plots:
        assert path.parent == out
        assert path.read_bytes().startswith(b"\x89PNG")
        assert path.stat().st_size > 1000


def test_prints_table_plot_paths_and_wall_time(tiny_run):
    result, printed, _ = tiny_run
    assert result.table in printed
    after = printed.split("\nplots:\n", 1)[1].splitlines()
    listed = [Path(line.strip()).resolve() for line in after[: len(result.plots)]]
    assert listed == [path.resolve() for path in result.plots]
    assert "wall time:" in printed.splitlines()[-1]


def test_rejects_an_unknown_method(tmp_path, capsys):
    with pytest.raises(SystemExit, match="2"):
        demo.main(["--methods", "nope", "--out", str(tmp_path)])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
