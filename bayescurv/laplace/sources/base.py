r"""Where the curvature of a weight subset comes from: the interface.

A :class:`CurvatureSource` knows one subset of the weights (all, the last layer, a
subnetwork) and computes, per batch, the GGN of the likelihood's unit loss
(:mod:`bayescurv.laplace.likelihoods`) over that subset in the form a structure
builder asks for (:class:`Quantity`), plus Jacobians for the predictive. The
structure builders of :mod:`bayescurv.laplace.sources.builders` turn the accumulated
quantities into :mod:`bayescurv.curvature` objects, so every subset works with every
structure without a class per pair.

The flat parameter vector of a subset is the selected parameter tensors flattened
row-major and concatenated in ``named_parameters()`` order (then, for a subnetwork,
restricted to the selected entries); its blocks are the parameter tensors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from bayescurv.laplace.enums import CurvatureType
from bayescurv.laplace.likelihoods import LikelihoodModel
from bayescurv.laplace.sources.jacobians import DenseSegment, SegmentedJacobian

KronFactors = list[list[Tensor]]
"""Per block: ``[B, A_sum]`` for a weight, ``[B]`` for a bias (see ``Quantity``)."""


class Quantity(str, Enum):
    """What a structure builder needs from every batch."""

    DENSE = "dense"
    r"""The GGN :math:`\sum_n J_n^\top (\nabla_f^2 \ell_n) J_n`, ``[P, P]``."""
    DIAG = "diag"
    """The GGN diagonal, ``[P]``."""
    KRON = "kron"
    r"""Kronecker factors per block: ``B`` summed over samples and ``A`` *summed*
    (not averaged) over samples; the builder divides ``A`` by the data set size."""


@dataclass
class SourceOptions:
    """Options of the engine-backed curvature computations.

    Attributes:
        curvature: GGN, empirical Fisher or Hessian.
        stochastic: Monte Carlo GGN (``DiagGGNMC``, ``KFAC``, ``SqrtGGNMC``).
        mc_samples: Monte Carlo columns per sample.
        generator: Random generator of the Monte Carlo draws.
        memory_budget: Bytes for one chunk of square-root columns / Jacobians.
        dtype: The dtype curvature is accumulated and decomposed in (``None``: the
            model's); Gram matrices are formed from upcast vectors (exact rank).
    """

    curvature: CurvatureType = CurvatureType.GGN
    stochastic: bool = False
    mc_samples: int = 1
    generator: torch.Generator | None = None
    memory_budget: int = 2**28
    dtype: torch.dtype | None = None


class CurvatureSource(ABC):
    """The curvature and Jacobians of one weight subset.

    Attributes:
        model: The full model.
        likelihood: The likelihood (unit loss and output Hessians).
        options: Engine options.
    """

    supports_backprop: bool = False
    """Whether Jacobians keep the autograd graph (``enable_backprop``)."""
    needs_grad: bool = True
    """Whether computing Jacobians needs autograd enabled."""

    def __init__(
        self, model: nn.Module, likelihood: LikelihoodModel, options: SourceOptions
    ) -> None:
        self.model = model
        self.likelihood = likelihood
        self.options = options

    # ------------------------------------------------------------- the subset
    @property
    @abstractmethod
    def parameters(self) -> dict[str, nn.Parameter]:
        """The parameter tensors of the subset, by ``named_parameters()`` name."""

    @property
    def indices(self) -> Tensor | None:
        """Selected entries of the flattened :attr:`parameters`, or ``None`` (all)."""
        return None

    @property
    def block_names(self) -> list[str]:
        """One name per block of the flat vector (a parameter tensor)."""
        return list(self.parameters)

    @property
    def block_sizes(self) -> list[int]:
        """Entries per block of the flat vector."""
        sizes = [p.numel() for p in self.parameters.values()]
        if self.indices is None:
            return sizes
        bounds = torch.tensor([0, *sizes]).cumsum(0)
        counts = torch.bucketize(self.indices.cpu(), bounds[1:], right=True)
        return [int(c) for c in torch.bincount(counts, minlength=len(sizes))]

    @property
    def num_params(self) -> int:
        """``P``, the size of the flat vector."""
        return sum(self.block_sizes)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the accumulated curvature (see :class:`SourceOptions`)."""
        if self.options.dtype is not None:
            return self.options.dtype
        return next(iter(self.parameters.values())).dtype

    def parameter_vector(self) -> Tensor:
        """The current values of the subset, flat ``[P]`` (detached)."""
        flat = torch.cat([p.detach().flatten() for p in self.parameters.values()])
        return self._select(flat)

    def set_parameter_vector(self, vector: Tensor) -> None:
        """Write a flat ``[P]`` vector into the subset's parameters (in place)."""
        flat = torch.cat([p.detach().flatten() for p in self.parameters.values()])
        if self.indices is None:
            flat = vector.to(flat)
        else:
            flat[self.indices.to(flat.device)] = vector.to(flat)
        with torch.no_grad():
            start = 0
            for p in self.parameters.values():
                p.copy_(flat[start : start + p.numel()].view_as(p))
                start += p.numel()

    def parameter_tensors(self, vector: Tensor) -> dict[str, Tensor]:
        """The subset's parameter tensors with a flat ``[P]`` vector written in.

        New tensors (differentiable in ``vector``); the model is left untouched.
        Entries outside a subnetwork keep their current values.
        """
        flat = vector
        if self.indices is not None:
            values = self.parameters.values()
            current = torch.cat([p.detach().flatten() for p in values])
            flat = current.index_put((self.indices.to(current.device),), vector)
        tensors, start = {}, 0
        for name, p in self.parameters.items():
            tensors[name] = flat[start : start + p.numel()].reshape(p.shape)
            start += p.numel()
        return tensors

    def jacobian_segments(
        self, inputs: Any, differentiable: bool = False
    ) -> Iterator[tuple[Tensor, SegmentedJacobian]]:
        """Outputs ``[N_b, C]`` and per-sample Jacobians of chunks of samples.

        The default is one explicit chunk from :meth:`jacobians`; sources override
        it with factored segments and memory-bounded chunks.

        Args:
            inputs: The inputs.
            differentiable: Keep the autograd graph w.r.t. the inputs.
        """
        del differentiable
        output, jacobian = self.jacobians(inputs)
        yield output, SegmentedJacobian([DenseSegment(jacobian)], len(output))

    def kron_mean_factors(self) -> list[int | None]:
        """Per block, the Kronecker factor summed over samples that is to be averaged.

        ``[B, A]`` weights average ``A`` (index 1); a bias ``[B]`` has none.
        """
        return [1 if p.ndim >= 2 else None for p in self.parameters.values()]

    def _select(self, flat: Tensor, dim: int = -1) -> Tensor:
        """Restrict a ``[..., P_tensors]`` tensor to the subset's entries."""
        if self.indices is None:
            return flat
        return flat.index_select(dim, self.indices.to(flat.device))

    # ---------------------------------------------------------- computations
    @abstractmethod
    def batch(
        self, quantity: Quantity, inputs: Any, targets: Tensor
    ) -> tuple[Tensor, Tensor | KronFactors]:
        """The model output and the batch's contribution to ``quantity``.

        Raises:
            ValueError: If output and targets do not fit the likelihood.
        """

    def accumulate_dense(
        self, inputs: Any, targets: Tensor, total: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """The output and ``total`` plus the batch's dense GGN (in place if given)."""
        output, value = self.batch(Quantity.DENSE, inputs, targets)
        return output, value if total is None else total.add_(value)

    @abstractmethod
    def curvature_matmul(
        self, data: Iterable[tuple[Any, Tensor]]
    ) -> Callable[[Tensor], Tensor]:
        r"""Products :math:`V \mapsto H V` with the curvature over ``data``.

        ``V: [P, k]``.

        Each product is one pass over ``data``; used by ``lowrank`` for subsets too
        large for a dense GGN (see :mod:`bayescurv.laplace.sources.eigen`).
        """

    @abstractmethod
    def jacobians(self, inputs: Any) -> tuple[Tensor, Tensor]:
        """Output ``[N, C]`` and its Jacobian w.r.t. the subset, ``[N, C, P]``."""

    @abstractmethod
    def output(self, inputs: Any) -> Tensor:
        """The output ``[N, C]`` of the model as the GLM sees it (no Jacobians)."""

    def state(self) -> dict[str, Any]:
        """What identifies the subset, for a posterior's ``state_dict``."""
        return {
            "names": self.block_names,
            "shapes": [list(p.shape) for p in self.parameters.values()],
            "indices": self.indices,
        }

    def check_state(self, state: dict[str, Any]) -> None:
        """Raise unless a saved :meth:`state` describes this subset of this model.

        Raises:
            ValueError: Naming the first difference: other parameter tensors, other
                shapes (another architecture) or other subnetwork entries.
        """
        if list(state["names"]) != self.block_names:
            raise ValueError(
                "the saved Laplace approximation covers other weights: saved "
                f"{list(state['names'])}, here {self.block_names}."
            )
        here = [list(p.shape) for p in self.parameters.values()]
        for name, saved, current in zip(
            self.block_names, state["shapes"], here, strict=True
        ):
            if list(saved) != current:
                raise ValueError(
                    f"the saved Laplace approximation belongs to another model: "
                    f"parameter {name!r} had shape {list(saved)}, this model's has "
                    f"{current}."
                )
        if not _same(state["indices"], self.indices):
            raise ValueError(
                "the saved Laplace approximation covers other subnetwork entries."
            )


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool((a.cpu() == b.cpu()).all())
