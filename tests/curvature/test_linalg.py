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


# NOTE [Factors that real networks produce]
# The tests below decompose, without simulated failures, the Kronecker factors that
# broke or could break a decomposition: input factors of 3x3 convolutions on 1x1
# maps (padding makes 8 of 9 kernel offsets exactly zero, the ResNet-18 last-stage
# case at 64 instead of 512 channels), Gram factors of far lower rank than their
# size, factors whose scales span many orders of magnitude, all-zero factors (a
# layer that was never called) and grouped factors. Each must give a finite,
# positive-definite posterior under a small prior that agrees with float64.
def _conv_input_factor(channels: int, dtype: torch.dtype) -> torch.Tensor:
    """``A`` of a 3x3 convolution (padding 1) on 1x1 maps: 8/9 of the rows are zero."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, channels, 1, 1, generator=gen, dtype=torch.float64)
    patches = torch.nn.functional.unfold(x, 3, padding=1).transpose(1, 2)
    rows = patches.reshape(-1, channels * 9)
    return (rows.T @ rows / rows.shape[0]).to(dtype)


def _badly_scaled(n: int, dtype: torch.dtype) -> torch.Tensor:
    """A rank-deficient PSD factor whose rows span 24 orders of magnitude."""
    gen = torch.Generator().manual_seed(4)
    root = torch.randn(n, n // 2, generator=gen, dtype=torch.float64)
    scales = torch.logspace(-12, 12, n, dtype=torch.float64)
    return (scales[:, None] * (root @ root.T) * scales[None, :]).to(dtype)


def _low_rank(n: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    root = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    return (1e3 * root @ root.T).to(dtype)


FACTORS = {
    "zero-padded conv input": lambda dtype: _conv_input_factor(64, dtype),
    "rank 2 of 300": lambda dtype: _low_rank(300, dtype),
    "scales 1e-24..1e24": lambda dtype: _badly_scaled(40, dtype),
    "all zero": lambda dtype: torch.zeros(50, 50, dtype=dtype),
}


@pytest.mark.parametrize("name", list(FACTORS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_real_psd_factors_decompose(name: str, dtype: torch.dtype):
    """A finite posterior whose well-determined eigenvalues are float64's."""
    factor = FACTORS[name](dtype)
    b = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=dtype)
    data = KronBlocks({"w": [b, factor]})
    posterior = data.add_prior(1e-3)
    assert torch.isfinite(posterior.logdet())
    assert torch.isfinite(posterior.inverse_diagonal()).all()
    assert torch.isfinite(posterior.sample(2)).all()
    values = data.data_eigenvalues().double().sort().values
    assert values.min() >= 0  # round-off negatives are zeroed, none remain
    exact = torch.linalg.eigvalsh(torch.kron(b.double(), factor.double()))
    # eigenvalues below eps * max are round-off in any dtype; compare the others
    determined = exact > 1e-4 * exact.abs().max()
    rtol = 1e-4 if dtype == torch.float32 else 1e-8
    torch.testing.assert_close(values[determined], exact[determined], rtol=rtol, atol=0)


def test_grouped_factors_are_retried_in_float64(monkeypatch):
    eigh, calls = _failing(1)
    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    stack = torch.stack([_zero_padded(torch.float32), torch.eye(8)])
    values, vectors = linalg.symmetric_eigh(stack, "KronBlocks")
    assert calls["count"] == 2
    assert values.shape == (2, 8)
    rebuilt = vectors @ torch.diag_embed(values) @ vectors.mT
    torch.testing.assert_close(rebuilt, stack, rtol=1e-5, atol=1e-5)
