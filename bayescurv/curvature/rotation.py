r"""Products :math:`x Q` with an eigenvector matrix that has exact unit columns.

# NOTE [Rotations that skip exact unit eigenvectors]
# A factor whose row i is exactly zero (zero padding that a 3x3 convolution on a 1x1
# map always sees, a channel that is never active) is decomposed with e_i as an exact
# eigenvector (NOTE [Zero rows split off before a decomposition] in linalg.py), so its
# eigenvector matrix is a permuted block diagonal diag(Q_r, I). Rotating x by it needs
# only x_r Q_r plus a copy of the other coordinates: a ResNet-18 last-stage input
# factor keeps 512 of 4,608 rows, so the GLM predictive's rotation costs 1/81 of the
# dense product and reads a 2 MB block instead of a 170 MB matrix. The split is read
# off the matrix (a column with one nonzero entry, of magnitude 1, whose row has no
# other nonzero) and is exact: the copied coordinates are the dense product's too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MIN_UNIT_FRACTION = 0.125
"""Split only if at least this fraction of the columns are unit vectors."""


@dataclass(frozen=True)
class Rotation:
    r""":math:`x \mapsto x Q` for an orthonormal ``Q: [n, n]`` (columns: eigenvectors).

    Attributes:
        matrix: ``Q``.
        rows: Rows of the dense block ``Q_r`` (``None``: no split, dense product).
        cols: Its columns.
        block: ``Q[rows][:, cols]``.
        unit_rows: For each unit column, the row of its nonzero entry.
        unit_cols: The unit columns.
        signs: Their nonzero entries (``+1`` or ``-1``).

    Example:
        >>> q = torch.tensor([[0.0, 0.6, 0.8], [1.0, 0.0, 0.0], [0.0, 0.8, -0.6]])
        >>> r = Rotation.of(q)
        >>> r.unit_cols.tolist(), r.rows.tolist()
        ([0], [0, 2])
        >>> x = torch.tensor([[1.0, 2.0, 3.0]])
        >>> torch.equal(r.apply(x), x @ q)
        True
    """

    matrix: Tensor
    rows: Tensor | None = None
    cols: Tensor | None = None
    block: Tensor | None = None
    unit_rows: Tensor | None = None
    unit_cols: Tensor | None = None
    signs: Tensor | None = None

    @classmethod
    def of(cls, matrix: Tensor) -> Rotation:
        """The rotation by ``matrix``, split where it has enough unit columns."""
        size = matrix.shape[-1]
        if matrix.dim() != 2 or size < 2:
            return cls(matrix)
        nonzero = matrix != 0
        per_column = nonzero.sum(0)
        unit = (per_column == 1) & (matrix.abs().amax(0) == 1)
        if unit.sum() < MIN_UNIT_FRACTION * size:
            return cls(matrix)
        unit_cols = unit.nonzero().squeeze(1)
        unit_rows = nonzero[:, unit_cols].to(torch.uint8).argmax(0)
        per_row = nonzero[unit_rows].sum(1)
        if bool((per_row != 1).any()):  # a row with the unit entry and others
            return cls(matrix)
        kept = torch.ones(size, dtype=torch.bool, device=matrix.device)
        kept[unit_rows] = False
        rows = kept.nonzero().squeeze(1)
        cols = (~unit).nonzero().squeeze(1)
        return cls(
            matrix,
            rows,
            cols,
            matrix[rows][:, cols],
            unit_rows,
            unit_cols,
            matrix[unit_rows, unit_cols],
        )

    def apply(self, x: Tensor) -> Tensor:
        r""":math:`x Q` for ``x: [..., n]`` as one ``[-1, n]`` product, ``[..., n]``.

        # NOTE [Rotations as one matrix product]
        # ``x @ Q`` with a batched ``x`` that cannot be viewed as ``[-1, k]`` (a
        # transposed view, as conv patches [N, T, in] of channel-major [N, in, T]
        # are) broadcasts ``Q`` to a batched product that reads it once per batch
        # entry: 130 ms instead of ~10 ms for 15 samples of a ResNet-18 conv's
        # 2,304 x 2,304 float64 eigenbasis. Copying ``x`` (N T k entries) to feed
        # one product is far cheaper.
        """
        flat = x.reshape(-1, x.shape[-1])
        if self.rows is None:
            return (flat @ self.matrix).reshape(x.shape)
        dtype = torch.promote_types(x.dtype, self.matrix.dtype)
        out = flat.new_empty(flat.shape, dtype=dtype)
        out[:, self.cols] = flat[:, self.rows].to(dtype) @ self.block
        out[:, self.unit_cols] = flat[:, self.unit_rows] * self.signs
        return out.reshape(x.shape)
