"""Build the documentation site and the markdown index ``docs/api.md``.

Usage (from the repository root)::

    pip install -e ".[docs]"
    python docs/build.py                # docs/api.md, then the site into site/
    python docs/build.py --index-only   # only docs/api.md (no site tools needed)
    python docs/build.py --check        # fail if docs/api.md is out of date

The site is MkDocs Material (``mkdocs.yml``): the narrative pages of ``docs/``, the
API reference rendered by mkdocstrings from the docstrings of every module in
:data:`MODULES`, and the example gallery, which runs every script of ``examples/``.
It is built with ``mkdocs build --strict``: a broken link, a missing page or a
cross-reference that resolves to nothing fails the build. Open ``site/index.html``,
or ``mkdocs serve`` for a live preview.

``docs/api.md`` lists each module with its one-line summary and its public names
(its ``__all__``), each linked to its reference entry (so the strict build also
fails when a public name is not rendered). It is committed and regenerated whenever a
public name or its summary changes (``tests/test_docs.py`` checks it is current).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API_INDEX = DOCS / "api.md"
SITE_DIR = ROOT / "site"

MODULES = (
    "bayescurv",
    "bayescurv.engine",
    "bayescurv.engine.reference",
    "bayescurv.curvature",
    "bayescurv.laplace",
    "bayescurv.laplace.pyro",
    "bayescurv.recipes",
    "bayescurv.metrics",
    "bayescurv.cockpit",
    "bayescurv.cockpit.schedules",
    "bayescurv.vivit",
    "bayescurv.compat.backpack",
    "bayescurv.compat.backpack.extensions",
)
"""The public modules, in the order of the index; each but the root has a page
``docs/reference/<name>.md`` (the root's names are rendered on their own modules'
pages)."""

TOPIC_PAGES = {
    "bayescurv.engine": "engine.md",
    "bayescurv.laplace": "laplace.md",
    "bayescurv.laplace.pyro": "laplace.md",
    "bayescurv.recipes": "laplace.md",
    "bayescurv.metrics": "metrics.md",
    "bayescurv.cockpit": "cockpit.md",
    "bayescurv.vivit": "vivit.md",
    "bayescurv.compat.backpack": "migrating_backpack.md",
    "bayescurv.compat.backpack.extensions": "migrating_backpack.md",
}
"""The narrative page of a module, linked from the index."""

RST_ROLE = re.compile(r":([a-z]+):`~?([^`]+)`")
"""A reStructuredText role such as :class:`~a.B` or :math:`x`."""


def _markdown_role(match: re.Match) -> str:
    """Math as ``$x$`` (GitHub renders it), other roles as code ``B``."""
    role, text = match[1], match[2]
    return f"${text}$" if role == "math" else f"`{text.split('.')[-1]}`"


def _summary(obj: object) -> str:
    """The first paragraph of ``obj``'s own docstring on one line ('' if none)."""
    doc = obj.__doc__
    if not doc:
        return ""
    first = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
    first = RST_ROLE.sub(_markdown_role, first)
    return first.replace("|", "\\|")


def public_names(module: ModuleType) -> list[str]:
    """The module's ``__all__``, else the public names it defines itself."""
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    return [
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and getattr(obj, "__module__", None) == module.__name__
    ]


def _kind(obj: object) -> str:
    if isinstance(obj, ModuleType):
        return "module"
    if inspect.isclass(obj):
        return "class"
    if callable(obj):
        return "function"
    return f"constant ({type(obj).__name__})"


def _link(module: str, public: str, obj: object) -> str:
    """A cross-reference to the name's reference entry (checked by the strict build).

    The root package's names are rendered on the pages of the modules they come
    from: a module links to its page, anything else to its entry there.
    """
    if isinstance(obj, ModuleType):
        return f"[`{public}`][{obj.__name__}]"
    if module == MODULES[0]:
        module = next(
            name
            for name in MODULES[1:]
            if getattr(importlib.import_module(name), public, None) is obj
        )
    return f"[`{public}`][{module}.{public}]"


def _module_section(name: str) -> list[str]:
    module = importlib.import_module(name)
    lines = [f"## `{name}`", "", _summary(module), ""]
    if name in TOPIC_PAGES:
        lines += [f"Guide: [{TOPIC_PAGES[name]}]({TOPIC_PAGES[name]}).", ""]
    lines += ["| name | kind | summary |", "| --- | --- | --- |"]
    for public in public_names(module):
        obj = getattr(module, public)
        kind = _kind(obj)
        summary = "" if kind.startswith("constant") else _summary(obj)
        lines.append(f"| {_link(name, public, obj)} | {kind} | {summary} |")
    return [*lines, ""]


def api_index() -> str:
    """The text of ``docs/api.md``, generated from the modules' ``__all__``."""
    lines = [
        "# API reference",
        "",
        "<!-- Generated by `python docs/build.py`; do not edit by hand. -->",
        "",
        "Every public module with its public names (its `__all__`), each linked to",
        "its entry in the reference rendered from the docstrings (built with",
        '`pip install -e ".[docs]" && python docs/build.py`).',
        "",
    ]
    for name in MODULES:
        lines += _module_section(name)
    return "\n".join(lines).rstrip("\n") + "\n"


def build_site(site_dir: Path = SITE_DIR) -> int:
    """Build the site with ``mkdocs build --strict`` into ``site_dir``.

    Returns:
        The exit status of mkdocs (0 when the build is clean).
    """
    # NOTE [One thread for the gallery]: the gallery trains small networks; on a
    # shared machine several BLAS threads per process mostly wait for each other.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), env.get("PYTHONPATH")])
    )
    env.setdefault("NO_MKDOCS_2_WARNING", "1")  # the theme's end-of-life banner
    shutil.rmtree(DOCS / "gallery", ignore_errors=True)  # run every example afresh
    command = [sys.executable, "-m", "mkdocs", "build", "--strict"]
    return subprocess.run(
        [*command, "--site-dir", str(site_dir)], cwd=ROOT, env=env, check=False
    ).returncode


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index-only", action="store_true", help="only docs/api.md")
    parser.add_argument(
        "--check", action="store_true", help="fail if docs/api.md is out of date"
    )
    parser.add_argument("--out", type=Path, default=SITE_DIR, help="site directory")
    args = parser.parse_args(argv)
    text = api_index()
    if args.check:
        if API_INDEX.read_text() != text:
            print(f"{API_INDEX} is out of date: run python docs/build.py --index-only")
            return 1
        print(f"{API_INDEX} is up to date")
        return 0
    API_INDEX.write_text(text)
    print(f"wrote {API_INDEX}")
    if args.index_only:
        return 0
    return build_site(args.out)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # this checkout's bayescurv, not an installed one
    sys.exit(main())
