"""Shared test problems and named tolerances for the metrics tests."""

from __future__ import annotations

import torch
from hypothesis import settings

# Named tolerances: float64 sums over a few hundred samples vs. scikit-learn (numpy).
SKLEARN_TOL = 1e-10
# A perfectly calibrated sample of N_CALIBRATED points has ECE ~ sqrt(1 / N_bin).
N_CALIBRATED = 20_000
CALIBRATED_ECE_TOL = 0.02

HYPOTHESIS = settings(max_examples=40, deadline=None, database=None)

# (n, n_classes, seed): random softmax probabilities and targets
CLASSIFICATION_CASES = [(1, 2, 0), (7, 2, 1), (200, 3, 2), (300, 10, 3)]
CLASSIFICATION_IDS = [f"N{n}-C{c}-seed{s}" for n, c, s in CLASSIFICATION_CASES]


def random_problem(n: int, n_classes: int, seed: int) -> tuple[torch.Tensor, ...]:
    """``[N, C]`` float64 softmax probabilities (some confident) and targets."""
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, n_classes, generator=gen, dtype=torch.float64)
    targets = torch.randint(n_classes, (n,), generator=gen)
    return logits.softmax(dim=1), targets


def calibrated_problem(n: int, n_classes: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Targets drawn from the probabilities themselves: calibrated by construction."""
    gen = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(n, n_classes, generator=gen, dtype=torch.float64)
    probs = logits.softmax(dim=1)
    return probs, torch.multinomial(probs, 1, generator=gen).squeeze(1)


def tied_scores(n: int, seed: int, shift: float) -> torch.Tensor:
    """Scores rounded to one decimal, so that ties within and across sets occur."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=gen, dtype=torch.float64) + shift).round(
        decimals=1
    )


# Small valid inputs for error-path tests.
PROBS = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
TARGETS = torch.tensor([0, 1])
