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
  per sample and output instead of the explicit matrix's memory;
* :class:`DenseSegment`: any other parameter tensor, an explicit ``[N, C, n]``.

:class:`SegmentedJacobian` offers what the functional variance needs
(:mod:`bayescurv.laplace.predict.variance`): products :math:`J M` with the rows of a
parameter block, :math:`J \operatorname{diag}(w) J^\top`, and the explicit matrix
as a fallback.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor


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


@dataclass
class LinearSegment:
    r"""A linear layer's weight (:math:`G_n \otimes a_n^\top`) or bias (:math:`G_n`).

    Attributes:
        inputs: :math:`a` ``[N, in]`` for a weight, ``None`` for a bias.
        grads: :math:`G` ``[N, C, out]``, or ``None`` for the identity (``C = out``).
        out_features: ``out``.
        num_samples: ``N``.
        like: A tensor with the dtype and device of an identity segment's ``dense``.

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

    @property
    def size(self) -> int:
        """Entries of the parameter tensor."""
        width = 1 if self.inputs is None else self.inputs.shape[1]
        return self.out_features * width

    def matmul(self, matrix: Tensor) -> Tensor:
        r""":math:`J_n M` for ``M: [size, r]``, ``[N, C, r]``."""
        if self.inputs is None:
            product = matrix.expand(self.num_samples, *matrix.shape)
        else:
            rows = matrix.reshape(self.out_features, self.inputs.shape[1], -1)
            product = torch.einsum("ni,oir->nor", self.inputs, rows)
        return product if self.grads is None else self.grads @ product

    def gram(self, weights: Tensor, diagonal: bool) -> Tensor:
        r""":math:`J_n \operatorname{diag}(w) J_n^\top` for ``w: [size]``."""
        return sandwich(self.grads, self._output_weights(weights), diagonal)

    def _output_weights(self, weights: Tensor) -> Tensor:
        r""":math:`u_{n,o} = \sum_i a_{n,i}^2 w_{o,i}` (bias: ``w_o``), ``[N, out]``."""
        if self.inputs is None:
            return weights.expand(self.num_samples, -1)
        return self.inputs.square() @ weights.reshape(self.out_features, -1).mT

    def kron_inverse(
        self, bases: tuple[Tensor, ...], inverse: Tensor, diagonal: bool
    ) -> Tensor:
        r""":math:`J_n Q \operatorname{diag}(1/e) Q^\top J_n^\top`, :math:`Q` Kronecker.

        With :math:`Q = Q_B \otimes Q_A` (weight) or :math:`Q_B` (bias),
        :math:`J_n Q = (G_n Q_B) \otimes (Q_A^\top a_n)^\top`, so the result is
        :math:`\tilde G_n \operatorname{diag}(v_n) \tilde G_n^\top` with
        :math:`\tilde G_n = G_n Q_B` and :math:`v_{n,o} = \sum_i (Q_A^\top
        a_n)_i^2 / e_{o,i}`.

        Args:
            bases: ``(Q_B, Q_A)`` for a weight, ``(Q_B,)`` for a bias.
            inverse: :math:`1/e`, ``[size]`` (row-major over ``[out, in]``).
            diagonal: Return the diagonal only.
        """
        if self.inputs is None:
            v = inverse.expand(self.num_samples, -1)
        else:
            rotated = self.inputs @ bases[1]
            v = rotated.square() @ inverse.reshape(self.out_features, -1).mT
        grads = bases[0] if self.grads is None else self.grads @ bases[0]
        return sandwich(grads, v, diagonal)

    def dense(self) -> Tensor:
        """The explicit Jacobian ``[N, C, size]``."""
        grads = self.grads
        if grads is None:
            eye = torch.eye(self.out_features, dtype=self._dtype, device=self._device)
            grads = eye.expand(self.num_samples, -1, -1)
        if self.inputs is None:
            return grads
        outer = grads[..., :, None] * self.inputs[:, None, None, :]
        return outer.flatten(start_dim=2)

    def to(self, dtype: torch.dtype) -> LinearSegment:
        """The segment with its tensors in ``dtype``."""
        cast = [None if t is None else t.to(dtype) for t in (self.inputs, self.grads)]
        like = None if self.like is None else self.like.to(dtype)
        return LinearSegment(*cast, self.out_features, self.num_samples, like)

    def rows(self, start: int, stop: int) -> LinearSegment:
        """The segment of samples ``start:stop``."""
        inputs = None if self.inputs is None else self.inputs[start:stop]
        grads = None if self.grads is None else self.grads[start:stop]
        count = len(range(start, min(stop, self.num_samples)))
        return LinearSegment(inputs, grads, self.out_features, count, self.like)

    @property
    def num_outputs(self) -> int:
        """``C``."""
        return self.out_features if self.grads is None else self.grads.shape[-2]

    @property
    def _reference(self) -> Tensor:
        for tensor in (self.inputs, self.grads, self.like):
            if tensor is not None:
                return tensor
        return torch.empty(0)

    @property
    def _dtype(self) -> torch.dtype:
        return self._reference.dtype

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

    def matmul(self, matrix: Tensor) -> Tensor:  # noqa: D102
        return self.jacobian @ matrix

    def gram(self, weights: Tensor, diagonal: bool) -> Tensor:  # noqa: D102
        scaled = self.jacobian * weights
        if diagonal:
            return (scaled * self.jacobian).sum(-1)
        return scaled @ self.jacobian.mT

    def dense(self) -> Tensor:  # noqa: D102
        return self.jacobian

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
