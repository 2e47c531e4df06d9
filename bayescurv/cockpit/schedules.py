"""Schedules: at which training steps an instrument runs.

A schedule is any callable ``step -> bool`` (steps count from 0); the helpers below
build the common ones as small, printable objects.

Example:
    >>> from bayescurv.cockpit import schedules
    >>> [s for s in range(12) if schedules.every(5, offset=1)(s)]
    [1, 6, 11]
    >>> [s for s in range(1001) if schedules.logarithmic(1000, num=4)(s)]
    [0, 1, 10, 100, 1000]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

Schedule = Callable[[int], bool]
"""A function of the step (0, 1, 2, ...) that says whether to run."""


@dataclass(frozen=True)
class every:  # lower case: reads as a function, ``every(10)``
    """Linearly spaced steps ``offset, offset + interval, offset + 2 interval, ...``.

    Args:
        interval: Positive step distance.
        offset: First step (non-negative).
    """

    interval: int = 1
    offset: int = 0

    def __post_init__(self) -> None:
        _check_int("every", "interval", self.interval, minimum=1)
        _check_int("every", "offset", self.offset, minimum=0)

    def __call__(self, step: int) -> bool:
        """Whether to run at ``step``."""
        return step >= self.offset and (step - self.offset) % self.interval == 0


@dataclass(frozen=True)
class at:
    """An explicit set of steps.

    Args:
        steps: Non-negative step numbers.
    """

    steps: frozenset[int]

    def __init__(self, steps: Iterable[int]) -> None:
        steps = frozenset(steps)
        for step in steps:
            _check_int("at", "steps", step, minimum=0)
        object.__setattr__(self, "steps", steps)

    def __call__(self, step: int) -> bool:
        """Whether to run at ``step``."""
        return step in self.steps


def logarithmic(stop: int, num: int = 50) -> at:
    """Step 0 and ``num`` logarithmically spaced steps from 1 to ``stop`` (rounded).

    Dense early in training, when quantities change fastest, sparse later. Rounding
    merges coincident small steps, so fewer than ``num + 1`` steps may result.

    Args:
        stop: Last step (at least 1).
        num: Number of log-spaced points (at least 2).

    Returns:
        An :class:`at` schedule.
    """
    _check_int("logarithmic", "stop", stop, minimum=1)
    _check_int("logarithmic", "num", num, minimum=2)
    top = math.log10(stop)
    steps = {round(10 ** (top * i / (num - 1))) for i in range(num)}
    return at(steps | {0})


def _check_int(owner: str, name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(
            f"{owner}: {name} must be an integer >= {minimum}, got {value!r}."
        )
