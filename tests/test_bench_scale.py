"""The scale benchmark's bookkeeping: medians of repeated runs, merged pages."""

from __future__ import annotations

import json

from experiments import bench_scale


def _run(cpu: list[float]) -> dict:
    return {"times": [2 * c for c in cpu], "cpu": cpu}


def test_repeated_runs_give_each_steps_median_and_every_total():
    runs = [_run([1.0, 0.1, 0.5]), _run([3.0, 0.2, 0.4]), _run([2.0, 0.9, 0.6])]
    out = bench_scale._median_steps(runs)
    assert out["cpu"] == [2.0, 0.2, 0.5]
    assert out["times"] == [4.0, 0.4, 1.0]
    assert out["run_cpu"] == [1.6, 3.6, 3.5]
    assert bench_scale._median_steps(runs[:1]) is runs[0]  # one run as it is


def _row(structure: str, ours: float, theirs: dict | None) -> dict:
    grad = {"times": [1.0, 0.0, 0.1], "cpu": [1.0, 0.0, 0.1]}
    result = {"times": [ours, 0.0, 0.0], "cpu": [ours, 0.0, 0.0], "mem": 1.0}
    return {
        "model": "resnet18",
        "n_train": 8,
        "n_test": 4,
        "subset": "all",
        "structure": structure,
        "gradient": grad,
        "bayescurv": {**result, "n_classes": 10},
        "laplace_torch": theirs,
    }


def _page(tmp_path, name: str, rows: list[dict]) -> str:
    header = {
        "command": name,
        "torch": "x",
        "threads": 1,
        "load_before": "0",
        "load_after": "0",
        "sizes": "",
        "gradient": {},
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"header": header, "rows": rows}))
    return str(path)


def test_a_merged_row_keeps_what_the_later_run_did_not_run(tmp_path):
    """A later row replaces an earlier one, but not a library it did not run."""
    killed = {"error": "killed: RSS above 7000 MB", "seconds": 9.0}
    first = _page(tmp_path, "a", [_row("diag", 5.0, killed), _row("kron", 6.0, None)])
    second = _page(tmp_path, "b", [_row("diag", 3.0, None), _row("kron", 4.0, None)])
    out = tmp_path / "page.json"
    bench_scale.merge([first, second], out, tmp_path / "page.md")
    rows = {r["structure"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["diag"]["bayescurv"]["cpu"][0] == 3.0
    assert rows["diag"]["laplace_torch"] == killed
    assert rows["kron"]["laplace_torch"] is None
    page = (tmp_path / "page.md").read_text()
    assert "not run" in page
    assert "killed: RSS above 7000 MB" in page


def test_both_imports_load_every_installed_library(monkeypatch):
    """``--imports both``: the installed libraries in a fixed order, missing skipped."""
    loaded = []

    def fake_import(name):
        if name == "laplace":
            raise ImportError(name)
        loaded.append(name)

    monkeypatch.setattr(bench_scale.importlib, "import_module", fake_import)
    assert bench_scale.import_libraries() == ["bayescurv"]
    assert loaded == ["bayescurv"]
