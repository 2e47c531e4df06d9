"""Block-diagonal Kronecker-factored curvature (KFAC, KFLR, KFRA)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import reduce
from typing import Any

import torch
from torch import Tensor

from bayescurv.curvature import prior as priors
from bayescurv.curvature.base import CurvatureMatrix, Pieces
from bayescurv.curvature.factorizations import SpectralFactorization
from bayescurv.curvature.linalg import check_symmetric, mode_products
from bayescurv.curvature.prior import PrecisionLike, PriorStructure
from bayescurv.curvature.spectral import KronEigenbasis, LazyEigenbasis

BlocksLike = Mapping[str, Sequence[Tensor]] | Sequence[Sequence[Tensor]]
"""Kronecker factors per block, named (a mapping) or in order (names ``"0", ...``)."""

_OWNER = "KronBlocks"


# NOTE [Exact damping through eigenbases]
# Adding pi * I to s * kron(B, A) is exact in the factors' eigenbases: eigenvalues
# s * b_i * a_j + pi, eigenvectors kron(Q_B, Q_A). The common alternative, damping each
# factor, kron(B + sqrt(pi) I, A + sqrt(pi) I), adds the cross terms
# sqrt(pi) * (kron(B, I) + kron(I, A)) and makes the evidence depend on pi in the
# wrong way. A per-parameter prior has no such eigenbasis: it is rejected, not
# approximated.
class KronBlocks(CurvatureMatrix):
    r"""A block-diagonal precision with Kronecker-factored blocks.

    Block :math:`b` with factors :math:`F_{b,1}, \dots, F_{b,m}` is

    .. math::
        \Lambda_b = s_b\, F_{b,1} \otimes \dots \otimes F_{b,m} + \pi_b I .

    For a weight ``[out, in, ...]`` flattened row-major the factors are ``[B, A]``
    with ``B: [out, out]`` and ``A`` over the flattened input dimensions; for a bias
    the single factor ``[B]``. A block whose factors are stacks ``[G, n_i, n_i]`` (a
    grouped convolution's weight, one Kronecker product per group) is the
    block-diagonal matrix of the ``G`` products
    :math:`F_{g,1} \otimes \dots \otimes F_{g,m}`, group-major. Every factor is
    eigendecomposed once, on first use, and the decomposition is shared by all
    objects derived with ``add_prior`` / ``scaled``, so a new prior or scale costs
    :math:`O(P)`. The dense Kronecker product is formed only by :meth:`dense`.

    Args:
        blocks: Symmetric positive semi-definite factors per block.
        scale: Data-term scale :math:`s`: a scalar or ``[B]`` (e.g. the number of
            data points, or ``1 / temperature``).
        prior_precision: :math:`\pi`: a scalar or ``[B]``. Per-parameter priors
            raise ``ValueError`` (see the module note).

    Example:
        >>> import torch
        >>> eye = torch.eye(3, dtype=torch.float64)
        >>> B, A = 2 * eye[:2, :2], 3 * eye
        >>> K = KronBlocks({"weight": [B, A]}).add_prior(4.0)
        >>> bool(torch.isclose(K.logdet(), 6 * torch.tensor(10.0).double().log()))
        True
    """

    supports_block_scale = True
    supported_priors = frozenset({PriorStructure.SCALAR, PriorStructure.LAYERWISE})
    blockwise_spectrum = True

    def __init__(
        self,
        blocks: BlocksLike,
        *,
        scale: PrecisionLike = 1.0,
        prior_precision: PrecisionLike = 0.0,
    ) -> None:
        if isinstance(blocks, Mapping):
            names, factor_lists = list(blocks), list(blocks.values())
        else:
            factor_lists = list(blocks)
            names = [str(i) for i in range(len(factor_lists))]
        if not factor_lists or any(len(fs) == 0 for fs in factor_lists):
            raise ValueError(f"{_OWNER}: every block needs at least one factor.")
        self.factors = tuple(
            _checked_block(name, fs)
            for name, fs in zip(names, factor_lists, strict=True)
        )
        first = self.factors[0][0]
        if any(f.dtype != first.dtype or f.device != first.device for f in self._all()):
            raise ValueError(f"{_OWNER}: all factors need the same dtype and device.")
        self._bases = tuple(LazyEigenbasis(fs, _OWNER) for fs in self.factors)
        sizes = [
            reduce(int.__mul__, (f.shape[-1] for f in fs), _groups(fs) or 1)
            for fs in self.factors
        ]
        super().__init__(
            block_sizes=sizes,
            block_names=names,
            scale=scale,
            prior_precision=prior_precision,
            num_params=sum(sizes),
            like=first,
        )

    def dense(self) -> Tensor:  # noqa: D102
        blocks = []
        for fs, s, p in zip(self.factors, *self._per_block(), strict=True):
            kron = _kron(fs)
            blocks.append(
                s * kron
                + p * torch.eye(kron.shape[0], dtype=kron.dtype, device=kron.device)
            )
        return torch.block_diag(*blocks)

    def diagonal(self) -> Tensor:  # noqa: D102
        diagonals = [
            s
            * reduce(
                lambda a, b: (a[..., :, None] * b[..., None, :]).flatten(-2),
                [f.diagonal(dim1=-2, dim2=-1) for f in fs],
            ).flatten()
            + p
            for fs, s, p in zip(self.factors, *self._per_block(), strict=True)
        ]
        return torch.cat(diagonals)

    def _mvp(self, x: Tensor) -> Tensor:
        out = []
        items = zip(self.factors, self.block_slices(), *self._per_block(), strict=True)
        for fs, block, s, p in items:
            xb = x[block]
            groups = [_groups(fs)] if _groups(fs) else []
            sizes = [f.shape[-1] for f in fs]
            grid = xb.reshape(*groups, *sizes, -1)
            kron_x = mode_products(grid, fs, grouped=bool(groups)).reshape(xb.shape)
            out.append(s * kron_x + p * xb)
        return torch.cat(out)

    def _factorize(self) -> Pieces:
        pieces = []
        items = zip(self._bases, self.block_slices(), *self._per_block(), strict=True)
        for lazy, block, s, p in items:
            basis = lazy.get()
            eigenvalues = s * basis.eigenvalues() + p
            pieces.append((block, SpectralFactorization(basis, eigenvalues, _OWNER)))
        return pieces

    def eigenbases(self) -> tuple[KronEigenbasis, ...]:
        """Per block, the eigendecomposition of its factors (unscaled, no prior).

        Computed on first use and shared with every structure derived by
        ``add_prior`` / ``scaled``; eigenvalues within round-off of zero are zeroed.
        """
        return tuple(lazy.get() for lazy in self._bases)

    def data_eigenvalues(self) -> Tensor:  # noqa: D102
        scales = priors.per_block(self._scale.detach(), self.block_sizes)
        return torch.cat(
            [
                s * lazy.get().eigenvalues()
                for lazy, s in zip(self._bases, scales, strict=True)
            ]
        )

    def _per_block(self) -> tuple[Tensor, Tensor]:
        """Scale and prior per block, ``[B]`` each."""
        return (
            priors.per_block(self._scale, self.block_sizes),
            priors.per_block(self._prior, self.block_sizes),
        )

    def _all(self) -> list[Tensor]:
        return [f for fs in self.factors for f in fs]

    def _unsupported_prior_message(self, structure: PriorStructure) -> str:
        return (
            f"{_OWNER}: a per-parameter (diagonal) prior precision cannot be applied "
            "exactly through the Kronecker eigenbases; pass a scalar or a per-block "
            f"tensor of shape [{self.num_blocks}], or use a Diagonal or Dense "
            "structure."
        )

    def _data_state(self) -> dict[str, Any]:
        return {
            "factors": [list(fs) for fs in self.factors],
            "eigenbases": [lazy.state_dict() for lazy in self._bases],
        }

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> KronBlocks:
        blocks = dict(zip(state["block_names"], state["factors"], strict=True))
        new = cls(
            blocks, scale=state["scale"], prior_precision=state["prior_precision"]
        )
        new._bases = tuple(
            LazyEigenbasis(fs, _OWNER, LazyEigenbasis.basis_from_state(saved))
            for fs, saved in zip(new.factors, state["eigenbases"], strict=True)
        )
        return new

    def _map_data(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.factors = tuple(tuple(fn(f) for f in fs) for fs in self.factors)
        self._bases = tuple(lazy.map(fn) for lazy in self._bases)


def _groups(factors: Sequence[Tensor]) -> int:
    """``G`` for a grouped block (factors ``[G, n, n]``), ``0`` otherwise."""
    return factors[0].shape[0] if factors[0].dim() == 3 else 0


def _kron(factors: Sequence[Tensor]) -> Tensor:
    """The dense block: one Kronecker product, or ``G`` of them block-diagonally."""
    if _groups(factors):
        return torch.block_diag(
            *(reduce(torch.kron, fs) for fs in zip(*factors, strict=True))
        )
    return reduce(torch.kron, factors)


def _checked_block(name: str, factors: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """The symmetrized factors of one block: all ``[n, n]`` or all ``[G, n, n]``."""
    grouped = isinstance(factors[0], Tensor) and factors[0].dim() == 3
    checked = tuple(
        check_symmetric(f, _OWNER, f"factor {i} of block {name!r}", batched=grouped)
        for i, f in enumerate(factors)
    )
    if grouped and len({f.shape[0] for f in checked}) > 1:
        raise ValueError(
            f"{_OWNER}: the grouped factors of block {name!r} need the same number of "
            f"groups, got shapes {[list(f.shape) for f in checked]}."
        )
    return checked
