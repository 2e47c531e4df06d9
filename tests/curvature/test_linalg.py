"""Eigendecompositions that do not converge are retried, never fail on PSD input."""

from __future__ import annotations

import pytest
import torch

from bayescurv.curvature import KronBlocks, NotPositiveDefiniteError, linalg


def _zero_padded(dtype: torch.dtype) -> torch.Tensor:
    """A PSD factor whose last rows are exactly zero (conv padding on tiny maps)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    matrix = torch.zeros(8, 8, dtype=torch.float64)
    matrix[:3, :3] = x @ x.T
    return matrix.to(dtype)


def _failing(times: int):
    """An eigh that raises LinAlgError on its first ``times`` calls."""
    real = torch.linalg.eigh
    calls = {"count": 0}

    def eigh(matrix: torch.Tensor):
        calls["count"] += 1
        if calls["count"] <= times:
            raise torch.linalg.LinAlgError("simulated: did not converge")
        return real(matrix)

    return eigh, calls


def test_float32_failure_is_retried_in_float64(monkeypatch):
    eigh, calls = _failing(1)
    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    matrix = _zero_padded(torch.float32)
    values, vectors = linalg.symmetric_eigh(matrix, "KronBlocks")
    assert calls["count"] == 2
    assert values.dtype == vectors.dtype == torch.float32
    rebuilt = vectors @ torch.diag(values) @ vectors.T
    torch.testing.assert_close(rebuilt, matrix, rtol=1e-5, atol=1e-5)


def test_second_failure_is_retried_with_a_jitter_and_a_warning(monkeypatch):
    eigh, calls = _failing(2)
    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    matrix = _zero_padded(torch.float32)
    with pytest.warns(UserWarning, match="succeeded with a diagonal jitter"):
        values, _ = linalg.symmetric_eigh(matrix, "KronBlocks")
    assert calls["count"] == 3
    expected = torch.linalg.eigvalsh(matrix.double()).float()
    torch.testing.assert_close(values, expected, rtol=1e-5, atol=1e-5)


def test_every_attempt_failing_raises_naming_the_structure(monkeypatch):
    eigh, _ = _failing(10)
    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    with pytest.raises(NotPositiveDefiniteError, match=r"KronBlocks: .* float64 and"):
        linalg.symmetric_eigh(_zero_padded(torch.float32), "KronBlocks")


def test_a_structure_decomposes_through_the_fallback(monkeypatch):
    eigh, _ = _failing(1)
    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    factor = _zero_padded(torch.float32)
    blocks = KronBlocks({"w": [torch.eye(2), factor]}).add_prior(0.1)
    expected = torch.logdet(
        torch.kron(torch.eye(2), factor.double()) + 0.1 * torch.eye(16)
    )
    torch.testing.assert_close(blocks.logdet().double(), expected, rtol=1e-5, atol=1e-5)
