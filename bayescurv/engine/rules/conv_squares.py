r"""Squared per-sample convolution weight vectors, summed, without building them.

With patches :math:`U_n \in \mathbb{R}^{C_{in}K \times L}` and columns
:math:`g_{vn} \in \mathbb{R}^{C_{out} \times L}`, the per-sample weight vector is
:math:`W_{vn} = g_{vn} U_n^\top`, so

.. math::
    \sum_v W_{vn}[o, k]^2 = \sum_{l, l'} A_n[o, l, l'] \, B_n[k, l, l'], \qquad
    A_n[o, l, l'] = \sum_v g_{vn}[o, l] g_{vn}[o, l'], \quad
    B_n[k, l, l'] = U_n[k, l] U_n[k, l'].

Both sides are symmetric in :math:`(l, l')`, so only the :math:`P = L(L+1)/2` pairs
:math:`l \le l'` are formed, off-diagonal ones counted twice. The batched reduction
(``Reduction.BATCH_SQUARED``, ``[N, C_out, C_in K]``) is one batched matmul over
samples with inner dimension ``P``; the summed one (``Reduction.SUM_SQUARED``) one
matmul with inner dimension ``N P``. A grouped convolution does the same per group
(group ``g``'s rows of ``A`` with its columns of ``B``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bayescurv.engine.extensions import Reduction

# NOTE [When location pairs beat per-sample vectors]
# Estimated nanoseconds per sample on one CPU core, with constants fitted to
# experiments/conv_squares.py (float32; ResNet-18 layers at batch 16, 3C3D at 64):
# * pairs: P (C_out/G)(C_in K/G) G multiply-adds in one large compute-bound matmul
#   (MAC_NS each), passes over B ([P, C_in K], built in three passes), the Gram
#   ([L, L, C_out]) and A ([P, C_out], two passes) at PASS_NS per float, the Gram's
#   V L^2 C_out multiply-adds in tiny matmuls (SMALL_MAC_NS) and, for the batched
#   reduction, writing the [C_out, C_in K / G] result;
# * vectors: V (C_out/G)(C_in K/G) G entries, each built from L multiply-adds of a
#   matmul with inner dimension L (SMALL_MAC_NS), written, squared and summed
#   (VECTOR_NS: memory-bound, page faults included).
# Measured (OMP_NUM_THREADS=1, 2 cores shared, load ~3): for SUM_SQUARED pairs win
# for L = 1 and L = 4 at every V (layer4's 3x3 convs: 1-3 ms against 73-1480 ms for
# V = 1-10), for L = 16 from V ~ 4 (layer2: 0.15-0.17x at V = 10, 5x slower at
# V = 1), never for L >= 36 with V <= 10 (3C3D's third conv: 1.5x slower at V = 10;
# the stem, L = 256: 65-365x slower). BATCH_SQUARED writes an [N, C_out, C_in K]
# result either way, so pairs win less (layer4 at V = 1: 0.7-0.9x). The estimates
# pick the faster form in all 96 measured cases but four where both take under
# 4 ms and differ by under 1.4x (the 1x1 projections, layer3's first conv at V = 1).
# Held out (not fitted on: `python -m experiments.conv_squares --shapes heldout`,
# a WideResNet-16-4 and a depthwise-separable MobileNet-style net, batch 32,
# SUM_SQUARED): 23 of the 24 timed cases (L <= 128) pick the faster form; the miss
# is a depthwise conv on 2x2 maps at V = 10 (16 vs 13 ms). The 20 cases with larger
# maps were not timed in the pair form (6-75 s per call) and take vectors.
MAC_NS = 1 / 30
SMALL_MAC_NS = 1 / 30
PASS_NS = 1.5
VECTOR_NS = 2.5


def num_pairs(length: int) -> int:
    """Number of location pairs ``l <= l'`` for ``length`` output locations."""
    return length * (length + 1) // 2


def pairs_cheaper(
    v: int, c_out: int, c_in_k: int, length: int, groups: int, batch: bool = False
) -> bool:
    """Whether the pair form is estimated faster than per-sample vectors.

    Args:
        v: Columns per sample.
        c_out: Output channels.
        c_in_k: Input channels times kernel size (all groups).
        length: Output locations ``L``.
        groups: Convolution groups ``G``.
        batch: Whether the per-sample result (``BATCH_SQUARED``) is requested.

    Returns:
        The comparison of the per-sample estimates of
        NOTE [When location pairs beat per-sample vectors].
    """
    pairs, square = num_pairs(length), length * length
    block = (c_out // groups) * (c_in_k // groups) * groups
    passes = 3 * pairs * c_in_k + square * c_out + 2 * pairs * c_out
    pair_ns = (
        pairs * block * MAC_NS
        + (passes + (block if batch else 0)) * PASS_NS
        + v * square * c_out * SMALL_MAC_NS
    )
    vector_ns = v * block * (VECTOR_NS + length * SMALL_MAC_NS)
    return pair_ns < vector_ns


def pair_bytes_per_sample(
    v: int, c_out: int, c_in_k: int, length: int, element_size: int
) -> int:
    """Bytes of the pair form's temporaries per sample.

    ``B`` and one gathered copy of the patches (``2 P C_in K``), ``A`` and its
    weighted copy (``2 P C_out``), the Gram (``L^2 C_out``) and the copy of the
    columns the Gram's batched matmul may make (``V L C_out``).
    """
    pairs = num_pairs(length)
    entries = 2 * pairs * (c_in_k + c_out) + (length + v) * length * c_out
    return entries * element_size


def squared_sums(
    patches: Tensor,
    cols: Tensor,
    groups: int,
    reductions: set[Reduction],
    budget: int,
) -> dict[Reduction, Tensor]:
    """``SUM_SQUARED`` and/or ``BATCH_SQUARED`` of the per-sample weight vectors.

    Samples are processed in chunks whose temporaries fit ``budget`` bytes.

    Args:
        patches: Unfolded inputs ``[N, C_in K, L]``.
        cols: Columns at the output ``[V, N, C_out, L]``.
        groups: Convolution groups ``G``.
        reductions: A non-empty subset of ``{SUM_SQUARED, BATCH_SQUARED}``.
        budget: Bytes the temporaries of one chunk may take.

    Returns:
        ``SUM_SQUARED -> [C_out, C_in K / G]`` and ``BATCH_SQUARED -> [N, C_out,
        C_in K / G]`` (the flattened weight's shape, with a leading batch axis).
    """
    n, c_in_k, length = patches.shape
    c_out = cols.shape[2]
    first, second = torch.triu_indices(length, length, device=patches.device)
    twice = torch.where(first == second, 1.0, 2.0).to(cols.dtype)
    per_sample = pair_bytes_per_sample(
        cols.shape[0], c_out, c_in_k, length, patches.element_size()
    )
    step = max(1, budget // max(per_sample, 1))
    shape = (c_out, c_in_k // groups)
    batch = (
        patches.new_empty(n, *shape) if Reduction.BATCH_SQUARED in reductions else None
    )
    total = patches.new_zeros(shape) if Reduction.SUM_SQUARED in reductions else None
    for start in range(0, n, step):
        stop = min(start + step, n)
        a = _column_pairs(cols[:, start:stop], first, second, twice)  # [n, P, C_out]
        b = _patch_pairs(patches[start:stop], first, second)  # [n, P, C_in K]
        a = a.reshape(*a.shape[:2], groups, -1)
        b = b.reshape(*b.shape[:2], groups, -1)
        if batch is not None:
            part = batch[start:stop].view(stop - start, groups, -1, shape[1])
            torch.matmul(a.permute(0, 2, 3, 1), b.permute(0, 2, 1, 3), out=part)
            if total is not None:
                total += batch[start:stop].sum(0)
        elif total is not None:
            a, b = a.flatten(0, 1), b.flatten(0, 1)  # [n P, G, *]
            total.view(groups, -1, shape[1]).baddbmm_(
                a.permute(1, 2, 0), b.permute(1, 0, 2)
            )
    result = {Reduction.SUM_SQUARED: total, Reduction.BATCH_SQUARED: batch}
    return {red: value for red, value in result.items() if value is not None}


def _column_pairs(cols: Tensor, first: Tensor, second: Tensor, twice: Tensor) -> Tensor:
    """``A``: the columns' Gram entries over ``v`` at the pairs, ``[n, P, C_out]``."""
    if cols.shape[-1] == 1:
        return cols.square().sum(0).transpose(1, 2)
    gram = torch.einsum("vnol,vnom->nlmo", cols, cols)
    return gram[:, first, second].mul_(twice[:, None])


def _patch_pairs(patches: Tensor, first: Tensor, second: Tensor) -> Tensor:
    """``B``: products of patch entries at the pairs, ``[n, P, C_in K]``."""
    rows = patches.transpose(1, 2)  # [n, L, C_in K]
    if rows.shape[1] == 1:
        return rows.square()
    return rows.index_select(1, first).mul_(rows.index_select(1, second))
