"""Diagonal curvature: one entry per parameter."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from bayescurv.curvature import prior as priors
from bayescurv.curvature.base import CurvatureMatrix, Pieces
from bayescurv.curvature.factorizations import DiagonalFactorization
from bayescurv.curvature.linalg import check_tensor
from bayescurv.curvature.prior import PrecisionLike


class Diagonal(CurvatureMatrix):
    r"""A diagonal precision :math:`\Lambda = \operatorname{diag}(s \odot h + \pi)`.

    Every operation is elementwise, :math:`O(P)`. The scale may be per block.

    Args:
        entries: The data term's diagonal ``h``, ``[P]`` (e.g. a GGN diagonal).
        block_sizes: Parameters per block; ``None`` for one block.
        block_names: One name per block.
        scale: Data-term scale, a scalar or ``[B]``.
        prior_precision: A scalar, ``[B]`` or ``[P]``.

    Example:
        >>> import math, torch
        >>> H = Diagonal(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        >>> math.isclose(H.add_prior(1.0).logdet().item(), math.log(2 * 3 * 4))
        True
    """

    supports_block_scale = True
    blockwise_spectrum = True

    def __init__(
        self,
        entries: Tensor,
        *,
        block_sizes: Sequence[int] | None = None,
        block_names: Sequence[str] | None = None,
        scale: PrecisionLike = 1.0,
        prior_precision: PrecisionLike = 0.0,
    ) -> None:
        self.entries = check_tensor(entries, "Diagonal", "entries", ndim=1)
        super().__init__(
            block_sizes=block_sizes,
            block_names=block_names,
            scale=scale,
            prior_precision=prior_precision,
            num_params=self.entries.shape[0],
            like=self.entries,
        )

    @classmethod
    def from_blocks(cls, blocks: Mapping[str, Tensor], **kwargs: Any) -> Diagonal:
        """Build from named per-parameter-tensor diagonals (e.g. engine results).

        Args:
            blocks: Name to diagonal of any shape; flattened row-major, in order.
            **kwargs: ``scale`` and ``prior_precision``.
        """
        tensors = [
            check_tensor(t, "Diagonal", f"block {n!r}", t.ndim)
            for n, t in blocks.items()
        ]
        return cls(
            torch.cat([t.flatten() for t in tensors]),
            block_sizes=[t.numel() for t in tensors],
            block_names=list(blocks),
            **kwargs,
        )

    def diagonal(self) -> Tensor:  # noqa: D102
        scale = priors.expand(self._scale, self.block_sizes)
        return scale * self.entries + priors.expand(self._prior, self.block_sizes)

    def dense(self) -> Tensor:  # noqa: D102
        return torch.diag(self.diagonal())

    def data_eigenvalues(self) -> Tensor:  # noqa: D102
        scale = priors.expand(self._scale.detach(), self.block_sizes)
        return (scale * self.entries).expand(self.num_params)

    def _mvp(self, x: Tensor) -> Tensor:
        return self.diagonal()[:, None] * x

    def _factorize(self) -> Pieces:
        return [
            (
                slice(0, self.num_params),
                DiagonalFactorization(self.diagonal(), "Diagonal"),
            )
        ]

    def _data_state(self) -> dict[str, Any]:
        return {"entries": self.entries}

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> Diagonal:
        return cls(
            state["entries"],
            block_sizes=state["block_sizes"],
            block_names=state["block_names"],
            scale=state["scale"],
            prior_precision=state["prior_precision"],
        )

    def _map_data(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.entries = fn(self.entries)
