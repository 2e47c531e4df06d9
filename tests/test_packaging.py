"""What an installed bayescurv promises: light import, type information, license."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_loads_no_optional_heavy_module() -> None:
    """Neither scipy (only ``to_scipy`` needs it) nor plotting loads on import."""
    code = (
        "import sys, bayescurv, bayescurv.laplace, bayescurv.cockpit, bayescurv.vivit\n"
        "print(sorted({m.split('.')[0] for m in sys.modules}"
        " & {'scipy', 'matplotlib', 'sklearn'}))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
        check=True,
    ).stdout.strip()  # fmt: skip
    assert loaded == "[]", f"import bayescurv loads {loaded}"


def test_type_information_and_license_are_packaged() -> None:
    """py.typed and LICENSE are in the wheel (``.ci/check_wheel`` installs it)."""
    config = (ROOT / "pyproject.toml").read_text()  # tomllib needs Python 3.11
    assert (ROOT / "bayescurv" / "py.typed").is_file()
    assert 'bayescurv = ["py.typed"]' in config
    assert 'license = "MIT"' in config
    assert 'license-files = ["LICENSE"]' in config
    assert "MIT License" in (ROOT / "LICENSE").read_text()
