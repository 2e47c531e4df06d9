r"""The interface every curvature structure implements.

A :class:`CurvatureMatrix` is an immutable symmetric matrix over a flat parameter
vector of size :math:`P`, split into named blocks of sizes ``block_sizes``:

.. math::
    \Lambda = s \odot H + \operatorname{diag}(\pi),

with a structured data term :math:`H` (diagonal, Kronecker blocks, dense, low rank plus
diagonal), a data-term scale :math:`s` (scalar, or per block where the structure
allows) and a prior precision :math:`\pi` (scalar, per block or per parameter, see
:mod:`bayescurv.curvature.prior`). ``add_prior`` and ``scaled`` return new objects that
share the expensive decomposition of :math:`H`; only :math:`s` and :math:`\pi` carry
gradients.

A subclass implements ``dense``, ``diagonal``, ``_mvp`` and ``_factorize`` (its
precision as independent diagonal blocks, each a
:class:`~bayescurv.curvature.factorizations.Factorization`); this base class turns
those into ``logdet``, ``solve``, ``inverse``, ``inverse_diagonal``, ``sample`` and
``inv_quad_form_batch``.
"""

from __future__ import annotations

import copy
import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from bayescurv.curvature import prior as priors
from bayescurv.curvature.factorizations import Factorization
from bayescurv.curvature.prior import PrecisionLike, PriorStructure

Self = TypeVar("Self", bound="CurvatureMatrix")
Pieces = list[tuple[slice, Factorization]]


class CurvatureMatrix(ABC):
    r"""A structured precision :math:`\Lambda = s \odot H + \operatorname{diag}(\pi)`.

    Args:
        block_sizes: Parameters per block, summing to ``P``; ``None`` for one block.
        block_names: One name per block; ``None`` for ``"0", "1", ...``.
        scale: Data-term scale :math:`s` (e.g. ``1 / temperature`` or
            ``1 / sigma_noise**2``): a scalar, or ``[B]`` if
            :attr:`supports_block_scale`.
        prior_precision: :math:`\pi`: a scalar, ``[B]`` or ``[P]`` (if the structure
            supports it, see :attr:`supported_priors`).
        num_params: ``P``.
        like: A data tensor whose dtype and device the structure takes.

    Attributes:
        block_sizes: ``B`` positive block sizes, in parameter order.
        block_names: ``B`` block names, in the same order.
    """

    supports_block_scale: ClassVar[bool] = False
    """Whether ``scale`` may be a per-block tensor ``[B]``."""
    supported_priors: ClassVar[frozenset[PriorStructure]] = frozenset(PriorStructure)
    """Prior structures the structure applies exactly."""
    blockwise_spectrum: ClassVar[bool] = False
    """Whether :meth:`data_eigenvalues` lists each block's eigenvalues in the block's
    parameter range (blocks decomposed independently), so that a per-block prior
    shifts them block by block."""

    def __init__(
        self,
        *,
        block_sizes: Sequence[int] | None,
        block_names: Sequence[str] | None,
        scale: PrecisionLike,
        prior_precision: PrecisionLike,
        num_params: int,
        like: Tensor,
    ) -> None:
        self.block_sizes = self._check_block_sizes(block_sizes, num_params)
        if block_names is None:
            block_names = [str(i) for i in range(len(self.block_sizes))]
        if len(block_names) != len(self.block_sizes):
            raise ValueError(
                f"{self._name}: expected {len(self.block_sizes)} block names, got "
                f"{len(block_names)}."
            )
        self.block_names = tuple(block_names)
        self._prior = like.new_zeros(())
        self._scale = self._as_scale(scale)
        self._prior = self._as_prior(prior_precision)
        self._cached_pieces: Pieces | None = None

    # ----------------------------------------------------------------- properties
    @property
    def num_params(self) -> int:
        """``P``, the size of the matrix."""
        return sum(self.block_sizes)

    @property
    def num_blocks(self) -> int:
        """``B``, the number of blocks."""
        return len(self.block_sizes)

    def block_slices(self) -> list[slice]:
        """The parameter range of every block, in order."""
        ends = itertools.accumulate(self.block_sizes)
        return [
            slice(end - size, end)
            for end, size in zip(ends, self.block_sizes, strict=True)
        ]

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point type of the matrix."""
        return self._prior.dtype

    @property
    def device(self) -> torch.device:
        """Device of the matrix."""
        return self._prior.device

    @property
    def scale(self) -> Tensor:
        """The data-term scale :math:`s`, 0-d or ``[B]``."""
        return self._scale

    @property
    def prior_precision(self) -> Tensor:
        r"""The prior precision :math:`\pi`, 0-d, ``[B]`` or ``[P]``."""
        return self._prior

    @property
    def prior_structure(self) -> PriorStructure:
        """Whether the prior is scalar, layerwise or diagonal."""
        return priors.structure_of(self._prior, self.block_sizes)

    # --------------------------------------------------------- immutable updates
    def add_prior(self: Self, prior_precision: PrecisionLike) -> Self:
        r"""This matrix plus :math:`\operatorname{diag}(\pi)` as a new object.

        The new object shares the cached decomposition of the data term.

        Args:
            prior_precision: A scalar, ``[B]`` (entry ``b`` for block ``b``, in the
                order of ``block_sizes``) or ``[P]``; non-negative; may require grad.

        Returns:
            A new matrix of the same structure.

        Raises:
            ValueError: For a wrong shape, negative or non-finite entries, or a prior
                structure the structure cannot apply exactly.
        """
        added = self._as_prior(prior_precision)
        total = priors.combine(self._prior, added, self.block_sizes, torch.add)
        return self._replace(self._scale, total)

    def scaled(self: Self, scale: PrecisionLike) -> Self:
        r"""The matrix times ``scale`` (data term and prior) as a new object.

        Args:
            scale: A non-negative scalar, or ``[B]`` if :attr:`supports_block_scale`.

        Returns:
            A new matrix of the same structure sharing the cached decomposition.
        """
        factor = self._as_scale(scale)
        new_scale = priors.combine(self._scale, factor, self.block_sizes, torch.mul)
        new_prior = priors.combine(self._prior, factor, self.block_sizes, torch.mul)
        return self._replace(new_scale, new_prior)

    def logdet_with_prior(
        self, prior_precision: PrecisionLike, scale: PrecisionLike = 1.0
    ) -> Tensor:
        r""":math:`\log\det(\mathrm{scale} \cdot \Lambda + \operatorname{diag}(\pi))`.

        Differentiable w.r.t. tensor arguments; reuses the cached decomposition, so
        for eigenbasis-based structures it costs :math:`O(P)` after the first call.
        """
        return self.scaled(scale).add_prior(prior_precision).logdet()

    def to(self: Self, *args: Any, **kwargs: Any) -> Self:
        """A copy with every tensor converted by ``Tensor.to(*args, **kwargs)``."""

        def convert(tensor: Tensor) -> Tensor:
            return tensor.to(*args, **kwargs)

        new = copy.copy(self)
        new._scale, new._prior = convert(self._scale), convert(self._prior)
        new._cached_pieces = None
        new._map_data(convert)
        return new

    # ------------------------------------------------------ generic inverse side
    def logdet(self) -> Tensor:
        r""":math:`\log\det\Lambda`, a 0-d tensor (differentiable in :math:`s, \pi`)."""
        return torch.stack([f.logdet() for _, f in self._pieces()]).sum()

    def solve(self, v: Tensor) -> Tensor:
        r""":math:`\Lambda^{-1} v` for ``v: [P]`` or ``[P, K]`` (same shape out)."""
        rhs = self._check_rhs(v, "solve")
        out = torch.cat([f.solve(rhs[block]) for block, f in self._pieces()])
        return out.reshape(v.shape)

    def inverse(self) -> Tensor:
        r"""The covariance :math:`\Lambda^{-1}`, dense ``[P, P]``."""
        return torch.block_diag(*[f.inverse() for _, f in self._pieces()])

    def inverse_diagonal(self) -> Tensor:
        r"""Marginal variances :math:`\operatorname{diag}(\Lambda^{-1})`, ``[P]``."""
        return torch.cat([f.inverse_diagonal() for _, f in self._pieces()])

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        r"""``n`` draws from :math:`\mathcal{N}(0, \Lambda^{-1})`, ``[n, P]``.

        Args:
            n: Number of draws.
            generator: Source of randomness (default: torch's global generator).
        """
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{self._name}.sample: n must be a positive int, got {n}.")
        pieces = self._pieces()
        total = sum(f.noise_dim for _, f in pieces)
        noise = torch.randn(
            n, total, generator=generator, dtype=self.dtype, device=self.device
        ).mT
        draws, start = [], 0
        for _, f in pieces:
            draws.append(f.sample_transform(noise[start : start + f.noise_dim]))
            start += f.noise_dim
        return torch.cat(draws).mT.contiguous()

    def inv_quad_form_batch(self, jac: Tensor) -> Tensor:
        r""":math:`J_n \Lambda^{-1} J_n^\top` for Jacobians ``jac: [N, C, P]``.

        Returns:
            ``[N, C, C]``, e.g. the functional variance of a linearized model.
        """
        if (
            not isinstance(jac, Tensor)
            or jac.ndim != 3
            or jac.shape[-1] != (self.num_params)
        ):
            shape = list(jac.shape) if isinstance(jac, Tensor) else type(jac).__name__
            raise ValueError(
                f"{self._name}.inv_quad_form_batch: expected Jacobians of shape "
                f"[N, C, {self.num_params}], got {shape}."
            )
        terms = [f.inv_quad_batch(jac[..., block]) for block, f in self._pieces()]
        return torch.stack(terms).sum(0)

    def mvp(self, v: Tensor) -> Tensor:
        r""":math:`\Lambda v` for ``v: [P]`` or ``[P, K]`` (same shape out)."""
        return self._mvp(self._check_rhs(v, "mvp")).reshape(v.shape)

    def data_eigenvalues(self) -> Tensor | None:
        r"""Eigenvalues :math:`\lambda` of the scaled data term, ``[P]``.

        The scaled data term is :math:`\Lambda - \operatorname{diag}(\pi)`.
        With them, the log determinant under any scalar prior :math:`\pi'` and scalar
        factor :math:`c` is :math:`\log\det(c\,(\Lambda - \operatorname{diag}(\pi))
        + \pi' I) = \sum_i \log(c \lambda_i + \pi')`: :math:`O(P)` per evaluation,
        e.g. each step of evidence tuning, with no new structure object.

        Returns:
            ``[P]`` (detached; computed once and cached where a decomposition is
            needed), or ``None`` if the structure has no such spectrum (e.g. a
            non-scalar scale of ``Dense``, a non-constant diagonal of
            ``LowRankPlusDiag``).
        """
        return None

    def data_eigenbasis(self) -> tuple[Tensor, Tensor] | None:
        r"""Eigenvalues ``[P]`` and eigenvectors ``[P, P]`` of the scaled data term.

        Returns:
            Both (detached, columns as eigenvectors) where the structure has one
            dense eigenbasis (``Dense``), else ``None``.
        """
        return None

    def factorized_blocks(self) -> Pieces:
        """The precision as independent diagonal blocks, each factorized.

        Returns:
            ``(parameter slice, factorization)`` pairs in parameter order (cached
            like every inverse-side operation), for fast paths that exploit a
            factorization's form (e.g. a Kronecker eigenbasis).
        """
        return self._pieces()

    # ------------------------------------------------------- structure-specific
    @abstractmethod
    def dense(self) -> Tensor:
        r""":math:`\Lambda` as a dense ``[P, P]`` tensor (for tests and small P)."""

    @abstractmethod
    def diagonal(self) -> Tensor:
        r""":math:`\operatorname{diag}(\Lambda)`, ``[P]``."""

    @abstractmethod
    def _mvp(self, x: Tensor) -> Tensor:
        r""":math:`\Lambda x` for ``x: [P, K]``."""

    @abstractmethod
    def _factorize(self) -> Pieces:
        """The precision as (parameter slice, factorization) diagonal blocks."""

    @abstractmethod
    def _data_state(self) -> dict[str, Any]:
        """The data term (and any computed decomposition) as plain values."""

    @classmethod
    @abstractmethod
    def _from_state(cls: type[Self], state: dict[str, Any]) -> Self:
        """Inverse of :meth:`state_dict`, after the structure name was checked."""

    @abstractmethod
    def _map_data(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Replace (never mutate) every data tensor ``t`` of this copy by ``fn(t)``."""

    # ------------------------------------------------------------ serialization
    def state_dict(self) -> dict[str, Any]:
        """Tensors, lists and strings that :meth:`from_state_dict` restores.

        Scale and prior are stored detached; computed eigendecompositions are stored
        so that a restored object does not decompose again.
        """
        return {
            "structure": type(self).__name__,
            "block_sizes": list(self.block_sizes),
            "block_names": list(self.block_names),
            "scale": self._scale.detach(),
            "prior_precision": self._prior.detach(),
            **self._data_state(),
        }

    @classmethod
    def from_state_dict(cls: type[Self], state: dict[str, Any]) -> Self:
        """Restore an object saved with :meth:`state_dict`.

        Raises:
            ValueError: If ``state`` belongs to another structure.
        """
        if state.get("structure") != cls.__name__:
            raise ValueError(
                f"{cls.__name__}.from_state_dict: the state holds a "
                f"{state.get('structure')!r} structure."
            )
        return cls._from_state(state)

    # ------------------------------------------------------------------ helpers
    @property
    def _name(self) -> str:
        return type(self).__name__

    def _unsupported_prior_message(self, structure: PriorStructure) -> str:
        return f"{self._name}: a {structure.value} prior precision is not supported."

    def _pieces(self) -> Pieces:
        """Factorized diagonal blocks; cached unless they carry gradients."""
        if self._cached_pieces is not None:
            return self._cached_pieces
        pieces = self._factorize()
        if not (self._scale.requires_grad or self._prior.requires_grad):
            self._cached_pieces = pieces
        return pieces

    def _replace(self: Self, scale: Tensor, prior: Tensor) -> Self:
        new = copy.copy(self)
        new._scale, new._prior, new._cached_pieces = scale, prior, None
        return new

    def _as_prior(self, value: PrecisionLike) -> Tensor:
        tensor = priors.as_precision(
            value, self.block_sizes, like=self._prior, owner=self._name
        )
        structure = priors.structure_of(tensor, self.block_sizes)
        if structure not in self.supported_priors:
            raise ValueError(self._unsupported_prior_message(structure))
        return tensor

    def _as_scale(self, value: PrecisionLike) -> Tensor:
        tensor = priors.as_precision(
            value, self.block_sizes, like=self._prior, owner=self._name, what="scale"
        )
        structure = priors.structure_of(tensor, self.block_sizes)
        allowed = PriorStructure.LAYERWISE if self.supports_block_scale else None
        if structure not in {PriorStructure.SCALAR, allowed}:
            kind = "per-block" if structure is PriorStructure.LAYERWISE else "per-param"
            raise ValueError(
                f"{self._name}: a {kind} scale is not supported; pass a scalar"
                + (" or a per-block tensor." if allowed else ".")
            )
        return tensor

    def _check_block_sizes(
        self, block_sizes: Sequence[int] | None, num_params: int
    ) -> tuple[int, ...]:
        sizes = (num_params,) if block_sizes is None else tuple(block_sizes)
        if any(not isinstance(s, int) or s < 1 for s in sizes) or (
            sum(sizes) != num_params
        ):
            raise ValueError(
                f"{self._name}: block_sizes must be positive ints summing to "
                f"P={num_params}, got {list(sizes)}."
            )
        return sizes

    def _check_rhs(self, v: Tensor, operation: str) -> Tensor:
        """``v`` as ``[P, K]``; raise naming the expected shape otherwise."""
        if (
            not isinstance(v, Tensor)
            or v.ndim not in {1, 2}
            or (v.shape[0] != self.num_params)
        ):
            shape = list(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(
                f"{self._name}.{operation}: expected a tensor of shape "
                f"[{self.num_params}] or [{self.num_params}, K], got {shape}."
            )
        return v.reshape(self.num_params, -1)

    def __repr__(self) -> str:
        return (
            f"{self._name}(P={self.num_params}, blocks={self.num_blocks}, "
            f"prior={self.prior_structure.value}, dtype={self.dtype})"
        )
