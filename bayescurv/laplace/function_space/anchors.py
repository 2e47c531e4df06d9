r"""Anchor rows: the training subset, landmarks or inducing points a posterior keeps.

Every function-space posterior is expressed through the kernel between a query and
a fixed set of *anchor* rows (all subset rows for the exact GP, landmark rows for
Nyström, inducing rows for the variational GP). :class:`AnchorRows` holds their
Jacobian rows, one chunk per chunk of points the source yields; the chunks are kept
while they fit in the memory budget and recomputed on every use otherwise, so the
memory stays bounded for any number of anchors (at the price of one Jacobian pass
over the anchors per kernel evaluation).

# NOTE [Recomputed anchors]
# Keeping the rows costs R x (in + out) per linear layer when factored but R x p for
# explicit parts (e.g. convolutions); over the budget, the chunks are recomputed from
# the stored inputs instead, as laplace-torch recomputes the training Jacobians for
# every kernel block. The stored inputs are the only per-anchor memory then.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from bayescurv.laplace.function_space.inputs import length
from bayescurv.laplace.function_space.rows import JacobianRows, ntk
from bayescurv.laplace.sources import CurvatureSource


class AnchorRows:
    """Jacobian rows of a fixed set of points (every output of each).

    Args:
        source: The subset's curvature source (its Jacobians).
        inputs: The anchor points' inputs (tensor, tuple or dict).
        block_sizes: Entries per parameter tensor.
        memory_budget: Bytes the kept rows may take.

    Attributes:
        outputs: The network outputs at the anchors, ``[M, C]`` (detached).
        num_points: ``M``.
    """

    def __init__(
        self,
        source: CurvatureSource,
        inputs: Any,
        block_sizes: Sequence[int],
        memory_budget: int,
    ) -> None:
        self.source = source
        self.inputs = inputs
        self.block_sizes = list(block_sizes)
        self.num_points = length(inputs)
        kept: list[JacobianRows] | None = []
        outputs, used = [], 0
        with torch.set_grad_enabled(source.needs_grad):
            for output, jac in source.jacobian_segments(inputs):
                outputs.append(output.detach())
                if kept is None:
                    continue
                rows = JacobianRows.all_rows(jac, self.block_sizes)
                used += rows.nbytes
                kept = [*kept, rows] if used <= memory_budget else None
        self.outputs = torch.cat(outputs)
        self._kept = kept

    @property
    def num_outputs(self) -> int:
        """``C``."""
        return self.outputs.shape[1]

    @property
    def num_rows(self) -> int:
        """``M C``."""
        return self.outputs.numel()

    @property
    def kept(self) -> bool:
        """Whether the rows are kept (else recomputed per use)."""
        return self._kept is not None

    def chunks(self, output: int | None = None) -> Iterator[JacobianRows]:
        """The rows chunk by chunk, sample-major; only output ``output``'s if given."""
        if self._kept is not None:
            for rows in self._kept:
                yield rows if output is None else rows.of_output(output)
            return
        with torch.set_grad_enabled(self.source.needs_grad):
            for _, jac in self.source.jacobian_segments(self.inputs):
                yield JacobianRows.all_rows(jac, self.block_sizes, output)

    def cross(
        self,
        rows: JacobianRows,
        variances: Tensor,
        independent: bool = False,
        output: int | None = None,
    ) -> Tensor:
        """The kernel between ``rows`` and the anchors (of ``output``), ``[R, A]``."""
        return torch.cat(
            [ntk(rows, chunk, variances, independent) for chunk in self.chunks(output)],
            dim=1,
        )

    def gram(
        self, variances: Tensor, independent: bool = False, output: int | None = None
    ) -> Tensor:
        """The kernel among the anchors (of ``output``), ``[A, A]`` (symmetric)."""
        if self._kept is None:
            gram = torch.cat(
                [
                    self.cross(chunk, variances, independent, output)
                    for chunk in self.chunks(output)
                ]
            )
            return (gram + gram.mT) / 2
        chunks = [r if output is None else r.of_output(output) for r in self._kept]
        bounds = [0, *itertools.accumulate(len(c) for c in chunks)]
        gram = variances.new_empty(bounds[-1], bounds[-1])
        for i, first in enumerate(chunks):
            rows = slice(bounds[i], bounds[i + 1])
            for j in range(i, len(chunks)):
                tile = ntk(first, chunks[j], variances, independent)
                gram[rows, bounds[j] : bounds[j + 1]] = tile
                gram[bounds[j] : bounds[j + 1], rows] = tile.mT
        return (gram + gram.mT) / 2
