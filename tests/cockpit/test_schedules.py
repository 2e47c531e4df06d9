"""Schedules: which steps they select, and their errors."""

from __future__ import annotations

import pytest

from bayescurv.cockpit import schedules


def _selected(schedule, stop: int = 30) -> list[int]:
    return [s for s in range(stop) if schedule(s)]


def test_every():
    assert _selected(schedules.every(1), 4) == [0, 1, 2, 3]
    assert _selected(schedules.every(10, offset=3)) == [3, 13, 23]


def test_at():
    assert _selected(schedules.at([5, 0, 5, 17])) == [0, 5, 17]


def test_logarithmic():
    steps = _selected(schedules.logarithmic(1000, num=7), 1001)
    assert steps == [0, 1, 3, 10, 32, 100, 316, 1000]
    assert _selected(schedules.logarithmic(3, num=10), 10) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: schedules.every(0), "interval must be an integer >= 1"),
        (lambda: schedules.every(2, offset=-1), "offset must be an integer >= 0"),
        (lambda: schedules.every(1.5), "interval must be an integer >= 1"),
        (lambda: schedules.at([1, -2]), "steps must be an integer >= 0"),
        (lambda: schedules.logarithmic(0), "stop must be an integer >= 1"),
        (lambda: schedules.logarithmic(10, num=1), "num must be an integer >= 2"),
    ],
)
def test_invalid_schedules(make, match):
    with pytest.raises(ValueError, match=match):
        make()
