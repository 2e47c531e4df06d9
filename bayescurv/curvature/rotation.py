r"""Products :math:`x Q` with an eigenvector matrix that has exact unit columns.

# NOTE [Rotations that skip exact unit eigenvectors]
# A factor whose row i is exactly zero (zero padding that a 3x3 convolution on a 1x1
# map always sees, a channel that is never active) is decomposed with e_i as an exact
# eigenvector (NOTE [Zero rows split off before a decomposition] in linalg.py), so its
# eigenvector matrix is a permuted block diagonal diag(Q_r, I). Rotating x by it needs
# only x_r Q_r plus a copy of the other coordinates: a ResNet-18 last-stage input
# factor keeps 512 of 4,608 rows, so the GLM predictive's rotation costs 1/81 of the
# dense product and reads a 2 MB block instead of a 170 MB matrix. The split is
# recorded by the decomposition (linalg.eigh_with_rotation); a basis without that
# record (restored from a state dict, moved) reads it off the matrix once: a row with
# one nonzero entry, of magnitude 1, whose column has no other nonzero. Either way
# it is exact: the copied coordinates are the dense product's too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MIN_UNIT_FRACTION = 0.125
"""Split only if at least this fraction of the columns are unit vectors: below it the
copies (a gather and a scatter of columns) cost more than the product they save."""


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
        signs: Their nonzero entries (``+1`` or ``-1``; ``None``: all ``+1``).

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
        """The rotation by ``matrix``, split where it has enough unit columns.

        Row-wise reductions (contiguous, ~10 ms for a 4,608-square float64 matrix)
        rule out a split first; only candidate rows are checked exactly.
        """
        size = matrix.shape[-1]
        if matrix.dim() != 2 or size < 2:
            return cls(matrix)
        high, low = matrix.amax(1), matrix.amin(1)
        candidate = ((high == 1) & (low == 0)) | ((low == -1) & (high == 0))
        if candidate.sum() < MIN_UNIT_FRACTION * size:
            return cls(matrix)
        unit_rows = candidate.nonzero().squeeze(1)
        rows_of_units = matrix[unit_rows]
        unit_cols = rows_of_units.abs().argmax(1)
        single = torch.count_nonzero(rows_of_units, dim=1) == 1
        kept = torch.ones(size, dtype=torch.bool, device=matrix.device)
        kept[unit_rows] = False
        rows = kept.nonzero().squeeze(1)
        columns = torch.zeros(size, dtype=torch.bool, device=matrix.device)
        columns[unit_cols] = True
        cols = (~columns).nonzero().squeeze(1)
        exact = bool(single.all()) and len(cols) == len(rows)
        if not exact or bool(matrix[rows][:, unit_cols].any()):
            return cls(matrix)  # a unit column with other nonzeros: not split
        block, signs = matrix[rows][:, cols], matrix[unit_rows, unit_cols]
        return cls(matrix, rows, cols, block, unit_rows, unit_cols, signs)

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
        units = flat[:, self.unit_rows]
        out[:, self.unit_cols] = units if self.signs is None else units * self.signs
        return out.reshape(x.shape)
