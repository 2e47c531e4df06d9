r"""The last layer's functional variance in closed form from its input features.

For the last ``nn.Linear`` layer :math:`f = W\phi + b` the per-sample Jacobian w.r.t.
the row-major weight and the bias is :math:`J_n = [I_C \otimes \phi_n^\top, I_C]`,
so :math:`J_n \Sigma J_n^\top` needs no Jacobian, only the features
:math:`\phi \in \mathbb{R}^{N \times d}` and the factorized posterior blocks
(:meth:`~bayescurv.curvature.CurvatureMatrix.factorized_blocks`), one closed form per
factorization:

* diagonal :math:`\Sigma = \operatorname{diag}(\sigma)`: a diagonal output
  covariance, :math:`\sum_i \phi_{n,i}^2 \sigma_{c,i} + \sigma_{b,c}`;
* Kronecker eigenbasis (``kron``): with :math:`\Lambda_W = (Q_B \otimes Q_A)
  \operatorname{diag}(e) (Q_B \otimes Q_A)^\top` and :math:`\psi_n = Q_A^\top
  \phi_n`, :math:`(I_C \otimes \phi_n^\top)(Q_B \otimes Q_A) = Q_B \otimes
  \psi_n^\top`, hence

  .. math::
      J_n \Sigma_W J_n^\top = Q_B \operatorname{diag}(v_n) Q_B^\top, \qquad
      v_{n,c} = \sum_i \frac{\psi_{n,i}^2}{e_{c,i}},

  :math:`O(N C d + N C^2)` after the factors' eigendecompositions, never a
  Kronecker product;
* Cholesky :math:`\Lambda = L L^\top` (``full``): the root :math:`R = L^{-\top}`,
  :math:`J_n \Sigma J_n^\top = (J_n R)(J_n R)^\top` with :math:`J_n R` a contraction
  of :math:`\phi_n` with the rows of :math:`R` (:math:`O(N C P d)`, no ``[N, C, P]``
  Jacobian); an eigenbasis root :math:`Q \operatorname{diag}(e^{-1/2})` likewise;
* low rank (``lowrank``): Woodbury, :math:`J D^{-1} J^\top - (J D^{-1} G) K^{-1}
  (J D^{-1} G)^\top`, or the isotropic form :math:`J J^\top / c + (J U)
  \operatorname{diag}(w) (J U)^\top`, each from :math:`J` applied to ``[P, k]``.

Any other factorization falls back to the explicit Jacobian of its block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from bayescurv.curvature import CurvatureMatrix
from bayescurv.curvature.factorizations import (
    CholeskyFactorization,
    DiagonalFactorization,
    Factorization,
    SpectralFactorization,
)
from bayescurv.curvature.woodbury import (
    IsotropicLowRankFactorization,
    WoodburyFactorization,
)


@dataclass
class LastLayerJacobian:
    r""":math:`J_n = [I_C \otimes \phi_n^\top, I_C]` over ``[weight (C d), bias (C)]``.

    Attributes:
        features: :math:`\phi`, ``[N, d]``.
        classes: ``C``.
        has_bias: Whether the bias (the last ``C`` entries) is in the subset.
    """

    features: Tensor
    classes: int
    has_bias: bool

    @property
    def width(self) -> int:
        """``d``."""
        return self.features.shape[1]

    @property
    def num_params(self) -> int:
        """``P = C d (+ C)``."""
        return self.classes * (self.width + self.has_bias)

    def _parts(self, block: slice) -> tuple[bool, bool] | None:
        """Whether a block holds the weight and the bias, ``None`` if it splits one."""
        weight_end = self.classes * self.width
        bounds = {
            (0, weight_end): (True, False),
            (weight_end, self.num_params): (False, True),
            (0, self.num_params): (True, self.has_bias),
        }
        if not self.has_bias:
            bounds = {(0, weight_end): (True, False)}
        return bounds.get((block.start, block.stop))

    def matmul(self, block: slice, matrix: Tensor) -> Tensor | None:
        r""":math:`J_n M` for the rows ``M: [n, r]`` of a block, ``[N, C, r]``."""
        parts = self._parts(block)
        if parts is None:
            return None
        weight, bias = parts
        out, start = 0, 0
        if weight:
            size = self.classes * self.width
            rows = matrix[:size].reshape(self.classes, self.width, -1)
            out = torch.einsum("ni,cir->ncr", self.features, rows)
            start = size
        if bias:
            out = out + matrix[start : start + self.classes]
        return out.expand(self.features.shape[0], *out.shape[-2:])

    def gram_diagonal(self, block: slice, weights: Tensor) -> Tensor | None:
        r"""The diagonal output covariance :math:`J_n \operatorname{diag}(w) J_n^\top`.

        Returns:
            Its diagonal ``[N, C]`` (the off-diagonal entries are zero).
        """
        parts = self._parts(block)
        if parts is None:
            return None
        weight, bias = parts
        out, start = 0, 0
        if weight:
            size = self.classes * self.width
            out = self.features.square() @ weights[:size].reshape(self.classes, -1).mT
            start = size
        if bias:
            out = out + weights[start : start + self.classes]
        return out.expand(self.features.shape[0], self.classes)

    def is_weight(self, block: slice) -> bool:
        """Whether a block is exactly the weight."""
        return self._parts(block) == (True, False)

    def rows(self, start: int, stop: int) -> LastLayerJacobian:
        """The Jacobian of samples ``start:stop``."""
        return LastLayerJacobian(self.features[start:stop], self.classes, self.has_bias)

    def dense(self, block: slice = slice(None)) -> Tensor:
        """The explicit Jacobian ``[N, C, P]`` (restricted to a block)."""
        num = self.features.shape[0]
        eye = torch.eye(self.classes, dtype=self.features.dtype, device=self._device)
        weight = eye[None, :, :, None] * self.features[:, None, None, :]
        parts = [weight.reshape(num, self.classes, -1)]
        if self.has_bias:
            parts.append(eye.expand(num, self.classes, self.classes))
        return torch.cat(parts, dim=2)[..., block]

    @property
    def _device(self) -> torch.device:
        return self.features.device


Form = Callable[[Factorization, LastLayerJacobian, slice, bool], Tensor | None]


def _from_root(product: Tensor | None, diagonal: bool) -> Tensor | None:
    r""":math:`(J R)(J R)^\top` (or its diagonal) from :math:`J R`, ``[N, C, r]``."""
    if product is None:
        return None
    return product.square().sum(-1) if diagonal else product @ product.mT


def _as_output(diag: Tensor | None, diagonal: bool) -> Tensor | None:
    if diag is None or diagonal:
        return diag
    return torch.diag_embed(diag)


def _diagonal_form(
    f: DiagonalFactorization, jac: LastLayerJacobian, block: slice, diagonal: bool
) -> Tensor | None:
    return _as_output(jac.gram_diagonal(block, f.entries.reciprocal()), diagonal)


def _spectral_form(
    f: SpectralFactorization, jac: LastLayerJacobian, block: slice, diagonal: bool
) -> Tensor | None:
    inverse = f.eigenvalues.reciprocal()
    if jac.is_weight(block) and f.basis.sizes == (jac.classes, jac.width):
        q_out, q_in = f.basis.factor_eigenvectors
        weights = inverse.reshape(jac.classes, jac.width)
        v = (jac.features @ q_in).square() @ weights.mT  # [N, C]
        if diagonal:
            return v @ q_out.square().mT
        return (q_out * v[:, None, :]) @ q_out.mT
    size = inverse.shape[0]
    eye = torch.eye(size, dtype=inverse.dtype, device=inverse.device)
    root = f.basis.unrotate(eye * inverse.sqrt())  # Q diag(e^{-1/2})
    return _from_root(jac.matmul(block, root), diagonal)


def _cholesky_form(
    f: CholeskyFactorization, jac: LastLayerJacobian, block: slice, diagonal: bool
) -> Tensor | None:
    eye = torch.eye(f.size, dtype=f.factor.dtype, device=f.factor.device)
    root = torch.linalg.solve_triangular(f.factor.mT, eye, upper=True)  # L^{-T}
    return _from_root(jac.matmul(block, root), diagonal)


def _woodbury_form(
    f: WoodburyFactorization, jac: LastLayerJacobian, block: slice, diagonal: bool
) -> Tensor | None:
    base = jac.gram_diagonal(block, f.diag.reciprocal())
    projected = jac.matmul(block, f.scaled_root)  # J D^{-1} G, [N, C, k]
    if base is None or projected is None:
        return None
    whitened = torch.linalg.solve_triangular(
        f.capacitance_factor, projected.mT, upper=False
    ).mT  # [N, C, k]
    if diagonal:
        return base - whitened.square().sum(-1)
    return torch.diag_embed(base) - whitened @ whitened.mT


def _isotropic_form(
    f: IsotropicLowRankFactorization,
    jac: LastLayerJacobian,
    block: slice,
    diagonal: bool,
) -> Tensor | None:
    weights = f.shift.reciprocal().expand(f.size)
    base = jac.gram_diagonal(block, weights)
    projected = jac.matmul(block, f.basis)  # J U, [N, C, k]
    if base is None or projected is None:
        return None
    on_span = f.eigenvalues.reciprocal() - f.shift.reciprocal()
    if diagonal:
        return base + (projected.square() * on_span).sum(-1)
    return torch.diag_embed(base) + (projected * on_span) @ projected.mT


FORMS: dict[type[Factorization], Form] = {
    DiagonalFactorization: _diagonal_form,
    SpectralFactorization: _spectral_form,
    CholeskyFactorization: _cholesky_form,
    WoodburyFactorization: _woodbury_form,
    IsotropicLowRankFactorization: _isotropic_form,
}
"""Closed form per factorization type (exact type; others use the explicit block)."""


def last_layer_variance(
    precision: CurvatureMatrix, jac: LastLayerJacobian, diagonal: bool = False
) -> Tensor:
    r""":math:`J_n \Lambda^{-1} J_n^\top` per sample, in closed form (module doc).

    Args:
        precision: The posterior precision over ``[weight, bias]``.
        jac: The last layer's Jacobian (its features).
        diagonal: Return only the variances.

    Returns:
        ``[N, C, C]``, or ``[N, C]`` if ``diagonal``.
    """
    total = None
    for block, factorization in precision.factorized_blocks():
        form = FORMS.get(type(factorization))
        part = None if form is None else form(factorization, jac, block, diagonal)
        if part is None:  # unknown factorization, or a block splitting a tensor
            part = factorization.inv_quad_batch(jac.dense(block))
            if diagonal:
                part = part.diagonal(dim1=-2, dim2=-1)
        total = part if total is None else total + part
    return total
