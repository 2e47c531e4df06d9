r"""Rows of per-sample Jacobians and the empirical NTK between them.

The linearized network :math:`f(x) \approx f(x; \theta_*) + J(x)(\theta -
\theta_*)` with the prior :math:`\theta \sim \mathcal N(\mu_0, \Sigma_0)` is a GP
over *rows*: a row is a pair (input :math:`x_n`, output :math:`c`) and the kernel
between two rows is the empirical neural tangent kernel

.. math::
    k\big((x, c), (x', c')\big) = J_c(x)\, \Sigma_0\, J_{c'}(x')^\top
    = \sum_b v_b\, J_{b,c}(x) J_{b,c'}(x')^\top

with :math:`\Sigma_0 = \operatorname{blockdiag}(v_b I)` (one prior variance
:math:`v_b = 1/\pi_b` per parameter tensor :math:`b`, or one for all).

Rows keep the Jacobian segments' factorization
(:mod:`bayescurv.laplace.sources.jacobians`): a linear layer's weight row is
:math:`a_n \otimes g_{n,c}` (layer input :math:`a_n`, output gradient
:math:`g_{n,c} = \partial f_c / \partial z_n`), so its kernel block is

.. math::
    (a_n^\top a_m)\,(g_{n,c}^\top g_{m,c'}),

an ``[R1, R2]`` tile for :math:`O(R_1 R_2 (\mathrm{in} + \mathrm{out}))` instead of
the :math:`O(R_1 R_2\, \mathrm{in}\cdot\mathrm{out})` of explicit rows (for the last
layer :math:`g_{n,c} = e_c`, a Kronecker delta). Other parameter tensors keep
explicit rows. No ``[N C, P]`` Jacobian is formed beyond what a source yields for a
chunk of samples.

Example:
    >>> import torch
    >>> from bayescurv.laplace.sources.jacobians import SegmentedJacobian
    >>> phi = torch.tensor([[1.0, 2.0], [0.0, 1.0]])  # last-layer features, N=2
    >>> jac = SegmentedJacobian.last_layer(phi, classes=2, has_bias=False)
    >>> rows = JacobianRows.all_rows(jac, [4])
    >>> ntk(rows, rows, torch.tensor([1.0]))  # (phi phi^T) kron I_2
    tensor([[5., 0., 2., 0.],
            [0., 5., 0., 2.],
            [2., 0., 1., 0.],
            [0., 2., 0., 1.]])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bayescurv.laplace.sources.jacobians import (
    DenseSegment,
    LinearSegment,
    Segment,
    SegmentedJacobian,
)


@dataclass(frozen=True)
class FactoredRows:
    r"""Rows :math:`a \otimes g` of a linear layer's weight, or :math:`g` of its bias.

    Attributes:
        inputs: :math:`a` ``[R, in]``; ``None`` for a bias.
        grads: :math:`g` ``[R, out]``; ``None`` for the identity (row :math:`e_c`).
        outputs: The output index :math:`c` of every row, ``[R]``.
        out_features: ``out``.
    """

    inputs: Tensor | None
    grads: Tensor | None
    outputs: Tensor
    out_features: int

    def tile(self, other: FactoredRows) -> Tensor:
        """The ``[R1, R2]`` Gram block of two row sets of the same tensor."""
        second = _grad_gram(self, other)
        if self.inputs is None:
            return second
        return (self.inputs @ other.inputs.mT).mul_(second)

    def squared_norms(self) -> Tensor:
        """Squared norms of the rows, ``[R]`` (bias rows of the identity: ones)."""
        if self.grads is None:
            grads = torch.ones_like(self.outputs, dtype=torch.bool)
        else:
            grads = self.grads.square().sum(-1)
        return grads if self.inputs is None else grads * self.inputs.square().sum(-1)

    def dense(self) -> Tensor:
        """The explicit rows ``[R, size]`` (row-major ``[out, in]`` for a weight)."""
        grads = self.grads
        if grads is None:
            grads = torch.nn.functional.one_hot(self.outputs, self.out_features)
            grads = grads if self.inputs is None else grads.to(self.inputs)
        if self.inputs is None:
            return grads
        return (grads[:, :, None] * self.inputs[:, None, :]).flatten(1)

    def matmul(self, matrix: Tensor) -> Tensor:
        r"""The rows times ``matrix`` ``[size, k]``, ``[R, k]`` (never expanded).

        For a weight, :math:`(a \otimes g)^\top m_k = g^\top M_k a` with
        :math:`M_k` the ``[out, in]`` reshape of column ``k``.
        """
        grads = self._grads_like(matrix)
        if self.inputs is None:
            return grads @ matrix
        blocks = matrix.reshape(self.out_features, self.inputs.shape[1], -1)
        moved = torch.einsum("ri,oik->rok", self.inputs.to(matrix), blocks)
        return torch.einsum("ro,rok->rk", grads, moved)

    def rmatmul(self, weights: Tensor) -> Tensor:
        """The rows' transpose times ``weights`` ``[R, k]``, ``[size, k]``."""
        grads = self._grads_like(weights)
        if self.inputs is None:
            return grads.mT @ weights
        inputs = self.inputs.to(weights)
        return torch.einsum("ro,ri,rk->oik", grads, inputs, weights).flatten(0, 1)

    def _grads_like(self, like: Tensor) -> Tensor:
        if self.grads is None:
            return torch.nn.functional.one_hot(self.outputs, self.out_features).to(like)
        return self.grads.to(like)

    def take(self, index: Tensor) -> FactoredRows:
        """The rows ``index``."""
        inputs = None if self.inputs is None else self.inputs[index]
        grads = None if self.grads is None else self.grads[index]
        return FactoredRows(inputs, grads, self.outputs[index], self.out_features)

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return sum(
            t.numel() * t.element_size()
            for t in (self.inputs, self.grads)
            if t is not None
        )


@dataclass(frozen=True)
class DenseRows:
    """Explicit Jacobian rows ``[R, size]`` of one parameter tensor."""

    rows: Tensor

    def tile(self, other: DenseRows) -> Tensor:  # noqa: D102
        return self.rows @ other.rows.mT

    def squared_norms(self) -> Tensor:  # noqa: D102
        return self.rows.square().sum(-1)

    def dense(self) -> Tensor:  # noqa: D102
        return self.rows

    def matmul(self, matrix: Tensor) -> Tensor:  # noqa: D102
        return self.rows.to(matrix) @ matrix

    def rmatmul(self, weights: Tensor) -> Tensor:  # noqa: D102
        return self.rows.to(weights).mT @ weights

    def take(self, index: Tensor) -> DenseRows:  # noqa: D102
        return DenseRows(self.rows[index])

    @property
    def nbytes(self) -> int:  # noqa: D102
        return self.rows.numel() * self.rows.element_size()


Part = FactoredRows | DenseRows


def _grad_gram(first: FactoredRows, second: FactoredRows) -> Tensor:
    r""":math:`g_i^\top g'_j` for two row sets, ``[R1, R2]``.

    Identity rows (:math:`g = e_c`) select entries instead of multiplying; two of
    them give the Kronecker delta of the outputs (a ``bool`` tensor, promoted by
    the prior variance).
    """
    if first.grads is None and second.grads is None:
        return first.outputs[:, None] == second.outputs[None, :]
    if first.grads is None:
        return second.grads[:, first.outputs].mT
    if second.grads is None:
        return first.grads[:, second.outputs]
    return first.grads @ second.grads.mT


@dataclass(frozen=True)
class JacobianRows:
    """Rows (sample, output) of per-sample Jacobians, one part per parameter tensor.

    Attributes:
        parts: Per parameter tensor, the rows factored or explicit.
        samples: The sample index of every row within its Jacobian chunk, ``[R]``.
        outputs: The output index of every row, ``[R]``.
    """

    parts: list[Part]
    samples: Tensor
    outputs: Tensor

    @classmethod
    def select(
        cls,
        jac: SegmentedJacobian,
        block_sizes: Sequence[int],
        samples: Tensor,
        outputs: Tensor,
    ) -> JacobianRows:
        """The rows ``(samples[i], outputs[i])`` of a chunk's Jacobian.

        Args:
            jac: Per-sample Jacobians ``[N, C, P]`` as segments.
            block_sizes: Entries per parameter tensor (the prior's blocks).
            samples: Sample indices ``[R]``.
            outputs: Output indices ``[R]``.
        """
        parts: list[Part] = []
        for segment in aligned_segments(jac, block_sizes):
            if isinstance(segment, LinearSegment):
                inputs = None if segment.inputs is None else segment.inputs[samples]
                grads = None
                if segment.grads is not None:
                    grads = segment.grads[samples, outputs]
                parts.append(FactoredRows(inputs, grads, outputs, segment.out_features))
            else:
                parts.append(DenseRows(segment.jacobian[samples, outputs]))
        return cls(parts, samples, outputs)

    @classmethod
    def all_rows(
        cls,
        jac: SegmentedJacobian,
        block_sizes: Sequence[int],
        output: int | None = None,
    ) -> JacobianRows:
        """Every row of a chunk, sample-major (``n C + c``), or output ``output``'s."""
        num, classes = jac.num_samples, jac.num_outputs
        device = _device(jac)
        samples = torch.arange(num, device=device)
        if output is not None:
            outputs = torch.full((num,), output, device=device)
            return cls.select(jac, block_sizes, samples, outputs)
        outputs = torch.arange(classes, device=device)
        return cls.select(
            jac,
            block_sizes,
            samples.repeat_interleave(classes),
            outputs.repeat(num),
        )

    def __len__(self) -> int:
        return self.outputs.shape[0]

    def take(self, index: Tensor) -> JacobianRows:
        """The rows ``index``."""
        return JacobianRows(
            [part.take(index) for part in self.parts],
            self.samples[index],
            self.outputs[index],
        )

    def matmul(self, matrix: Tensor, block_sizes: Sequence[int]) -> Tensor:
        """The rows times ``matrix`` ``[P, k]``, ``[R, k]``."""
        pieces = matrix.split(list(block_sizes))
        return sum(
            part.matmul(piece) for part, piece in zip(self.parts, pieces, strict=True)
        )

    def rmatmul(self, weights: Tensor, variances: Tensor) -> Tensor:
        r""":math:`\Sigma_0 J^\top W` for ``weights`` ``[R, k]``, ``[P, k]``."""
        return torch.cat(
            [
                v * part.rmatmul(weights)
                for v, part in zip(variances, self.parts, strict=True)
            ]
        )

    def of_output(self, output: int) -> JacobianRows:
        """The rows of one output."""
        return self.take(torch.nonzero(self.outputs == output).flatten())

    @property
    def nbytes(self) -> int:
        """Bytes held by the parts."""
        return sum(part.nbytes for part in self.parts)


def concat_rows(rows: Sequence[JacobianRows]) -> JacobianRows:
    """Several row sets of the same parameter tensors as one."""
    parts: list[Part] = []
    for pieces in zip(*[r.parts for r in rows], strict=True):
        first = pieces[0]
        if isinstance(first, DenseRows):
            parts.append(DenseRows(torch.cat([p.rows for p in pieces])))
            continue
        inputs = None if first.inputs is None else torch.cat([p.inputs for p in pieces])
        grads = None if first.grads is None else torch.cat([p.grads for p in pieces])
        outputs = torch.cat([p.outputs for p in pieces])
        parts.append(FactoredRows(inputs, grads, outputs, first.out_features))
    samples = torch.cat([r.samples for r in rows])
    return JacobianRows(parts, samples, torch.cat([r.outputs for r in rows]))


def aligned_segments(
    jac: SegmentedJacobian, block_sizes: Sequence[int]
) -> list[Segment]:
    """The Jacobian's segments, one per parameter tensor.

    A source whose segments do not follow the parameter tensors (e.g. one explicit
    Jacobian of the whole subset) is split into explicit segments per tensor.
    """
    sizes = [segment.size for segment in jac.segments]
    if sizes == list(block_sizes):
        return list(jac.segments)
    dense = jac.dense()
    return [DenseSegment(part) for part in dense.split(list(block_sizes), dim=-1)]


def ntk(
    first: JacobianRows,
    second: JacobianRows,
    variances: Tensor,
    independent: bool = False,
) -> Tensor:
    r"""The kernel :math:`\sum_b v_b J_b J_b'^\top` between two row sets, ``[R1, R2]``.

    Args:
        first: Rows ``R1``.
        second: Rows ``R2`` (same parameter tensors).
        variances: :math:`v_b`, ``[B]`` (one per parameter tensor).
        independent: Zero the kernel between different outputs (independent GPs
            per output, laplace-torch's ``independent_outputs``).
    """
    total = None
    for variance, mine, theirs in zip(
        variances, first.parts, second.parts, strict=True
    ):
        if type(mine) is not type(theirs):  # e.g. given explicit Jacobians
            dtype = variances.dtype
            tile = mine.dense().to(dtype) @ theirs.dense().to(dtype).mT
        else:
            tile = mine.tile(theirs)
        tile = tile * variance
        total = tile if total is None else total.add_(tile)
    if independent:
        total = total * (first.outputs[:, None] == second.outputs[None, :])
    return total


def ntk_diagonal(rows: JacobianRows, variances: Tensor) -> Tensor:
    """The kernel's diagonal on a row set, ``[R]``."""
    return sum(
        v * part.squared_norms() for v, part in zip(variances, rows.parts, strict=True)
    )


def point_blocks(
    jac: SegmentedJacobian,
    block_sizes: Sequence[int],
    variances: Tensor,
    diagonal: bool = False,
) -> Tensor:
    r"""The kernel's ``[C, C]`` block of every sample, :math:`J_n \Sigma_0 J_n^\top`.

    Args:
        jac: Per-sample Jacobians of a chunk.
        block_sizes: Entries per parameter tensor.
        variances: :math:`v_b`, ``[B]``.
        diagonal: Only the diagonal ``[N, C]``.

    Returns:
        ``[N, C, C]`` (or ``[N, C]``).
    """
    total = None
    for segment, size, variance in zip(
        aligned_segments(jac, block_sizes), block_sizes, variances, strict=True
    ):
        part = segment.gram(variance.expand(size), diagonal)
        total = part if total is None else total + part
    return total


def jacobian_like(jac: SegmentedJacobian) -> Tensor:
    """A tensor of the Jacobian's segments (their dtype and device)."""
    for segment in jac.segments:
        for name in ("jacobian", "inputs", "grads", "like"):
            tensor = getattr(segment, name, None)
            if tensor is not None:
                return tensor
    return torch.empty(0)


def _device(jac: SegmentedJacobian) -> torch.device:
    return jacobian_like(jac).device
