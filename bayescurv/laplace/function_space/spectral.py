r"""The function-space posterior in one form: anchors, a projection and a spectrum.

Every approximation (exact GP on a subset, Nyström, variational) ends as the same
object. With the kernel :math:`K` at the prior of the fit, the output Hessian roots
:math:`R` and the data scale :math:`s` (:math:`1/T`, or :math:`1/(T\sigma^2)` for
regression) the exact posterior covariance of the linearized network is

.. math::
    \operatorname{Cov}[f_*] = K_{**} - K_{*X} R\,(I/s + R^\top K_{XX} R)^{-1}
    R^\top K_{X*}.

Write :math:`R^\top K_{XX} R = U \operatorname{diag}(\lambda) U^\top` and
:math:`Z_* = K_{*X} R U \operatorname{diag}(\lambda)^{-1/2}`; then

.. math::
    \operatorname{Cov}[f_*] = K_{**} - Z_* \operatorname{diag}\Big(
    \frac{s\lambda}{1 + s\lambda}\Big) Z_*^\top, \qquad
    \log\det(I + s R^\top K_{XX} R) = \sum_i \log(1 + s\lambda_i).

:math:`Z_* = K_{*A} P` is the kernel against a fixed set of *anchor* rows
:math:`A` times a fixed projection :math:`P` (:math:`A = X` and :math:`P = R U
\Lambda^{-1/2}` here; landmarks and :math:`P = T V` for Nyström). A prior changed
by a common factor, :math:`\pi = c\,\pi_{\mathrm{fit}}`, divides the kernel by
:math:`c`, so every hyperparameter enters through :math:`\rho = s / c`:

.. math::
    \operatorname{Cov}[f_*] = \frac1c\Big(K_{**} - Z_* \operatorname{diag}\big(
    \tfrac{\rho\lambda}{1 + \rho\lambda}\big) Z_*^\top\Big),

and the evidence's log determinant costs :math:`O(r)` per evaluation. Nyström adds
Titsias' trace term :math:`\rho \sum_n \operatorname{tr}(W_n (K_{nn} -
Q_{nn}))` (zero when the anchors span the data).

# NOTE [Dropped directions]
# Eigenvalues below round-off (lambda <= r eps max lambda) are dropped: their
# columns of Z are O(sqrt(lambda)) (u^T R^T K R u = lambda bounds K^{1/2} R u), so
# they change the covariance by O(s lambda) and the log determinant by O(s lambda),
# while lambda^{-1/2} would amplify round-off. The softmax's null direction
# (W_n 1 = 0) is one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bayescurv.curvature.linalg import clamp_roundoff, symmetric_eigh
from bayescurv.laplace.function_space.anchors import AnchorRows
from bayescurv.laplace.function_space.rows import JacobianRows, ntk, point_blocks
from bayescurv.laplace.sources.jacobians import SegmentedJacobian


@dataclass(frozen=True)
class Component:
    r"""The posterior on the anchors of one output (or of all outputs).

    Attributes:
        output: The anchors' output (independent outputs), or ``None`` (all).
        projection: :math:`P`, ``[A, r]``: the kernel against the anchors times
            :math:`P` is :math:`Z`.
        eigenvalues: :math:`\lambda`, ``[r]``, positive.
    """

    output: int | None
    projection: Tensor
    eigenvalues: Tensor


@dataclass(frozen=True)
class Projected:
    """A query chunk's covariance before the hyperparameters enter.

    Attributes:
        prior: The prior covariance blocks ``[N, C, C]``, or variances ``[N, C]``
            (``diagonal`` or independent outputs).
        projections: Per component, :math:`Z` ``[N, C, r]`` (or ``[N, r]`` for an
            output's component).
        diagonal: Whether only variances are asked for.
    """

    prior: Tensor
    projections: list[Tensor]
    diagonal: bool


@dataclass(frozen=True)
class SpectralGP:
    r"""A fitted function-space posterior (module doc).

    Attributes:
        anchors: The anchor rows.
        components: One per output (independent outputs) or a single one.
        variances: The prior variance of every parameter tensor at fit, ``[B]``.
        independent: Independent GPs per output (no kernel between outputs).
        trace_gap: :math:`\sum_n \operatorname{tr}(W_n (K_{nn} - Q_{nn}))` at unit
            scale (Nyström, variational), else 0.
        rank_dropped: How many eigenvalues were dropped as round-off (see NOTE).
    """

    anchors: AnchorRows
    components: list[Component]
    variances: Tensor
    independent: bool
    trace_gap: Tensor
    rank_dropped: int = 0

    @property
    def block_sizes(self) -> list[int]:
        """Entries per parameter tensor."""
        return self.anchors.block_sizes

    def log_det(self, ratio: Tensor) -> Tensor:
        r"""The log determinant :math:`\log\det(I + \rho R^\top K R)`.

        :math:`\sum_i \log(1 + \rho\lambda_i)` (+ :math:`\rho\,` trace gap),
        differentiable in :math:`\rho = s / c`.
        """
        total = ratio * self.trace_gap
        for component in self.components:
            total = total + torch.log1p(ratio * component.eigenvalues).sum()
        return total

    def _project(self, rows: JacobianRows, component: Component) -> Tensor:
        r""":math:`Z = K_{*A} P` of a component, ``[R, r]``."""
        cross = self.anchors.cross(
            rows, self.variances, self.independent, component.output
        )
        return cross @ component.projection.to(cross)

    def project(self, jac: SegmentedJacobian, diagonal: bool = False) -> Projected:
        """The hyperparameter-free part of a query chunk's covariance.

        Args:
            jac: Per-sample Jacobians of the query chunk.
            diagonal: Prepare the variances only.
        """
        prior = point_blocks(jac, self.block_sizes, self.variances, diagonal)
        if self.independent and not diagonal:
            prior = prior.diagonal(dim1=-2, dim2=-1)
        projections = []
        rows = (
            None if self.independent else JacobianRows.all_rows(jac, self.block_sizes)
        )
        for component in self.components:
            if self.independent:  # only the component's output has a kernel
                output_rows = JacobianRows.all_rows(
                    jac, self.block_sizes, component.output
                )
                projections.append(self._project(output_rows, component))
            else:
                z = self._project(rows, component)
                projections.append(z.reshape(jac.num_samples, jac.num_outputs, -1))
        return Projected(prior, projections, diagonal)

    def covariance(self, projected: Projected, factor: Tensor, ratio: Tensor) -> Tensor:
        r"""The posterior covariance of a projected chunk, ``[N, C, C]`` (``[N, C]``).

        Args:
            projected: From :meth:`project`.
            factor: :math:`c = \pi / \pi_{\mathrm{fit}}`.
            ratio: :math:`\rho = s / c`.
        """
        prior = projected.prior
        for component, z in zip(self.components, projected.projections, strict=True):
            weights = _posterior_weights(component.eigenvalues, ratio).to(z)
            if self.independent:
                reduction = (z.square() * weights).sum(-1)[:, None]
                index = torch.tensor([component.output], device=z.device)
                prior = prior.index_add(1, index, reduction, alpha=-1)
            elif projected.diagonal:
                prior = prior - (z.square() * weights).sum(-1)
            else:
                prior = prior - (z * weights) @ z.mT
        if self.independent and not projected.diagonal:
            prior = prior.diag_embed()
        return prior / factor

    def joint_covariance(
        self, rows: JacobianRows, factor: Tensor, ratio: Tensor
    ) -> Tensor:
        """The posterior covariance among all query rows, ``[R, R]``."""
        prior = ntk(rows, rows, self.variances, self.independent)
        for component in self.components:
            z = self._project(rows, component)
            weights = _posterior_weights(component.eigenvalues, ratio).to(z)
            prior = prior - (z * weights) @ z.mT
        return (prior + prior.mT) / (2 * factor)


def _posterior_weights(eigenvalues: Tensor, ratio: Tensor) -> Tensor:
    scaled = ratio * eigenvalues
    return scaled / (1 + scaled)


def spectrum(matrix: Tensor, owner: str) -> tuple[Tensor, Tensor, int]:
    r"""Positive eigenpairs of a PSD matrix in float64 (see the NOTE).

    Args:
        matrix: Symmetric PSD ``[n, n]``.
        owner: Named in decomposition errors.

    Returns:
        Eigenvalues ``[r]`` above round-off, their eigenvectors ``[n, r]``, and
        the number dropped.
    """
    values, vectors = symmetric_eigh(matrix.double(), owner)
    values = clamp_roundoff(values)
    size = max(values.shape[0], 1)
    keep = values > size * torch.finfo(values.dtype).eps * values.abs().max()
    return values[keep], vectors[:, keep], int((~keep).sum())
