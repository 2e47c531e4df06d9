r"""A Gaussian with a structured precision as a Pyro (and torch) distribution.

:class:`StructuredNormal` is :math:`\mathcal{N}(\mu, \Lambda^{-1})` for any
:class:`~bayescurv.curvature.CurvatureMatrix` :math:`\Lambda` (diagonal, Kronecker
blocks, low rank plus diagonal, dense). Every operation goes through the structure,
so no ``[P, P]`` covariance is formed unless asked for
(:attr:`~StructuredNormal.covariance_matrix`):

.. math::
    \log p(x) = -\tfrac12 (x - \mu)^\top \Lambda (x - \mu)
    + \tfrac12 \log\det\Lambda - \tfrac{P}{2} \log 2\pi, \qquad
    H = \tfrac{P}{2} (1 + \log 2\pi) - \tfrac12 \log\det\Lambda,

with the quadratic form from the structure's matrix-free product
(:meth:`~bayescurv.curvature.CurvatureMatrix.mvp`), the log determinant and draws
from its factorization, and the marginal variances from ``inverse_diagonal``.

This module imports Pyro, so ``bayescurv.curvature`` does not import it eagerly:
``from bayescurv.curvature.normal import StructuredNormal``.
"""

from __future__ import annotations

import math

import torch
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor

from bayescurv.curvature.base import CurvatureMatrix


class StructuredNormal(TorchDistribution):
    r"""The Gaussian :math:`\mathcal{N}(\mu, \Lambda^{-1})`, :math:`\Lambda` structured.

    A Pyro distribution (usable at ``pyro.sample`` sites, in guides, with
    ``Predictive``) and a ``torch.distributions.Distribution``. Its event is the flat
    parameter vector ``[P]``; a batched ``loc`` ``[..., P]`` shares the precision.

    Args:
        loc: :math:`\mu`, ``[..., P]`` with ``P = precision.num_params``, of the
            precision's dtype and device (may require grad: ``rsample`` and
            ``log_prob`` are differentiable in it).
        precision: :math:`\Lambda`, positive definite (e.g. a posterior precision).
        validate_args: torch's argument and sample validation.

    Raises:
        TypeError: If ``precision`` is not a ``CurvatureMatrix``.
        ValueError: If ``loc`` does not end in ``P`` or has another dtype or device.

    Example:
        >>> import math, torch
        >>> from bayescurv.curvature import Diagonal
        >>> precision = Diagonal(torch.tensor([4.0, 1.0], dtype=torch.float64))
        >>> d = StructuredNormal(torch.zeros(2, dtype=torch.float64), precision)
        >>> d.variance
        tensor([0.2500, 1.0000], dtype=torch.float64)
        >>> math.isclose(d.log_prob(torch.zeros(2).double()).item(),
        ...              0.5 * math.log(4.0) - math.log(2 * math.pi))
        True
    """

    arg_constraints = {"loc": constraints.real_vector}  # noqa: RUF012
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self,
        loc: Tensor,
        precision: CurvatureMatrix,
        validate_args: bool | None = None,
    ) -> None:
        if not isinstance(precision, CurvatureMatrix):
            raise TypeError(
                "StructuredNormal: precision must be a bayescurv.curvature."
                f"CurvatureMatrix, got {type(precision).__name__}."
            )
        size = precision.num_params
        if not isinstance(loc, Tensor) or loc.ndim < 1 or loc.shape[-1] != size:
            shape = list(loc.shape) if isinstance(loc, Tensor) else type(loc).__name__
            raise ValueError(
                f"StructuredNormal: expected loc of shape [..., {size}] (the "
                f"precision's P), got {shape}."
            )
        if loc.dtype != precision.dtype or loc.device != precision.device:
            raise ValueError(
                f"StructuredNormal: loc is {loc.dtype} on {loc.device} but the "
                f"precision is {precision.dtype} on {precision.device}; convert one "
                "(e.g. precision.to(loc))."
            )
        self.loc = loc
        self.precision = precision
        super().__init__(loc.shape[:-1], loc.shape[-1:], validate_args=validate_args)

    # -------------------------------------------------------------- moments
    @property
    def mean(self) -> Tensor:
        r""":math:`\mu`, ``[..., P]``."""
        return self.loc

    @property
    def variance(self) -> Tensor:
        r"""The marginal variances :math:`\operatorname{diag}(\Lambda^{-1})`.

        Returns:
            ``[..., P]``, from the structure's ``inverse_diagonal``.
        """
        return self.precision.inverse_diagonal().expand(self.loc.shape)

    @property
    def covariance_matrix(self) -> Tensor:
        r"""The dense covariance :math:`\Lambda^{-1}`, ``[..., P, P]`` (formed here)."""
        size = self.precision.num_params
        return self.precision.inverse().expand(*self.batch_shape, size, size)

    @property
    def precision_matrix(self) -> Tensor:
        r"""The dense precision :math:`\Lambda`, ``[..., P, P]`` (formed here)."""
        size = self.precision.num_params
        return self.precision.dense().expand(*self.batch_shape, size, size)

    # ------------------------------------------------------------- sampling
    def rsample(
        self,
        sample_shape: torch.Size | tuple[int, ...] = torch.Size(),  # noqa: B008
        generator: torch.Generator | None = None,
    ) -> Tensor:
        r"""Reparameterized draws :math:`\mu + \Lambda^{-1/2} z`.

        Args:
            sample_shape: Leading shape of independent draws.
            generator: Source of randomness (default: torch's global generator).

        Returns:
            ``[*sample_shape, ..., P]``.
        """
        shape = self._extended_shape(torch.Size(sample_shape))
        count = math.prod(shape[:-1])
        if count == 0:
            return self.loc.new_empty(shape)
        noise = self.precision.sample(count, generator=generator)
        return self.loc + noise.reshape(shape)

    def sample(
        self,
        sample_shape: torch.Size | tuple[int, ...] = torch.Size(),  # noqa: B008
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draws without gradients; see :meth:`rsample`."""
        with torch.no_grad():
            return self.rsample(sample_shape, generator)

    # -------------------------------------------------------------- densities
    def log_prob(self, value: Tensor) -> Tensor:
        r"""Log density of ``value`` ``[..., P]``, shape ``[...]`` (broadcast).

        The quadratic form :math:`(x - \mu)^\top \Lambda (x - \mu)` is one
        matrix-free product with all points as columns.
        """
        if self._validate_args:
            self._validate_sample(value)
        diff = value - self.loc
        flat = diff.reshape(-1, diff.shape[-1])
        quadratic = (flat * self.precision.mvp(flat.mT).mT).sum(-1)
        size = self.precision.num_params
        normalizer = self.precision.logdet() - size * math.log(2 * math.pi)
        return 0.5 * (normalizer - quadratic.reshape(diff.shape[:-1]))

    def entropy(self) -> Tensor:
        r"""Differential entropy, ``[...]`` (the batch shape)."""
        size = self.precision.num_params
        value = 0.5 * (size * (1 + math.log(2 * math.pi)) - self.precision.logdet())
        return value.expand(self.batch_shape)

    # ---------------------------------------------------------------- shapes
    def expand(
        self, batch_shape: torch.Size | tuple[int, ...], _instance: object = None
    ) -> StructuredNormal:
        """The same distribution with ``loc`` broadcast to ``batch_shape``.

        Args:
            batch_shape: The new batch shape (``loc``'s must broadcast to it).
            _instance: Unused (torch's signature).
        """
        del _instance
        loc = self.loc.expand(*batch_shape, self.precision.num_params)
        return StructuredNormal(loc, self.precision, validate_args=False)

    def __repr__(self) -> str:
        return (
            f"StructuredNormal(loc: {list(self.loc.shape)}, "
            f"precision: {self.precision!r})"
        )
