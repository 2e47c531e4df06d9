r"""Fitting across processes with ``torch.distributed``.

Every rank runs ``fit`` on its own shard of the data (e.g. a ``DistributedSampler``)
and accumulates exactly what a single process accumulates per batch: the curvature
sums of its structure (dense matrix, diagonal, Kronecker factor sums) and the loss.
One all-reduce of those sums, packed into one flat buffer, then gives every rank the
sums over all the data, so every rank builds the same posterior; evidence, tuning and
prediction need no further communication.

Before the all-reduce, a handshake (an all-gather of three integers per rank) checks
that every rank has data and accumulated the same layout, and sums the data counts:
a rank without batches or with another model raises the same error on every rank
instead of hanging the others. ``lowrank`` beyond the dense limit needs GGN products
over all the data: each product of its subspace iteration is one more all-reduce of a
``[P, k]`` block.

# NOTE [Why sums, not posteriors]
# The curvature of a Laplace fit is a sum over data points, so the reduction of the
# per-rank sums is exact: the result equals the single-process fit up to the order of
# floating-point additions. Averaging per-rank posteriors (or their log
# determinants) would not be: Kronecker factors combine as B = sum B_r and
# A = sum A_r * N_r / N, which is what reducing the sums and dividing once gives.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch import distributed as dist

from bayescurv.laplace.enums import HessianStructure, parse
from bayescurv.laplace.sources.builders import DENSE_EIGEN_MAX, kron_factor_entries


class DistributedFitError(RuntimeError):
    """The ranks of a distributed fit disagree (no data, another model or layout)."""


@dataclass(frozen=True)
class Communicator:
    """The process group a fit reduces over.

    Attributes:
        group: A ``torch.distributed`` process group (``None``: the default group).
        world_size: Number of ranks.
        rank: This process's rank in the group.
    """

    group: Any
    world_size: int
    rank: int

    def handshake(self, batches: int, samples: int, numel: int) -> int:
        """Check that every rank has data and the same layout; the total samples.

        Args:
            batches: Batches this rank saw.
            samples: Samples this rank saw.
            numel: Entries of this rank's accumulated sums.

        Returns:
            The number of samples over all ranks.

        Raises:
            DistributedFitError: On every rank, if a rank saw no batch or the ranks
                accumulated sums of different sizes.
        """
        mine = torch.tensor([batches, samples, numel], dtype=torch.int64)
        mine = mine.to(_device(self.group))
        gathered = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine, group=self.group)
        table = torch.stack(gathered).cpu()
        empty = [r for r in range(self.world_size) if table[r, 0] == 0]
        if empty:
            raise DistributedFitError(
                f"Laplace.fit: ranks {empty} of {self.world_size} got no batches; "
                "every rank needs a shard of the data (e.g. a DistributedSampler with "
                "at least as many samples as ranks)."
            )
        if not bool((table[:, 2] == table[0, 2]).all()):
            raise DistributedFitError(
                "Laplace.fit: the ranks accumulated curvature of different sizes "
                f"({table[:, 2].tolist()}): every rank must fit the same model, subset "
                "and structure."
            )
        return int(table[:, 1].sum())

    def all_reduce(self, tensors: list[Tensor]) -> None:
        """Sum ``tensors`` over all ranks, in place, in one all-reduce."""
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        start = 0
        for tensor in tensors:
            tensor.copy_(flat[start : start + tensor.numel()].view_as(tensor))
            start += tensor.numel()

    def reduced_products(
        self, matmul: Callable[[Tensor], Tensor]
    ) -> Callable[[Tensor], Tensor]:
        """``matmul`` over this rank's shard, summed over all ranks per call."""

        def reduced(block: Tensor) -> Tensor:
            product = matmul(block)
            dist.all_reduce(product, op=dist.ReduceOp.SUM, group=self.group)
            return product

        return reduced


def communicator(distributed: bool | None, process_group: Any = None) -> Any:
    """The communicator of a fit, or ``None`` for a single-process fit.

    Args:
        distributed: ``True``: reduce (``torch.distributed`` must be initialized);
            ``False``: fit per rank; ``None``: reduce if initialized with more than
            one rank.
        process_group: The group to reduce over (default: the default group).

    Raises:
        ValueError: For ``distributed=True`` without an initialized process group.
    """
    initialized = dist.is_available() and dist.is_initialized()
    if distributed is False or (distributed is None and not initialized):
        return None
    if not initialized:
        raise ValueError(
            "fit(distributed=True) needs torch.distributed.init_process_group() "
            "first (e.g. under torchrun)."
        )
    world = dist.get_world_size(group=process_group)
    if distributed is None and world == 1:
        return None
    return Communicator(process_group, world, dist.get_rank(group=process_group))


def message_entries(
    structure: HessianStructure | str,
    shapes: Sequence[tuple[int, ...]],
    num_params: int | None = None,
    loss_entries: int = 1,
) -> int:
    r"""Entries of the one all-reduce of a distributed fit (the message size).

    The accumulated sums of the structure plus the loss:

    * ``full`` and ``lowrank`` (up to :data:`DENSE_EIGEN_MAX` weights):
      :math:`P^2`;
    * ``kron``: :math:`\sum_W (\mathrm{out}_W^2 + \mathrm{in}_W^2)` over the weight
      tensors (``in`` all trailing dimensions, e.g. ``C_in k_h k_w``) plus
      :math:`\mathrm{out}^2` per bias;
    * ``diag`` and ``lowrank`` beyond the dense limit: :math:`P` (``lowrank`` then
      adds one all-reduce of ``[P, k]`` per GGN product of its subspace iteration).

    Times the element size (8 bytes in the default float64 curvature) this is the
    ``S`` of the ring all-reduce's cost :math:`2 (R - 1) / R \cdot S / \text{bandwidth}`
    (see ``docs/distributed.md``).

    Args:
        structure: The Hessian structure.
        shapes: The subset's parameter tensor shapes (``kron``; for ``P`` too unless
            ``num_params`` is given).
        num_params: ``P``, if not all entries of ``shapes`` (a subnetwork).
        loss_entries: Entries of the summed loss: 1, or ``K`` outputs for regression.

    Returns:
        The number of entries all-reduced.

    Example:
        >>> message_entries("kron", [(10, 512), (10,)])  # 10² + 512² + 10² + loss
        262345
    """
    structure = parse(HessianStructure, structure, "hessian_structure")
    size = sum(math.prod(s) for s in shapes) if num_params is None else num_params
    if structure is HessianStructure.KRON:
        entries = sum(kron_factor_entries(s) for s in shapes)
    elif structure is HessianStructure.FULL or (
        structure is HessianStructure.LOWRANK and size <= DENSE_EIGEN_MAX
    ):
        entries = size * size
    else:
        entries = size
    return entries + loss_entries


def _device(group: Any) -> torch.device:
    """CPU for gloo, this rank's CUDA device for NCCL."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
