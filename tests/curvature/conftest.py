"""Fixtures of the curvature tests: prior parametrization and decomposition counting."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

# Every decomposition a structure could call; counted by ``decomposition_sizes``.
DECOMPOSITIONS = ("eigh", "eigvalsh", "cholesky", "cholesky_ex", "svd", "qr", "inv")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``prior_kind`` with the prior structures the test class supports."""
    if "prior_kind" in metafunc.fixturenames and metafunc.cls is not None:
        kinds = metafunc.cls.prior_kinds
        metafunc.parametrize("prior_kind", kinds, ids=[k.value for k in kinds])


@pytest.fixture
def decomposition_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of all matrices decomposed by ``torch.linalg`` while the test runs."""
    sizes: list[int] = []

    def counting(original: Callable) -> Callable:
        def wrapper(matrix: torch.Tensor, *args, **kwargs):
            sizes.append(matrix.shape[-1])
            return original(matrix, *args, **kwargs)

        return wrapper

    for name in DECOMPOSITIONS:
        monkeypatch.setattr(torch.linalg, name, counting(getattr(torch.linalg, name)))
    return sizes
