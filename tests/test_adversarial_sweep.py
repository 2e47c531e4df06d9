"""The adversarial sweep of the Laplace API (experiments/adversarial_sweep.py).

Every case must be ok or a clear error: a crash or a silent wrong answer fails here,
so a change that breaks a refusal (e.g. a loader's ``None`` batch skipped instead of
named) is caught by the default suite, not only when the page is regenerated.
"""

from __future__ import annotations

import pytest

from experiments import adversarial_sweep
from experiments.sweep_cases import FAMILIES


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_case_is_ok_or_a_clear_error(family):
    results = adversarial_sweep.run({family: FAMILIES[family]})
    assert results
    findings = [
        f"{r.case.name}: {r.outcome}: {r.detail}"
        for r in results
        if r.outcome not in ("ok", "clear error")
    ]
    assert not findings, "\n".join(findings)
