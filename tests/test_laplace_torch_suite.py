"""experiments/laplace_torch_suite.py: the import swap and the report."""

from __future__ import annotations

from pathlib import Path

from experiments.laplace_torch_suite import report, swap_imports


def test_imports_are_swapped(tmp_path: Path) -> None:
    source = tmp_path / "test_x.py"
    source.write_text(
        "from laplace import Laplace\n"
        "from laplace.utils import FeatureExtractor\n"
        "    import laplace\n"
        "from laplacian import other\n"
    )
    swap_imports(tmp_path)
    assert source.read_text() == (
        "from bayescurv import Laplace\n"
        "from bayescurv.compat.laplace.utils import FeatureExtractor\n"
        "    import bayescurv.compat.laplace\n"
        "from laplacian import other\n"
    )


def test_report_counts_and_groups_failures() -> None:
    output = (
        "FAILED tests/test_a.py::test_one[x-1] - ValueError: bad | thing\n"
        "FAILED tests/test_a.py::test_one[x-2] - ValueError: bad\n"
        "ERROR tests/test_b.py - ImportError: nope\n"
        "3 passed, 2 failed, 1 error, 4 skipped in 1.0s\n"
    )
    page = report(output, ["test_a.py", "test_b.py"])
    assert "**3 passed, 2 failed, 1 errors, 4 skipped (50.0% of the tests" in page
    assert "| `tests/test_a.py::test_one` | 2 | ValueError: bad \\| thing |" in page
    assert "| `tests/test_b.py` | 1 | ImportError: nope |" in page
