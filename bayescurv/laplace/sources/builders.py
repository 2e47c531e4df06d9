r"""Structure builders: accumulate a source's batch quantities into a curvature object.

A builder asks its :class:`~bayescurv.laplace.sources.CurvatureSource` for one
:class:`~bayescurv.laplace.sources.Quantity` per batch, sums the contributions over
the data and returns a :class:`~bayescurv.curvature.CurvatureMatrix` with unit scale
and zero prior (the posterior adds both). Every builder works with every source.

* ``full`` -> :class:`~bayescurv.curvature.Dense` (sum of batch GGNs);
* ``diag`` -> :class:`~bayescurv.curvature.Diagonal` (sum of batch diagonals);
* ``kron`` -> :class:`~bayescurv.curvature.KronBlocks`;
* ``lowrank`` -> :class:`~bayescurv.curvature.LowRankPlusDiag`.

# NOTE [Combining Kronecker factors over batches]
# As in laplace-torch (and KFAC in general), the factors are summed separately, not
# the Kronecker products: B = sum over all data of the output-side factor (it carries
# the loss scaling), A = the mean over all N data of the input outer products. Each
# batch contributes B_b and A_b * N_b; A is divided by N once at the end, so the
# result is independent of the batching. The block is kron(B, A) with the prior
# added exactly in the factors' eigenbases (see bayescurv.curvature.kron).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from bayescurv.curvature import (
    CurvatureMatrix,
    Dense,
    Diagonal,
    KronBlocks,
    LowRankPlusDiag,
)
from bayescurv.curvature.linalg import symmetric_eigh
from bayescurv.engine.boundary import all_finite
from bayescurv.engine.memory import Estimate
from bayescurv.laplace.enums import HessianStructure
from bayescurv.laplace.sources.base import CurvatureSource, KronFactors, Quantity
from bayescurv.laplace.sources.eigen import top_eigenpairs

Reduce = Callable[[Callable[[Tensor], Tensor]], Callable[[Tensor], Tensor]]
"""Wraps a curvature product so that it sums over processes."""


class NonFiniteCurvatureError(ValueError):
    """The curvature of a batch contains NaN or inf."""


def _check_finite(tensors: Iterable[Tensor], batch: int) -> None:
    for tensor in tensors:
        if not all_finite(tensor):
            raise NonFiniteCurvatureError(
                f"Laplace.fit: the curvature of batch {batch} contains NaN or inf "
                "(check the model's parameters and features for overflow, or use "
                "float64)."
            )


class StructureBuilder(ABC):
    """Accumulates one quantity over batches and builds the curvature object.

    The accumulated sums are private to the builder (added to in place) until
    :meth:`sums` hands them over at the end of a fit; a later
    ``fit(override=False)`` adds them into its own builder's accumulators, so a
    fitted state's tensors are never modified.

    Args:
        source: The subset's curvature source.
    """

    quantity: Quantity
    structure: ClassVar[HessianStructure]
    supports_accumulation: ClassVar[bool] = True
    """Whether ``fit(override=False)`` can add to an earlier fit."""

    def __init__(self, source: CurvatureSource) -> None:
        self.source = source
        self.n_data = 0

    def step(self, inputs: Any, targets: Tensor, n: int, batch: int) -> Tensor:
        """Add batch number ``batch`` (``n`` samples); returns the model output."""
        output, value = self.source.batch(self.quantity, inputs, targets)
        self.add(value, n, batch)
        return output

    @abstractmethod
    def add(self, value: Any, n: int, batch: int) -> None:
        """Add batch ``batch``'s contribution of ``n`` samples (checked finite)."""

    @abstractmethod
    def finish(
        self, data: Iterable[tuple[Any, Tensor]], reduce: Reduce | None = None
    ) -> CurvatureMatrix:
        """The curvature object (unit scale, zero prior) of everything added.

        Args:
            data: The fit's batches (``lowrank`` passes over them again).
            reduce: Sums curvature products over processes (distributed fits).
        """

    @abstractmethod
    def sums(self) -> dict[str, Any]:
        r"""The accumulated sums, handed over (for ``fit(override=False)`` later).

        Called last, after :meth:`finish` (whose result shares no tensor with them):
        the builder is done, so nothing adds to the returned tensors; a later fit
        :meth:`absorb`\ s them into its own accumulators.
        """

    @abstractmethod
    def accumulators(self) -> list[Tensor]:
        """The accumulated tensors themselves (reduced in place across processes)."""

    def absorb(self, sums: dict[str, Any]) -> None:
        """Add sums returned by another builder's :meth:`sums` (same layout)."""
        mine = self.accumulators()
        theirs = self._tensors(sums)
        for tensor, other in zip(mine, theirs, strict=True):
            tensor.add_(other)
        self.n_data += sums["n_data"]

    @staticmethod
    def _tensors(sums: dict[str, Any]) -> list[Tensor]:
        if "factors" in sums:
            return [f for fs in sums["factors"] for f in fs]
        return [sums["total"]]

    def _blocks(self) -> dict[str, Any]:
        return {
            "block_sizes": self.source.block_sizes,
            "block_names": self.source.block_names,
        }


class _SumBuilder(StructureBuilder):
    """Accumulates one tensor (a dense matrix or a diagonal)."""

    def __init__(self, source: CurvatureSource) -> None:
        super().__init__(source)
        self.total: Tensor | None = None

    def add(self, value: Tensor, n: int, batch: int) -> None:
        _check_finite([value], batch)
        if self.total is None:
            self.total = value.clone()
        else:
            self.total.add_(value)  # private until sums() hands it over
        self.n_data += n

    def sums(self) -> dict[str, Any]:
        return {"total": self.total, "n_data": self.n_data}

    def accumulators(self) -> list[Tensor]:
        return [self.total]


class FullBuilder(_SumBuilder):
    """The dense GGN over the subset, :class:`~bayescurv.curvature.Dense`.

    Batches are added into one ``[P, P]`` matrix in place (no matrix per batch).
    """

    quantity = Quantity.DENSE
    structure = HessianStructure.FULL

    def step(self, inputs: Any, targets: Tensor, n: int, batch: int) -> Tensor:  # noqa: D102
        output, self.total = self.source.accumulate_dense(inputs, targets, self.total)
        _check_finite([self.total], batch)
        self.n_data += n
        return output

    def finish(  # noqa: D102
        self, data: Iterable[tuple[Any, Tensor]], reduce: Reduce | None = None
    ) -> Dense:
        return Dense(self.total, **self._blocks())  # Dense symmetrizes into a copy


class DiagBuilder(_SumBuilder):
    """The GGN diagonal, :class:`~bayescurv.curvature.Diagonal`."""

    quantity = Quantity.DIAG
    structure = HessianStructure.DIAG

    def finish(  # noqa: D102
        self, data: Iterable[tuple[Any, Tensor]], reduce: Reduce | None = None
    ) -> Diagonal:
        return Diagonal(self.total.clone(), **self._blocks())


class KronBuilder(StructureBuilder):
    """Kronecker factors per parameter tensor, :class:`~bayescurv.curvature.KronBlocks`.

    See the module's NOTE for how batches combine.
    """

    quantity = Quantity.KRON
    structure = HessianStructure.KRON

    def __init__(self, source: CurvatureSource) -> None:
        super().__init__(source)
        self.factors: KronFactors | None = None

    def add(self, value: KronFactors, n: int, batch: int) -> None:  # noqa: D102
        _check_finite([f for fs in value for f in fs], batch)
        if self.factors is None:
            self.factors = [[f.clone() for f in fs] for fs in value]
        else:  # in place: private until sums() hands them over
            for old, new in zip(self.factors, value, strict=True):
                for a, b in zip(old, new, strict=True):
                    a.add_(b)
        self.n_data += n

    def finish(  # noqa: D102
        self, data: Iterable[tuple[Any, Tensor]], reduce: Reduce | None = None
    ) -> KronBlocks:
        blocks = {}
        sides = self.source.kron_mean_factors()
        for name, fs, side in zip(
            self.source.block_names, self.factors, sides, strict=True
        ):
            # no copies: KronBlocks stores new, symmetrized factors
            blocks[name] = [
                f / self.n_data if i == side else f for i, f in enumerate(fs)
            ]
        return KronBlocks(blocks)

    def sums(self) -> dict[str, Any]:  # noqa: D102
        return {"factors": self.factors, "n_data": self.n_data}

    def accumulators(self) -> list[Tensor]:  # noqa: D102
        return [f for fs in self.factors for f in fs]


DENSE_EIGEN_MAX = 512
"""Largest subset whose ``lowrank`` eigenpairs come from the dense GGN."""


class LowRankBuilder(_SumBuilder):
    r"""Top-``rank`` GGN eigenpairs plus the diagonal of the remainder.

    .. math::
        G \approx U \operatorname{diag}(\sigma) U^\top + \operatorname{diag}(d),
        \qquad d = \max\big(0, \operatorname{diag}(G)
        - \operatorname{diag}(U \operatorname{diag}(\sigma) U^\top)\big)

    Up to :data:`DENSE_EIGEN_MAX` weights the dense GGN is accumulated in the fit's
    pass and decomposed once (exact). Beyond, the diagonal is accumulated per batch
    and the eigenpairs come from randomized subspace iteration with the source's
    GGN products over the data (:mod:`bayescurv.laplace.sources.eigen`).

    Args:
        source: The subset's curvature source.
        rank: Number of eigenpairs ``k`` (at most ``P``).
        generator: Randomness of the subspace iteration's start.
    """

    structure = HessianStructure.LOWRANK
    supports_accumulation = False

    def __init__(
        self,
        source: CurvatureSource,
        rank: int,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(source)
        self.rank = rank
        self.generator = generator
        self.dense = source.num_params <= DENSE_EIGEN_MAX
        self.quantity = Quantity.DENSE if self.dense else Quantity.DIAG

    def finish(  # noqa: D102
        self, data: Iterable[tuple[Any, Tensor]], reduce: Reduce | None = None
    ) -> LowRankPlusDiag:
        rank = min(self.rank, self.source.num_params)
        if self.dense:
            values, vectors = symmetric_eigh(self.total, "lowrank")
            values, vectors = values.flip(0)[:rank], vectors.flip(1)[:, :rank]
            diagonal = self.total.diagonal()
        else:
            matmul = self.source.curvature_matmul(data)
            values, vectors = top_eigenpairs(
                matmul if reduce is None else reduce(matmul),
                self.source.num_params,
                rank,
                self.total,
                self.generator,
            )
            diagonal = self.total
        values = values.clamp(min=0)
        remainder = (diagonal - vectors.square() @ values).clamp(min=0)
        return LowRankPlusDiag(vectors, values, remainder, **self._blocks())


def structure_estimate(
    structure: HessianStructure, source: CurvatureSource, rank: int
) -> Estimate:
    """The bytes a structure needs: its accumulated sums and its decomposition.

    ``full`` keeps the ``[P, P]`` GGN and its eigenbasis or Cholesky factor; ``kron``
    two factors per block and their eigenbases; ``lowrank`` the dense GGN up to
    :data:`DENSE_EIGEN_MAX` weights, else a few ``[P, k]`` blocks; ``diag`` ``[P]``.
    """
    size = source.num_params
    item = torch.empty((), dtype=source.dtype).element_size()
    cheaper = (
        "Use hessian_structure='kron', 'diag' or 'lowrank', or "
        "subset_of_weights='last_layer'."
    )
    if structure is HessianStructure.FULL:
        return Estimate(
            f"hessian_structure='full': [P, P] = [{size}, {size}]",
            2 * size * size * item,
            cheaper,
        )
    if structure is HessianStructure.KRON:
        entries = sum(kron_factor_entries(p.shape) for p in source.parameters.values())
        return Estimate(
            f"hessian_structure='kron': Kronecker factors of {size} weights",
            2 * entries * item,
            "Use hessian_structure='diag' or subset_of_weights='last_layer'.",
        )
    if structure is HessianStructure.LOWRANK:
        dense = size <= DENSE_EIGEN_MAX
        entries = 2 * size * size if dense else 4 * size * (rank + 10)
        return Estimate(
            f"hessian_structure='lowrank' (rank {rank}) of {size} weights",
            entries * item,
            "Use a smaller rank or hessian_structure='diag'.",
        )
    return Estimate(f"hessian_structure='diag': [P] = [{size}]", size * item, "")


def kron_factor_entries(shape: Sequence[int]) -> int:
    """Entries of the Kronecker factors of one parameter tensor (ungrouped).

    ``[out, in...]`` has ``out² + (prod in)²``, a vector ``[n]`` one ``n²`` factor.
    """
    if len(shape) < 2:
        return math.prod(shape) ** 2
    return shape[0] ** 2 + math.prod(shape[1:]) ** 2


def make_builder(
    structure: HessianStructure,
    source: CurvatureSource,
    rank: int,
    generator: torch.Generator | None = None,
) -> StructureBuilder:
    """The builder of a structure (``rank``, ``generator``: ``lowrank`` only)."""
    if structure is HessianStructure.FULL:
        return FullBuilder(source)
    if structure is HessianStructure.DIAG:
        return DiagBuilder(source)
    if structure is HessianStructure.KRON:
        return KronBuilder(source)
    if structure is HessianStructure.LOWRANK:
        return LowRankBuilder(source, rank, generator)
    raise ValueError(
        f"hessian_structure='{structure.value}' is not available in "
        "bayescurv.laplace; use 'full', 'kron', 'diag' or 'lowrank'."
    )
