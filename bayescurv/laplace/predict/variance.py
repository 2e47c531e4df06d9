r"""The functional variance :math:`J_n \Lambda^{-1} J_n^\top` from a segmented Jacobian.

The posterior precision is a list of independently factorized diagonal blocks
(:meth:`~bayescurv.curvature.CurvatureMatrix.factorized_blocks`); each block's
contribution has a closed form in the factorization and the block's Jacobian
segments (:mod:`bayescurv.laplace.sources.jacobians`), so factored (linear-layer)
segments are never expanded:

* diagonal :math:`\Sigma = \operatorname{diag}(\sigma)`:
  :math:`J \operatorname{diag}(\sigma) J^\top`, for a linear layer
  :math:`G_n \operatorname{diag}(u_n) G_n^\top` with
  :math:`u_{n,o} = \sum_i a_{n,i}^2 \sigma_{o,i}`;
* Kronecker eigenbasis (``kron``) on one linear segment: with
  :math:`\Lambda_W = (Q_B \otimes Q_A) \operatorname{diag}(e) (Q_B \otimes Q_A)^\top`,
  :math:`J_n = G_n \otimes a_n^\top` gives
  :math:`J_n (Q_B \otimes Q_A) = (G_n Q_B) \otimes (Q_A^\top a_n)^\top`, hence

  .. math::
      J_n \Sigma_W J_n^\top = \tilde G_n \operatorname{diag}(v_n) \tilde G_n^\top,
      \qquad \tilde G_n = G_n Q_B, \quad
      v_{n,o} = \sum_i \frac{(Q_A^\top a_n)_i^2}{e_{o,i}},

  :math:`O(\mathrm{in}^2 + C\,\mathrm{out}^2 + \mathrm{out}\cdot\mathrm{in})` per
  sample, never a Kronecker product (the last layer is :math:`G_n = I`);
* Cholesky :math:`\Lambda = L L^\top` (``full``) and eigenbases of other shapes:
  a root :math:`R` (:math:`L^{-\top}` or :math:`Q \operatorname{diag}(e^{-1/2})`),
  :math:`J \Sigma J^\top = (J R)(J R)^\top` with :math:`J R` computed segment-wise;
* low rank (``lowrank``): Woodbury, :math:`J D^{-1} J^\top - (J D^{-1} G_r)
  K^{-1} (J D^{-1} G_r)^\top`, or the isotropic form :math:`J J^\top / c + (J U)
  \operatorname{diag}(w) (J U)^\top`, from products with ``[n, k]`` matrices.

Blocks whose segments are all explicit use the structure's own
:meth:`~bayescurv.curvature.factorizations.Factorization.inv_quad_batch`, as does
any factorization without a closed form here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
from bayescurv.laplace.sources.jacobians import LinearSegment, SegmentedJacobian

Form = Callable[[Any, SegmentedJacobian, slice, bool], Tensor | None]
"""``form(factorization, jacobian, block, diagonal)``; ``None`` if not applicable."""


def _from_root(product: Tensor | None, diagonal: bool) -> Tensor | None:
    r""":math:`(J R)(J R)^\top` (or its diagonal) from :math:`J R`, ``[N, C, r]``."""
    if product is None:
        return None
    return product.square().sum(-1) if diagonal else product @ product.mT


def _diagonal_form(
    f: DiagonalFactorization, jac: SegmentedJacobian, block: slice, diagonal: bool
) -> Tensor | None:
    return jac.gram(block, f.entries.reciprocal().to(jac.dtype), diagonal)


def _spectral_form(
    f: SpectralFactorization, jac: SegmentedJacobian, block: slice, diagonal: bool
) -> Tensor | None:
    inverse = f.inverse_eigenvalues
    segment = jac.single(block)
    if isinstance(segment, LinearSegment):
        expected = (segment.out_features,)
        if segment.inputs is not None:
            expected = (segment.out_features, segment.inputs.shape[-1])
        if f.basis.sizes == expected:
            return segment.kron_inverse(f.basis.factor_rotations(), inverse, diagonal)
    eye = torch.eye(inverse.shape[0], dtype=inverse.dtype, device=inverse.device)
    root = f.basis.unrotate(eye * inverse.sqrt())  # Q diag(e^{-1/2})
    return _from_root(jac.matmul(block, root), diagonal)


# NOTE [Cholesky: whiten the Jacobian or the identity]
# (J R)(J R)^T with R = L^{-T} costs a triangular solve with n right-hand sides (the
# identity) plus the segment-wise product; whitening the explicit Jacobian, L^{-1}
# J^T, costs one with N*C right-hand sides. The smaller of the two wins: for a test
# batch smaller than the subset (e.g. 3,970 rows against 7,510 parameters) the
# explicit Jacobian halves the cubic part.
def _cholesky_form(
    f: CholeskyFactorization, jac: SegmentedJacobian, block: slice, diagonal: bool
) -> Tensor | None:
    if jac.num_samples * jac.num_outputs < f.size:
        return None  # the caller whitens the explicit Jacobian (see NOTE)
    eye = torch.eye(f.size, dtype=f.factor.dtype, device=f.factor.device)
    root = torch.linalg.solve_triangular(f.factor.mT, eye, upper=True)  # L^{-T}
    return _from_root(jac.matmul(block, root), diagonal)


def _woodbury_form(
    f: WoodburyFactorization, jac: SegmentedJacobian, block: slice, diagonal: bool
) -> Tensor | None:
    base = jac.gram(block, f.diag.reciprocal(), diagonal)
    projected = jac.matmul(block, f.scaled_root)  # J D^{-1} G, [N, C, k]
    if base is None or projected is None:
        return None
    whitened = torch.linalg.solve_triangular(
        f.capacitance_factor, projected.mT, upper=False
    ).mT  # [N, C, k]
    return base - _from_root(whitened, diagonal)


def _isotropic_form(
    f: IsotropicLowRankFactorization,
    jac: SegmentedJacobian,
    block: slice,
    diagonal: bool,
) -> Tensor | None:
    base = jac.gram(block, f.shift.reciprocal().expand(f.size), diagonal)
    projected = jac.matmul(block, f.basis)  # J U, [N, C, k]
    if base is None or projected is None:
        return None
    on_span = f.eigenvalues.reciprocal() - f.shift.reciprocal()
    if diagonal:
        return base + (projected.square() * on_span).sum(-1)
    return base + (projected * on_span) @ projected.mT


FORMS: dict[type[Factorization], Form] = {
    DiagonalFactorization: _diagonal_form,
    SpectralFactorization: _spectral_form,
    CholeskyFactorization: _cholesky_form,
    WoodburyFactorization: _woodbury_form,
    IsotropicLowRankFactorization: _isotropic_form,
}
"""The closed form of every factorization type (exact type)."""


def functional_variance(
    precision: CurvatureMatrix,
    jac: SegmentedJacobian,
    diagonal: bool = False,
    dtype: torch.dtype | None = None,
) -> Tensor:
    r""":math:`J_n \Lambda^{-1} J_n^\top` per sample (module doc).

    Args:
        precision: The posterior precision over the subset.
        jac: The subset's per-sample Jacobians.
        diagonal: Return only the variances.
        dtype: Cast each block's segments to this dtype (e.g. the precision's)
            just before its term, one block at a time (``None``: as they are).

    Returns:
        ``[N, C, C]``, or ``[N, C]`` if ``diagonal``.
    """
    total = None
    for block, factorization in precision.factorized_blocks():
        sub, local = jac.block(block, dtype)
        form = FORMS.get(type(factorization))
        part = None
        if form is not None and not sub.is_dense(local):
            part = form(factorization, sub, local, diagonal)
        if part is None:
            part = factorization.inv_quad_batch(sub.dense(local))
            if diagonal:
                part = part.diagonal(dim1=-2, dim2=-1)
        total = part if total is None else total + part
    return total
