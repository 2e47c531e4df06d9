r"""Per-sample Jacobians as segments, factored for linear layers.

The Jacobian :math:`J_n \in \mathbb{R}^{C \times P}` of sample ``n``'s output w.r.t.
the subset is a concatenation of *segments*, one per parameter tensor, in the
subset's parameter order:

* :class:`LinearSegment`: the weight or bias of an ``nn.Linear`` layer called once on
  ``[N, in]`` inputs :math:`a_n`. With :math:`G_n = \partial f_n / \partial z_n \in
  \mathbb{R}^{C \times \mathrm{out}}` (the output's Jacobian w.r.t. the layer output
  :math:`z_n = W a_n + b`) the row-major weight's Jacobian is :math:`G_n \otimes
  a_n^\top` and the bias's is :math:`G_n`; for the last layer :math:`G_n = I`. It
  is never formed: products with it cost :math:`O(\mathrm{out} \cdot \mathrm{in})`
  per sample and output instead of the explicit matrix's memory. A layer applied at
  ``T`` positions (a sequence, a convolution's unfolded patches) has the sum
  :math:`\sum_t G_{n,t} \otimes a_{n,t}^\top` (``inputs [N, T, in]``, ``grads
  [N, C, T, out]``);
* :class:`DenseSegment`: any other parameter tensor, an explicit ``[N, C, n]``.

:class:`SegmentedJacobian` offers what the functional variance needs
(:mod:`bayescurv.laplace.predict.variance`): products :math:`J M` with the rows of a
parameter block, :math:`J \operatorname{diag}(w) J^\top`, and the explicit matrix
as a fallback.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from bayescurv.curvature.rotation import Rotation


def sandwich(grads: Tensor | None, weights: Tensor, diagonal: bool) -> Tensor:
    r""":math:`G_n \operatorname{diag}(u_n) G_n^\top` per sample.

    Args:
        grads: :math:`G` ``[N, C, m]``, ``[C, m]`` (shared), or ``None`` for the
            identity.
        weights: :math:`u` ``[N, m]``.
        diagonal: Return the diagonal only.

    Returns:
        ``[N, C, C]``, or ``[N, C]`` if ``diagonal``.
    """
    if grads is None:
        return weights if diagonal else torch.diag_embed(weights)
    if diagonal:
        return (grads.square() * weights[:, None, :]).sum(-1)
    return (grads * weights[:, None, :]) @ grads.mT


# NOTE [Kronecker variance of a layer applied at T positions]
# With rotated inputs b_t = Q_A^T a_t [in], rotated columns h_{c,t} = Q_B^T G_{c,t}
# [out] and 1/e as w [out, in], J_c Q = sum_t h_{c,t} b_t^T, so
#   (J Sigma J^T)_{cd} = sum_{o,i} w_{oi} (sum_t h_{cto} b_{ti}) (sum_s h_{dso} b_{si}).
# Forming the [C, out, in] rotated rows costs C T out in per sample (C^2 out in more
# for the covariances, C out in for the variances only); pairing positions first,
# K_{tso} = sum_i b_{ti} b_{si} w_{oi}, costs T (T + 1) / 2 out in (K is symmetric
# in t, s: one product per offset s - t fills both triangles) + C T^2 out (C^2 T out
# for the covariances). The rows are memory-bound: writing, squaring and reading
# them costs ~1-3 ns per entry on one CPU core whatever T (1 ns for 288 x 32 rows
# per column, 3 ns for 1,152 x 128: the larger ones leave the cache), while the
# pairs' products run at ~0.03-0.06 ns per multiply-add. _contraction_costs counts a
# rows entry as ROWS_ENTRY_COST * sqrt(out in) multiply-adds. That picks the faster
# order in 31-32 of the 34 cases it was chosen on (two runs; T 4-64, in x out
# 288 x 32 to 2,304 x 256, C 10 and 100) and in 17 of the 18 held-out ones (a
# WideResNet-16-4, VGG-style 4x4 and 2x2 maps, attention and MLP blocks at 8-128
# tokens); the misses cost at most 1.5x
# (`python -m experiments.kron_contractions [--shapes heldout]`). So pairs for few
# positions (a ResNet's last stages), rows for long sequences.
# Rotating the summed rows instead, Q_B^T (sum_t G_{c,t} a_t^T) Q_A (C (out^2 in +
# out in^2) per sample), is chosen only where it is cheaper than rotating the T
# inputs and columns (T (in^2 + C out^2)): LoRA's rank-8 side on 32-token
# sequences, not a convolution's patches. A diagonal posterior is the same
# contraction without rotations (w = its inverse entries).
#
# NOTE [Positional contractions in the model's dtype]
# Only the rotations mix coordinates with different eigenvalues: a float32 rotation
# puts round-off of the size eps32 |a| into coordinates whose true value is ~0 (a
# test input inside the span of the training inputs), where w = 1/delta amplifies
# it. So the rotations run in the precision's dtype (float64), and what follows runs
# in the model's: every entry of the rows (or pairs) combines one coordinate (o, i)
# of b and h across positions, so its float32 error is relative to the entry itself,
# as the model's own float32 gradients are, and the variances are sums of
# nonnegative terms. For a ResNet-18's first stage (T = 64, C = 10) the float64
# rows were 70% of the predictive's contraction (a batched product with T = 64 as
# its inner size runs at a third of the float32 speed). Chunks of samples keep the
# temporaries under CHUNK_BYTES, memory the allocator reuses between chunks.
CHUNK_BYTES = 1 << 23
"""Bytes of a positional contraction's temporaries per chunk of samples."""


def positional_kron_inverse(
    rotated_inputs: Tensor, rotated_grads: Tensor, weights: Tensor, diagonal: bool
) -> Tensor:
    r""":math:`J_n \Sigma J_n^\top` for :math:`J_n = \sum_t G_{nt} \otimes a_{nt}^\top`.

    Args:
        rotated_inputs: :math:`Q_A^\top a` as ``[N, T, in]``.
        rotated_grads: :math:`G Q_B` as ``[N, C, T, out]``.
        weights: The inverse eigenvalues ``[out, in]``.
        diagonal: Return the diagonal only.

    Returns:
        ``[N, C, C]``, or ``[N, C]`` if ``diagonal``.
    """
    _, positions, width = rotated_inputs.shape
    classes, out = rotated_grads.shape[1], rotated_grads.shape[3]
    pairs, rows = _contraction_costs(positions, classes, out, width, diagonal)
    if pairs < rows:
        contract = _paired
        temporary = positions * (positions * out + width + out)
    else:
        contract, temporary = _rows, classes * out * width
    temporary = (temporary + classes * positions * out) * weights.element_size()
    step = max(1, CHUNK_BYTES // max(temporary, 1))
    parts = [
        contract(
            rotated_inputs[i : i + step], rotated_grads[i : i + step], weights, diagonal
        )
        for i in range(0, max(len(rotated_inputs), 1), step)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _paired(inputs: Tensor, grads: Tensor, weights: Tensor, diagonal: bool) -> Tensor:
    """The contraction through position pairs (see the NOTE)."""
    num, positions, _ = inputs.shape
    pairs = inputs.new_empty(num, positions, positions, weights.shape[0])
    for offset in range(positions):  # K[t, t + offset] = K[t + offset, t]
        block = (inputs[:, : positions - offset] * inputs[:, offset:]) @ weights.mT
        for side in {offset, -offset}:  # [N, out, T - offset] views of K
            pairs.diagonal(side, dim1=1, dim2=2).copy_(block.mT)
    paired = torch.einsum("ncto,ntso->ncso", grads, pairs)
    if diagonal:
        return (paired * grads).sum((-2, -1))
    return paired.flatten(2) @ grads.flatten(2).mT


def _rows(inputs: Tensor, grads: Tensor, weights: Tensor, diagonal: bool) -> Tensor:
    """The contraction through the rotated rows (see the NOTE)."""
    rows = torch.einsum("ncto,nti->ncoi", grads, inputs)
    if diagonal:
        return rows.square_().flatten(2) @ weights.flatten()
    return (rows * weights).flatten(2) @ rows.flatten(2).mT


ROWS_ENTRY_COST = 0.17
"""Multiply-adds a rows entry costs per ``sqrt(out in)`` (see the NOTE)."""


def _contraction_costs(
    positions: int, classes: int, out: int, width: int, diagonal: bool
) -> tuple[float, float]:
    """Multiply-add equivalents per sample of the pairs and the rows (see the NOTE)."""
    pairs = positions * (positions + 1) // 2 * width * out
    pairs += classes * positions * positions * out
    entries = classes * out * width
    rows = entries * ROWS_ENTRY_COST * math.sqrt(out * width)
    if not diagonal:  # the covariances' products; the rows are written twice
        pairs += classes * classes * positions * out
        rows = 2 * rows + classes * entries
    return pairs, rows


@dataclass
class LinearSegment:
    r"""A linear layer's weight (:math:`G_n \otimes a_n^\top`) or bias (:math:`G_n`).

    A layer applied at ``T`` positions (``inputs [N, T, in]``, ``grads [N, C, T,
    out]``) has the weight Jacobian :math:`\sum_t G_{n,t} \otimes a_{n,t}^\top`.

    Attributes:
        inputs: :math:`a` ``[N, in]`` (or ``[N, T, in]``) for a weight, ``None``
            for a bias.
        grads: :math:`G` ``[N, C, out]`` (or ``[N, C, T, out]``), or ``None`` for
            the identity (``C = out``).
        out_features: ``out``.
        num_samples: ``N``.
        like: A tensor with the dtype and device of an identity segment's ``dense``.
        model_dtype: The dtype the Jacobian was computed in, before :meth:`to` cast
            it up (``None``: its own).

    Example:
        >>> import torch
        >>> a, g = torch.tensor([[1.0, 2.0]]), torch.tensor([[[3.0]]])  # N=C=out=1
        >>> LinearSegment(a, g, 1, 1).dense()  # G kron a^T
        tensor([[[3., 6.]]])
    """

    inputs: Tensor | None
    grads: Tensor | None
    out_features: int
    num_samples: int
    like: Tensor | None = None
    model_dtype: torch.dtype | None = None

    @property
    def size(self) -> int:
        """Entries of the parameter tensor."""
        width = 1 if self.inputs is None else self.inputs.shape[-1]
        return self.out_features * width

    @property
    def positional(self) -> bool:
        """Whether the weight's Jacobian is a sum over ``T`` positions."""
        return self.inputs is not None and self.inputs.dim() == 3

    def matmul(self, matrix: Tensor) -> Tensor:
        r""":math:`J_n M` for ``M: [size, r]``, ``[N, C, r]``."""
        if self.positional:
            return self.dense() @ matrix
        if self.inputs is None:
            product = matrix.expand(self.num_samples, *matrix.shape)
        else:
            rows = matrix.reshape(self.out_features, self.inputs.shape[1], -1)
            product = torch.einsum("ni,oir->nor", self.inputs, rows)
        return product if self.grads is None else self.grads @ product

    def gram(self, weights: Tensor, diagonal: bool) -> Tensor:
        r""":math:`J_n \operatorname{diag}(w) J_n^\top` for ``w: [size]``."""
        if self.positional:  # the Kronecker form with identity rotations
            grid = weights.reshape(self.out_features, -1)
            return positional_kron_inverse(self.inputs, self.grads, grid, diagonal)
        return sandwich(self.grads, self._output_weights(weights), diagonal)

    def _output_weights(self, weights: Tensor) -> Tensor:
        r""":math:`u_{n,o} = \sum_i a_{n,i}^2 w_{o,i}` (bias: ``w_o``), ``[N, out]``."""
        if self.inputs is None:
            return weights.expand(self.num_samples, -1)
        return self.inputs.square() @ weights.reshape(self.out_features, -1).mT

    def kron_inverse(
        self, rotations: tuple[Rotation, ...], inverse: Tensor, diagonal: bool
    ) -> Tensor:
        r""":math:`J_n Q \operatorname{diag}(1/e) Q^\top J_n^\top`, :math:`Q` Kronecker.

        With :math:`Q = Q_B \otimes Q_A` (weight) or :math:`Q_B` (bias),
        :math:`J_n Q = (G_n Q_B) \otimes (Q_A^\top a_n)^\top`, so the result is
        :math:`\tilde G_n \operatorname{diag}(v_n) \tilde G_n^\top` with
        :math:`\tilde G_n = G_n Q_B` and :math:`v_{n,o} = \sum_i (Q_A^\top
        a_n)_i^2 / e_{o,i}`. At ``T`` positions see :func:`positional_kron_inverse`.

        Args:
            rotations: ``(Q_B, Q_A)`` for a weight, ``(Q_B,)`` for a bias, as
                :class:`~bayescurv.curvature.rotation.Rotation`.
            inverse: :math:`1/e`, ``[size]`` (row-major over ``[out, in]``).
            diagonal: Return the diagonal only.
        """
        if self.positional:
            grid = inverse.reshape(self.out_features, -1)
            if self._rotate_rows(diagonal):  # NOTE [Kronecker variance ... positions]
                rows = torch.einsum("ncto,nti->ncoi", self.grads, self.inputs)
                # Q_B^T M Q_A
                rotated = rotations[0].apply(rotations[1].apply(rows).mT).mT
                scaled = rotated * grid
                if diagonal:
                    return (scaled * rotated).sum((-2, -1))
                return scaled.flatten(2) @ rotated.flatten(2).mT
            low = self.contraction_dtype  # NOTE [Positional contractions in the ...]
            return positional_kron_inverse(
                rotations[1].apply(self.inputs).to(low),
                rotations[0].apply(self.grads).to(low),
                grid.to(low),
                diagonal,
            )
        if self.inputs is None:
            v = inverse.expand(self.num_samples, -1)
        else:
            rotated = rotations[1].apply(self.inputs)
            v = rotated.square() @ inverse.reshape(self.out_features, -1).mT
        grads = rotations[0].matrix
        if self.grads is not None:
            grads = rotations[0].apply(self.grads)
        return sandwich(grads, v, diagonal)

    def bytes_per_sample(self) -> tuple[int, int]:
        """Bytes per sample: held, and its float64 copy with its form's temporary.

        The variance casts one block's segments at a time
        (:meth:`SegmentedJacobian.block`), so one segment's copy is alive at a time.
        Rotated summed rows are ``[C, out, in]`` per sample (twice); the positional
        contraction after rotated inputs and columns holds their rotated copies and
        runs in chunks of at most ``CHUNK_BYTES`` whatever the number of samples.
        """
        held = sum(t[0].numel() for t in (self.inputs, self.grads) if t is not None)
        temporary = 0
        if self.positional:
            if self._rotate_rows(diagonal=False) or self._rotate_rows(diagonal=True):
                temporary = 2 * self.num_outputs * self.size
            else:
                temporary = held
        return held * self.dtype.itemsize, 8 * (held + temporary)

    def _rotate_rows(self, diagonal: bool) -> bool:
        """Whether rotating the summed rows beats rotating inputs and columns."""
        positions, classes = self.inputs.shape[1], self.num_outputs
        out, width = self.out_features, self.inputs.shape[2]
        rows = classes * out * width
        pairing = 1 if diagonal else classes
        factors = positions * (width * width + classes * out * out)
        factors += min(_contraction_costs(positions, classes, out, width, diagonal))
        return positions * rows + rows * (out + width + pairing) < factors

    def dense(self) -> Tensor:
        """The explicit Jacobian ``[N, C, size]``."""
        grads = self.grads
        if grads is None:
            eye = torch.eye(self.out_features, dtype=self.dtype, device=self._device)
            grads = eye.expand(self.num_samples, -1, -1)
        if self.inputs is None:
            return grads
        if self.positional:
            return torch.einsum("ncto,nti->ncoi", grads, self.inputs).flatten(2)
        outer = grads[..., :, None] * self.inputs[:, None, None, :]
        return outer.flatten(start_dim=2)

    def to(self, dtype: torch.dtype) -> LinearSegment:
        """The segment with its tensors in ``dtype``."""
        cast = [  # contiguous: the rotations then view them as [-1, k], no 2nd copy
            None if t is None else t.to(dtype, memory_format=torch.contiguous_format)
            for t in (self.inputs, self.grads)
        ]
        like = None if self.like is None else self.like.to(dtype)
        return LinearSegment(
            *cast, self.out_features, self.num_samples, like, self.contraction_dtype
        )

    def rows(self, start: int, stop: int) -> LinearSegment:
        """The segment of samples ``start:stop``."""
        inputs = None if self.inputs is None else self.inputs[start:stop]
        grads = None if self.grads is None else self.grads[start:stop]
        count = len(range(start, min(stop, self.num_samples)))
        return LinearSegment(
            inputs, grads, self.out_features, count, self.like, self.model_dtype
        )

    @property
    def num_outputs(self) -> int:
        """``C``."""
        if self.grads is None:
            return self.out_features
        return self.grads.shape[1]

    @property
    def _reference(self) -> Tensor:
        for tensor in (self.inputs, self.grads, self.like):
            if tensor is not None:
                return tensor
        return torch.empty(0)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the segment's tensors."""
        return self._reference.dtype

    @property
    def contraction_dtype(self) -> torch.dtype:
        """The model's dtype (NOTE [Positional contractions in the model's dtype])."""
        return self.model_dtype or self.dtype

    @property
    def _device(self) -> torch.device:
        return self._reference.device


@dataclass
class DenseSegment:
    """An explicit Jacobian segment ``[N, C, n]``."""

    jacobian: Tensor

    @property
    def size(self) -> int:  # noqa: D102
        return self.jacobian.shape[-1]

    @property
    def num_outputs(self) -> int:  # noqa: D102
        return self.jacobian.shape[-2]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the Jacobian."""
        return self.jacobian.dtype

    def matmul(self, matrix: Tensor) -> Tensor:  # noqa: D102
        return self.jacobian @ matrix

    def gram(self, weights: Tensor, diagonal: bool) -> Tensor:  # noqa: D102
        scaled = self.jacobian * weights
        if diagonal:
            return (scaled * self.jacobian).sum(-1)
        return scaled @ self.jacobian.mT

    def dense(self) -> Tensor:  # noqa: D102
        return self.jacobian

    def bytes_per_sample(self) -> tuple[int, int]:  # noqa: D102
        entries = self.jacobian[0].numel()
        return entries * self.jacobian.element_size(), 8 * entries

    def to(self, dtype: torch.dtype) -> DenseSegment:  # noqa: D102
        return DenseSegment(self.jacobian.to(dtype))

    def rows(self, start: int, stop: int) -> DenseSegment:  # noqa: D102
        return DenseSegment(self.jacobian[start:stop])


Segment = LinearSegment | DenseSegment


class SegmentedJacobian:
    """Per-sample Jacobians ``[N, C, P]`` as segments in parameter order.

    Args:
        segments: The segments; their sizes sum to ``P``.
        num_samples: ``N``.

    Example:
        >>> import torch
        >>> phi = torch.tensor([[1.0, 2.0]])
        >>> jac = SegmentedJacobian.last_layer(phi, classes=2, has_bias=True)
        >>> jac.dense()  # [I_2 kron phi^T, I_2]
        tensor([[[1., 2., 0., 0., 1., 0.],
                 [0., 0., 1., 2., 0., 1.]]])
        >>> jac.gram(slice(0, 6), torch.ones(6), diagonal=True)  # |phi|^2 + 1
        tensor([[6., 6.]])
    """

    def __init__(self, segments: list[Segment], num_samples: int) -> None:
        self.segments = segments
        self.num_samples = num_samples
        self.bounds = [0, *itertools.accumulate(s.size for s in segments)]

    @classmethod
    def last_layer(
        cls, features: Tensor, classes: int, has_bias: bool
    ) -> SegmentedJacobian:
        r"""The last layer's :math:`[I_C \otimes \phi_n^\top, I_C]`."""
        num = features.shape[0]
        segments: list[Segment] = [LinearSegment(features, None, classes, num)]
        if has_bias:
            segments.append(LinearSegment(None, None, classes, num, features))
        return cls(segments, num)

    @property
    def num_params(self) -> int:
        """``P``."""
        return self.bounds[-1]

    @property
    def num_outputs(self) -> int:
        """``C``."""
        return self.segments[0].num_outputs

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the Jacobians."""
        return self.segments[0].dtype

    def parts(self, block: slice) -> list[tuple[Segment, slice]] | None:
        """The segments of a block with their rows in it, ``None`` if it splits one."""
        if block.start not in self.bounds or block.stop not in self.bounds:
            return None
        first, last = self.bounds.index(block.start), self.bounds.index(block.stop)
        return [
            (self.segments[i], slice(a - block.start, b - block.start))
            for i, (a, b) in enumerate(itertools.pairwise(self.bounds))
            if first <= i < last
        ]

    def single(self, block: slice) -> Segment | None:
        """The segment that is exactly ``block``, if any."""
        parts = self.parts(block)
        return parts[0][0] if parts is not None and len(parts) == 1 else None

    def is_dense(self, block: slice) -> bool:
        """Whether every segment of the block is explicit (or the block splits one)."""
        parts = self.parts(block)
        return parts is None or all(isinstance(s, DenseSegment) for s, _ in parts)

    def matmul(self, block: slice, matrix: Tensor) -> Tensor | None:
        r""":math:`J_n M` for the rows ``M: [n, r]`` of a block, ``[N, C, r]``."""
        parts = self.parts(block)
        if parts is None:
            return None
        total = None
        for segment, rows in parts:
            product = segment.matmul(matrix[rows])
            if total is None:
                total = product
            elif total.is_contiguous() and total.shape == product.shape:
                total = total.add_(product)  # no [N, C, r] copy per segment
            else:  # an expanded first product
                total = total + product
        return total

    def gram(self, block: slice, weights: Tensor, diagonal: bool) -> Tensor | None:
        r""":math:`J_n \operatorname{diag}(w) J_n^\top` over a block (``w: [n]``)."""
        parts = self.parts(block)
        if parts is None:
            return None
        return sum(segment.gram(weights[rows], diagonal) for segment, rows in parts)

    def dense(self, block: slice = slice(None)) -> Tensor:
        """The explicit Jacobian ``[N, C, P]``, restricted to a block."""
        parts = self.parts(block) if block != slice(None) else None
        if parts is not None:
            return torch.cat([segment.dense() for segment, _ in parts], dim=2)
        return torch.cat([segment.dense() for segment in self.segments], dim=2)[
            ..., block
        ]

    def bytes_per_sample(self) -> int:
        """Bytes a sample's segments hold, plus one segment's largest temporary.

        The temporary is a segment's float64 copy with its form's (see
        :meth:`block`).
        """
        sizes = [segment.bytes_per_sample() for segment in self.segments]
        return sum(held for held, _ in sizes) + max(temp for _, temp in sizes)

    def block(
        self, block: slice, dtype: torch.dtype | None = None
    ) -> tuple[SegmentedJacobian, slice]:
        """The segments a block of rows touches, in ``dtype``, and the block in them.

        The functional variance casts one block's segments at a time, so the
        float64 copies of a chunk never coexist (a ResNet-18's Kronecker predictive
        took 16 instead of 32 test images per chunk when they did).
        """
        first = bisect.bisect_right(self.bounds, block.start) - 1
        last = max(bisect.bisect_left(self.bounds, block.stop), first + 1)
        segments = self.segments[first:last]
        if dtype is not None:
            segments = [segment.to(dtype) for segment in segments]
        offset = self.bounds[first]
        local = slice(block.start - offset, block.stop - offset)
        return SegmentedJacobian(segments, self.num_samples), local

    def to(self, dtype: torch.dtype) -> SegmentedJacobian:
        """The Jacobian with every segment in ``dtype`` (e.g. the precision's)."""
        segments = [segment.to(dtype) for segment in self.segments]
        return SegmentedJacobian(segments, self.num_samples)

    def rows(self, start: int, stop: int) -> SegmentedJacobian:
        """The Jacobian of samples ``start:stop``."""
        segments = [segment.rows(start, stop) for segment in self.segments]
        return SegmentedJacobian(
            segments, len(range(start, min(stop, self.num_samples)))
        )

    def per_position(self, classes: int) -> SegmentedJacobian:
        """Outputs ``[C, *T]`` per sample as ``T`` samples of ``C`` outputs each.

        For a classification per position (e.g. segmentation) the predictive needs
        the ``[C, C]`` covariance of every position, not the ``[C T, C T]`` one.

        Args:
            classes: ``C``; the outputs per sample are ``C T`` in row-major order.

        Returns:
            Explicit segments of ``N T`` samples with ``C`` outputs, sample-major
            (sample ``n``, position ``t`` is row ``n T + t``).
        """
        segments: list[Segment] = []
        for segment in self.segments:
            dense = segment.dense()  # [N, C T, p]
            num, _, size = dense.shape
            per = dense.reshape(num, classes, -1, size).transpose(1, 2)
            segments.append(DenseSegment(per.reshape(-1, classes, size)))
        positions = self.num_outputs // classes
        return SegmentedJacobian(segments, self.num_samples * positions)
