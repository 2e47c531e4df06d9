"""The documentation runs: code blocks of the pages, the API index, the pdoc build."""

from __future__ import annotations

import importlib.util
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from bayescurv import metrics
from bayescurv.laplace import BaseLaplace, Laplace

ROOT = Path(__file__).resolve().parents[1]

# The page whose ```python blocks run top to bottom in one fresh namespace.
GETTING_STARTED = "docs/getting_started.md"

# Links into docs/results/ point at files the experiments write; they are not checked.
GENERATED_DIRS = ("results/",)

# The page's claims: accuracy kept within half a point; the regression's true noise.
ACCURACY_KEPT = 0.005
TRUE_NOISE = 0.1
NOISE_TOL = 0.03

PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """The ```python blocks of a markdown text with the line their code starts on."""
    return [
        (text.count("\n", 0, match.start(1)) + 1, match.group(1))
        for match in PYTHON_BLOCK.finditer(text)
    ]


def load_build() -> ModuleType:
    """``docs/build.py`` as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("docs_build", ROOT / "docs/build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_python_blocks_are_found() -> None:
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = x\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (9, "y = x\n")]


def run_page(page: str, namespace: dict[str, object]) -> dict[str, object]:
    """Run the page's python blocks in order in ``namespace`` and return it."""
    path = ROOT / page
    blocks = python_blocks(path.read_text())
    assert blocks, f"{page} has no python blocks"
    for line, code in blocks:
        # padded so that a traceback shows the line number in the page
        exec(compile("\n" * (line - 1) + code, str(path), "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def getting_started() -> dict[str, object]:
    """The namespace of docs/getting_started.md after all its code ran."""
    return run_page(GETTING_STARTED, {"__name__": "__docs__"})


def test_getting_started_runs(getting_started: dict[str, object]) -> None:
    assert {"la", "cal", "reg", "sub", "res"} <= set(getting_started)


def test_readme_code_runs(getting_started: dict[str, object]) -> None:
    """README snippets may use the getting-started context.

    The README shows short snippets such as ``la = Laplace(model, "classification")``
    that assume a trained ``model``, its ``train_loader`` and inputs ``x``; they run
    in (a copy of) the getting-started namespace, which defines them.
    """
    run_page("README.md", dict(getting_started))


def test_getting_started_claims(getting_started: dict[str, object]) -> None:
    """What the page's prose says about its printed numbers holds."""
    ns = getting_started
    y, scores = ns["y_test"], metrics.max_probability
    map_probs, la_probs = ns["map_probs"], ns["probs"]
    assert (
        abs(metrics.accuracy(la_probs, y) - metrics.accuracy(map_probs, y))
        <= ACCURACY_KEPT
    ), "the Laplace predictive keeps the MAP's accuracy"
    auroc_map = metrics.auroc(scores(map_probs), scores(ns["map_ood"]))
    auroc_la = metrics.auroc(scores(la_probs), scores(ns["laplace_ood"]))
    assert auroc_la > auroc_map, "Laplace separates inverted digits better"
    assert metrics.nll(la_probs, y) > metrics.nll(map_probs, y), "less confident"
    ece_la = metrics.expected_calibration_error(la_probs, y)
    assert ece_la > metrics.expected_calibration_error(map_probs, y)
    recipe_probs, recipe_ood = ns["cal"](ns["x_test"]), ns["cal"](ns["x_ood"])
    assert (
        abs(metrics.accuracy(recipe_probs, y) - metrics.accuracy(map_probs, y))
        <= ACCURACY_KEPT
    ), "the recipe keeps the MAP's accuracy"
    assert metrics.nll(recipe_probs, y) <= 1.1 * metrics.nll(map_probs, y)
    auroc_recipe = metrics.auroc(scores(recipe_probs), scores(recipe_ood))
    assert auroc_recipe > max(auroc_map, auroc_la), "the recipe detects OOD best"
    sigma = ns["reg"].sigma_noise.item()
    assert abs(sigma - TRUE_NOISE) < NOISE_TOL, "sigma_noise near the true noise"


@pytest.mark.parametrize(
    ("function", "argument", "documented"),
    [
        (Laplace, "subset_of_weights", "last_layer"),
        (Laplace, "hessian_structure", "kron"),
        (Laplace, "sigma_noise", 1.0),
        (Laplace, "prior_precision", 1.0),
        (Laplace, "prior_mean", 0.0),
        (Laplace, "temperature", 1.0),
        (BaseLaplace.optimize_prior_precision, "method", "marglik"),
        (BaseLaplace.optimize_prior_precision, "n_steps", 100),
        (BaseLaplace.optimize_prior_precision, "prior_structure", "scalar"),
        (BaseLaplace.__call__, "pred_type", "glm"),
        (BaseLaplace.__call__, "link_approx", "probit"),
    ],
)
def test_getting_started_defaults(
    function: Callable, argument: str, documented: object
) -> None:
    """The defaults docs/getting_started.md describes are the signatures' defaults."""
    default = inspect.signature(function).parameters[argument].default
    default = getattr(default, "value", default)  # str enums by their value
    assert default == documented, (
        f"{function.__qualname__}({argument}=...) now defaults to {default!r}: "
        "update docs/getting_started.md"
    )


def test_doc_links_resolve() -> None:
    broken = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        for target in MARKDOWN_LINK.findall(page.read_text()):
            if "://" in target or target.startswith(("#", *GENERATED_DIRS)):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.name} -> {target}")
    assert not broken, f"broken links: {broken}"


def test_api_index_is_current() -> None:
    build = load_build()
    expected = build.api_index()
    assert build.API_INDEX.read_text() == expected, (
        "docs/api.md is out of date: run `python docs/build.py --index-only`"
    )


def test_api_index_lists_every_public_name() -> None:
    build = load_build()
    text = build.api_index()
    for name in build.MODULES:
        module = importlib.import_module(name)
        assert f"## `{name}`" in text
        for public in build.public_names(module):
            assert f"| `{public}` |" in text, f"{name}.{public} missing from api.md"


def test_html_build_runs(tmp_path: Path) -> None:
    pytest.importorskip("pdoc")
    build = load_build()
    modules = ("bayescurv.metrics", "bayescurv.vivit")  # a fast subset
    problems = build.build_html(tmp_path, modules)
    assert problems == []
    page = (tmp_path / "bayescurv" / "metrics.html").read_text()
    assert "expected_calibration_error" in page
    assert "mathjax" in page.lower()
