"""The gallery's scripts run as written.

Slow, so behind a marker (``pytest -m examples``); the site build runs them too and
fails on any error.
"""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))

# Optional packages an example needs beyond the [examples] extra.
NEEDS = {"10_huggingface_lora.py": ("transformers", "peft")}

# transformers' own deprecations of its internals (peft calls them), as for torch
THIRD_PARTY = pytest.mark.filterwarnings(
    "ignore::FutureWarning:transformers\\.",
    "ignore::DeprecationWarning:transformers\\.",
)


@pytest.mark.examples
@pytest.mark.parametrize(
    "script",
    [pytest.param(path, id=path.stem, marks=THIRD_PARTY) for path in EXAMPLES],
)
def test_example_runs(
    script: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The script runs top to bottom and draws what it shows (files to a tmp dir)."""
    for module in ("matplotlib", "sklearn", *NEEDS.get(script.name, ())):
        pytest.importorskip(module)
    import matplotlib  # noqa: PLC0415 (optional)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    shown = []
    monkeypatch.setattr(plt, "show", lambda: shown.append(plt.get_fignums()))
    monkeypatch.chdir(tmp_path)
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        plt.close("all")
    if "plt.show()" in script.read_text():
        assert shown, f"{script.name} shows no figure"
        assert all(shown), f"{script.name} calls plt.show() without a figure"


def test_every_example_has_a_title_and_story() -> None:
    """Each script starts with a Markdown title and a paragraph (the gallery page)."""
    for script in EXAMPLES:
        doc = script.read_text().split('"""')[1].strip()
        title, _, story = doc.partition("\n\n")
        assert title.startswith("# "), f"{script.name}: no '# Title' first"
        assert len(story) > 100, f"{script.name}: tell the reader what it shows"
