"""A sampler over a random subset of a data set (laplace-torch's ``SoDSampler``).

For curvature or evidence on a subset of the training data: a ``DataLoader`` with
``sampler=SoDSampler(N, M)`` yields ``M`` of the ``N`` points, the same ones on every
pass.

Example:
    >>> sampler = SoDSampler(N=10, M=4, seed=0)
    >>> len(sampler), len(set(sampler)), all(0 <= i < 10 for i in sampler)
    (4, 4, True)
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["SoDSampler"]


class SoDSampler(Sampler[int]):
    """``M`` distinct indices out of ``N``, drawn once from ``seed``.

    The draw uses torch's generator (laplace-torch uses NumPy's), so a seed selects
    other indices than there.

    Args:
        N: Size of the data set.
        M: Size of the subset.
        seed: Seed of the draw.

    Attributes:
        indices: The selected indices ``[M]`` in the order they are yielded.

    Raises:
        ValueError: Unless ``0 < M <= N``.
    """

    def __init__(self, N: int, M: int, seed: int = 0) -> None:
        if not 0 < M <= N:
            raise ValueError(f"SoDSampler needs 0 < M <= N, got N={N}, M={M}.")
        generator = torch.Generator().manual_seed(seed)
        self.indices = torch.randperm(N, generator=generator)[:M]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices.tolist())

    def __len__(self) -> int:
        return len(self.indices)
