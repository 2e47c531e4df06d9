r"""Building blocks of Kronecker factors that layer rules return.

A layer whose weight acts on inputs :math:`x_{nr} \in \mathbb{R}^{d_{in}}` at ``R``
positions ``r`` that share the weight (sequence positions of a ``Linear`` on
``[N, T, in]``, output locations of a convolution, tokens of an ``Embedding``) and whose
output side receives pulled-back columns :math:`c_{vnr} \in \mathbb{R}^{d_{out}}` has
per-sample, per-column weight vectors :math:`\sum_r c_{vnr} x_{nr}^\top`. The two
Kronecker approximations of Eschenhagen et al. (NeurIPS 2023) of its GGN block are
(see :class:`KFACApprox`)

.. math::
    \text{expand:}\quad B = \sum_{v,n,r} c_{vnr} c_{vnr}^\top, \quad
    A = \frac{1}{NR} \sum_{n,r} x_{nr} x_{nr}^\top

.. math::
    \text{reduce:}\quad B = \sum_{v,n} \Big(\sum_r c_{vnr}\Big)
    \Big(\sum_r c_{vnr}\Big)^\top, \quad
    A = \frac{1}{N} \sum_n \bar x_n \bar x_n^\top, \quad
    \bar x_n = \frac{1}{R} \sum_r x_{nr}.

Rules return the input side as :class:`InputStats` (computed once per layer call) and
the output side as the vectors :math:`c` (per chunk of columns); the engine forms the
factors.

**Grouped weights.** A weight whose rows split into ``G`` groups that each see their
own slice of the input (a grouped or depthwise convolution) has a block-diagonal
approximation with one Kronecker block per group. Its statistics carry a leading group
axis (inputs ``[G, N, R, d]``, see :func:`grouped_input_stats`), its output-side vectors
are ``[V, N, R, G, d_out]`` and its factors ``[G, d, d]`` (``B_g`` and ``A_g`` of group
``g``); see :func:`outer_products`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from bayescurv.engine.pool import POOL


class KFACApprox(str, Enum):
    """How KFAC/KFLR treat positions that share a weight (Eschenhagen et al., 2023).

    Both coincide, and are exact for one datum, when there is a single position.
    """

    EXPAND = "expand"
    r"""Positions count as extra samples: :math:`B` sums the outer products of the
    columns at every position, :math:`A` averages the input outer products over samples
    *and* positions. Natural when every position has its own loss term (language
    models, per-pixel losses); for convolutions it is KFC (Grosse & Martens, 2016)."""
    REDUCE = "reduce"
    r"""Positions are summed out first: :math:`B` is built from the per-sample sums of
    the columns over positions, :math:`A` from the per-sample means of the inputs over
    positions. Exact when the inputs do not vary over positions; natural when positions
    are pooled into one prediction per sample (classification from a sequence)."""


def as_approx(value: KFACApprox | str, owner: str) -> KFACApprox:
    """Coerce ``value`` to :class:`KFACApprox`, raising a clear error otherwise."""
    try:
        return KFACApprox(value)
    except ValueError:
        choices = ", ".join(repr(a.value) for a in KFACApprox)
        raise ValueError(
            f"{owner}: kfac_approx must be one of {choices}, got {value!r}."
        ) from None


@dataclass
class InputStats:
    r"""Input-side statistics of one layer call for one weight.

    Attributes:
        approx: The approximation the statistics are for.
        positions: Positions ``R`` per sample that share the weight in this call.
        moment: ``expand`` only: :math:`\sum_{n,r} x_{nr} x_{nr}^\top`, ``[d, d]``, or
            its diagonal ``[d]`` when the inputs are one-hot (``Embedding``).
        sums: ``reduce`` only: :math:`\sum_r x_{nr}`, ``[N, d]``.
        input_first: Whether the weight's leading axis is the input side (the factors
            are then ``[A, B]``, e.g. ``Embedding``'s ``[num_embeddings, dim]``).
        inputs: The inputs ``[N, R, d]`` themselves, until :meth:`accumulated` forms
            ``moment`` or ``sums`` from them in the engine's accumulation dtype (see
            NOTE [Gram matrices in the accumulation dtype]).
        groups: ``0`` for one Kronecker block; ``G`` for a grouped weight, whose
            ``inputs`` are ``[G, N, R, d]``, ``moment`` ``[G, d, d]`` and ``sums``
            ``[G, N, d]``.
    """

    approx: KFACApprox
    positions: int
    moment: Tensor | None = None
    sums: Tensor | None = None
    input_first: bool = False
    inputs: Tensor | None = None
    groups: int = 0

    def accumulated(self, dtype: torch.dtype | None = None) -> InputStats:
        """The statistics with ``moment`` or ``sums`` formed in ``dtype``.

        Inputs kept by :func:`input_stats` are upcast (chunk by chunk) before their
        products are taken; statistics a rule formed itself are cast.

        Args:
            dtype: The accumulation dtype (``None``: that of the inputs).
        """
        if self.inputs is None:
            return dataclasses.replace(
                self, moment=_cast(self.moment, dtype), sums=_cast(self.sums, dtype)
            )
        x = self.inputs
        if self.approx == KFACApprox.EXPAND:
            if self.groups:  # [G, N, R, d] -> [G, d, d]
                moment = _grouped_gram(x.reshape(x.shape[0], -1, x.shape[-1]), dtype)
            else:
                moment = sum_outer(x, dtype)
            return dataclasses.replace(self, moment=moment, inputs=None)
        sums = x.sum(-2) if dtype is None else x.to(dtype).sum(-2)
        return dataclasses.replace(self, sums=sums, inputs=None)

    def folded(self, fold: int) -> InputStats:
        """Statistics of ``fold`` consecutive rows per sample as one sample's positions.

        A layer seeing a folded batch axis (``k N`` rows, see
        :mod:`bayescurv.engine.samples`) has ``k R`` positions per sample.
        """
        if fold == 1:
            return self
        stats = self.accumulated() if self.inputs is not None else self
        sums = stats.sums
        if sums is not None:  # [(G,) k N, d] -> [(G,) N, d]
            sums = sums.reshape(*sums.shape[:-2], -1, fold, sums.shape[-1]).sum(-2)
        return dataclasses.replace(stats, positions=stats.positions * fold, sums=sums)

    def merge(self, other: InputStats) -> InputStats:
        """Statistics of two calls of a shared weight (its calls are extra positions).

        # NOTE [Kronecker factors of weight-shared layers]
        # A weight used in k calls gets the factors of one call whose positions are
        # the positions of all k calls: expand sums the column outer products over
        # calls and averages the input outer products over calls and positions;
        # reduce sums the columns and averages the inputs over calls and positions
        # per sample before the outer products.
        """
        first, second = self.accumulated(), other.accumulated()
        if (first.moment is None) != (second.moment is None):
            raise ValueError("cannot merge expand and reduce input statistics.")
        return dataclasses.replace(
            first,
            positions=first.positions + second.positions,
            moment=None if first.moment is None else first.moment + second.moment,
            sums=None if first.sums is None else first.sums + second.sums,
        )

    def factor(self, batch_size: int, last_use: bool = False) -> Tensor:
        """The input factor ``A``: ``[d, d]``, its diagonal ``[d]`` or ``[G, d, d]``.

        Args:
            batch_size: ``N``.
            last_use: The statistics are not used again, so an accumulated moment may
                become the factor in place (no ``[d, d]`` copy: a ResNet-18 conv's
                4,608 x 4,608 float64 factor costs more to copy than to form).
        """
        stats = self.accumulated() if self.inputs is not None else self
        if stats.moment is not None:
            scale = batch_size * stats.positions
            fresh = self.inputs is not None
            # the statistics' own moment is divided in place when they are used once
            return (
                stats.moment.div_(scale) if fresh or last_use else stats.moment / scale
            )
        mean = stats.sums / stats.positions  # [(G,) N, d]
        return mean.mT @ mean / batch_size


def _grouped_gram(rows: Tensor, dtype: torch.dtype | None) -> Tensor:
    r""":math:`X_g^\top X_g` per group of ``rows: [G, M, d]``, ``[G, d, d]``."""
    if dtype is not None and dtype != rows.dtype:
        rows = rows.to(dtype)
    return rows.mT @ rows


def outer_products(c: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    r"""Summed outer products of output-side vectors, one or ``G`` blocks.

    Args:
        c: ``[..., R, d]`` (one block, see :func:`sum_outer`) or, for a grouped
            weight, ``[V, N, R, G, d]``.
        dtype: Accumulation dtype (default ``c``'s).

    Returns:
        ``[d, d]``, or ``[G, d, d]`` for a grouped weight.
    """
    if c.dim() < 5:
        return sum_outer(c, dtype)
    groups, d = c.shape[-2:]
    return _grouped_gram(c.movedim(-2, 0).reshape(groups, -1, d), dtype)


def _cast(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    return t if t is None or dtype is None else t.to(dtype)


_GRAM_CHUNK = 2**22
"""Output entries of one batched product in :func:`sum_outer` (and entries of one
upcast chunk of its input)."""


_SPARSE_COLUMNS_MIN = 256
"""Smallest ``d`` whose exactly-zero columns :func:`_gram` looks for."""


# NOTE [Gram matrices of inputs with zero columns]
# A 3x3 convolution with padding 1 on the 1x1 maps of a ResNet's last stage (CIFAR
# inputs through the ImageNet stem) sees zero padding at 8 of its 9 kernel taps: 4,096
# of the 4,608 columns of its patches are exactly zero in every sample. The Gram
# matrix is then zero outside the 512 x 512 block of the other columns, which is
# formed alone and scattered into a zero matrix: 1/81 of the products (the product
# of a 32-row batch took 17% of a ResNet-18 all-weights KFAC fit).
def _gram(rows: Tensor, dtype: torch.dtype | None) -> Tensor:
    r""":math:`X^\top X` of ``rows: [M, d]`` formed in ``dtype`` (see the NOTE)."""
    d = rows.shape[1]
    if d >= _SPARSE_COLUMNS_MIN and rows.shape[0] > 0:
        kept = rows.any(0).nonzero().squeeze(1)
        if 2 * len(kept) <= d:  # zeroed in reused memory (NOTE [Reusing result ...])
            out = POOL.empty((d, d), dtype or rows.dtype, rows.device).zero_()
            if len(kept):
                out[kept[:, None], kept] = _dense_gram(rows[:, kept], dtype)
            return out
    return _dense_gram(rows, dtype)


def _dense_gram(rows: Tensor, dtype: torch.dtype | None) -> Tensor:
    r""":math:`X^\top X` of ``rows: [M, d]`` formed in ``dtype``, upcast in chunks."""
    if dtype is None or dtype == rows.dtype:
        return _symmetric_product(rows)
    step = max(1, _GRAM_CHUNK // max(rows.shape[1], 1))
    total = None
    for start in range(0, rows.shape[0], step):
        part = rows[start : start + step].to(dtype)
        total = _symmetric_product(part, total)
    if total is None:
        return rows.new_zeros(rows.shape[1], rows.shape[1], dtype=dtype)
    return total


_SYMMETRIC_BLOCKS = 4
"""Column blocks of :func:`_symmetric_product` (see its NOTE)."""


# NOTE [Gram matrices from their upper block triangle]
# X^T X is symmetric, but a plain matrix product computes both triangles. With the
# columns of X in k blocks, the k (k + 1) / 2 products of the upper block triangle
# cost (k + 1) / (2 k) of the whole, and mirroring the blocks below the diagonal
# is one pass over d^2 entries. On CPU (float64, one thread) k = 4 takes 0.65x the
# time of the plain product for M >= d (e.g. 32 vs 49 ms for 1,024 x 1,024: a LoRA
# adapter's output factor), where the product is compute bound; with few rows
# (M < d / 2: a ResNet's last-stage input factor from one batch, 32 x 4,608) it is
# memory bound, the blocks only add passes, and the plain product is used.
def _symmetric_product(x: Tensor, total: Tensor | None = None) -> Tensor:
    r""":math:`X^\top X` of ``x: [M, d]``, added to ``total`` if given (see NOTE)."""
    rows, d = x.shape
    if 2 * rows < d or d < 64 * _SYMMETRIC_BLOCKS:
        return x.T @ x if total is None else total.addmm_(x.T, x)
    out = x.new_empty(d, d) if total is None else total
    width = -(-d // _SYMMETRIC_BLOCKS)
    for i in range(0, d, width):
        upper = out[i : i + width, i:]
        if total is None:
            torch.mm(x[:, i : i + width].T, x[:, i:], out=upper)
        else:
            upper.addmm_(x[:, i : i + width].T, x[:, i:])
    for i in range(0, d - width, width):
        out[i + width :, i : i + width] = out[i : i + width, i + width :].T
    return out


def sum_outer(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    r""":math:`\sum_{b, r} x_{br} x_{br}^\top` of ``x: [..., R, d]``, ``[d, d]``.

    Args:
        x: The vectors, ``[..., R, d]``.
        dtype: Form the products in this dtype (``x`` upcast chunk by chunk); default
            ``x``'s. See NOTE [Gram matrices in the accumulation dtype].

    # NOTE [Outer products of channel-major tensors]
    # Convolution inputs (patches) and outputs are stored channel-major, so ``x`` is
    # a transposed view of a contiguous ``[..., d, R]``. Flattening it to ``[-1, d]``
    # would copy it; instead, for many positions (R >= d) the sum is taken over
    # batched ``[d, R] @ [R, d]`` products in chunks, and for few positions one copy
    # feeds a single large product.
    """
    d, r = x.shape[-1], x.shape[-2]
    channel_major = x.transpose(-1, -2).is_contiguous() and not x.is_contiguous()
    if not channel_major or r == 1:
        return _gram(x.reshape(-1, d), dtype)
    mats = x.transpose(-1, -2).reshape(-1, d, r)
    if r < d:
        return _gram(mats.transpose(0, 1).reshape(d, -1).T, dtype)
    upcast = dtype is not None and dtype != x.dtype
    step = max(1, _GRAM_CHUNK // (d * (r if upcast else d)))
    total = None
    for start in range(0, mats.shape[0], step):
        part = mats[start : start + step]
        if upcast:
            part = part.to(dtype)
        gram = torch.bmm(part, part.transpose(1, 2)).sum(0)
        total = gram if total is None else total.add_(gram)
    return total


def input_stats(x: Tensor, approx: KFACApprox, input_first: bool = False) -> InputStats:
    """Statistics of inputs ``x: [N, R, d]`` (``R`` positions sharing the weight).

    The products are formed when the engine calls :meth:`InputStats.accumulated`
    with its accumulation dtype (right after the rule returns, once per call).
    """
    return InputStats(approx, x.shape[1], input_first=input_first, inputs=x)


def grouped_input_stats(x: Tensor, approx: KFACApprox) -> InputStats:
    """Statistics of a grouped weight's inputs ``x: [G, N, R, d]`` (one block each)."""
    return InputStats(approx, x.shape[2], inputs=x, groups=x.shape[0])


def one_hot_stats(
    indices: Tensor,
    num_classes: int,
    approx: KFACApprox,
    dtype: torch.dtype,
    ignore: int | None = None,
) -> InputStats:
    """Statistics of one-hot inputs ``indices: [N, R]``, never building one-hots.

    ``expand`` gives the diagonal moment (token counts); ``reduce`` the per-sample
    counts. Positions equal to ``ignore`` count as zero inputs.
    """
    indices = indices.long()
    n, positions = indices.shape
    weights = torch.ones(indices.shape, dtype=dtype, device=indices.device)
    if ignore is not None:
        weights = weights * (indices != ignore)
    if approx == KFACApprox.EXPAND:
        counts = torch.zeros(num_classes, dtype=dtype, device=indices.device)
        counts.index_add_(0, indices.flatten(), weights.flatten())
        return InputStats(approx, positions, moment=counts, input_first=True)
    sums = torch.zeros(n, num_classes, dtype=dtype, device=indices.device)
    sums.scatter_add_(1, indices, weights)
    return InputStats(approx, positions, sums=sums, input_first=True)
