r"""The function-space posterior in one form: anchors and components.

Every approximation (exact GP on a subset, Nyström, variational) ends as the same
object. With the kernel :math:`K` at the prior of the fit, the output Hessian roots
:math:`R` (:math:`W_n = R_n R_n^\top`) and the data scale :math:`s` (:math:`1/T`,
or :math:`1/(T\sigma^2)` for regression) the exact posterior covariance of the
linearized network is

.. math::
    \operatorname{Cov}[f_*] = K_{**} - K_{*X} R\,(I/s + R^\top K_{XX} R)^{-1}
    R^\top K_{X*},
    \qquad \log\det(I + s R^\top K_{XX} R) = \sum_i \log(1 + s\lambda_i)

with :math:`\lambda` the eigenvalues of :math:`R^\top K_{XX} R`. Everything is
expressed through the kernel against fixed *anchor* rows :math:`A` (the training
points for the exact GP, landmarks for Nyström, inducing points for the
variational GP) and one or more components (:mod:`.components`). A prior changed
by a common factor, :math:`\pi = c\,\pi_{\mathrm{fit}}`, divides the kernel by
:math:`c`, so the hyperparameters enter through :math:`c` and :math:`\rho = s / c`:

.. math::
    \operatorname{Cov}[f_*] = \frac1c\Big(K_{**} - K_{*A} R\,(I/\rho + B)^{-1}
    R^\top K_{A*}\Big), \qquad B = R^\top K_{AA} R \text{ at the fit's prior},

and the evidence's log determinant :math:`\sum_i \log(1 + \rho\lambda_i)` costs
:math:`O(r)` per evaluation. Nyström adds Titsias' trace term :math:`\rho \sum_n
\operatorname{tr}(W_n (K_{nn} - Q_{nn}))` (zero when the anchors span the data).

# NOTE [Dropped directions]
# Feature-space eigenvalues below round-off (lambda <= r eps max lambda) are dropped:
# their features phi V are O(sqrt(lambda)) (u^T G u = lambda bounds them), so they
# change the covariance by O(rho lambda) and the log determinant by O(rho lambda),
# while the landmarks' lambda^{-1/2} would amplify round-off. The softmax's null
# direction (W_n 1 = 0) is one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bayescurv.curvature.linalg import clamp_roundoff, symmetric_eigh
from bayescurv.laplace.function_space.anchors import AnchorRows
from bayescurv.laplace.function_space.components import Component
from bayescurv.laplace.function_space.rows import (
    JacobianRows,
    jacobian_like,
    ntk,
    point_blocks,
)
from bayescurv.laplace.sources.jacobians import SegmentedJacobian


@dataclass(frozen=True)
class Projected:
    """A query chunk's covariance before the hyperparameters enter.

    Attributes:
        prior: The prior covariance blocks ``[N, C, C]``, or variances ``[N, C]``
            (``diagonal`` or independent outputs).
        projections: Per component, the whitened kernel against its anchors
            (:meth:`~.components.DualComponent.whiten`), ``[N, C, r]`` (or
            ``[N, r]`` for an output's component).
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
        """The whitened kernel of query rows against a component's anchors."""
        directions = getattr(component, "directions", None)
        if directions is not None:  # features J Sigma_0 J_A^T T V (see .nystrom)
            return rows.matmul(directions, self.block_sizes)
        cross = self.anchors.cross(
            rows, self.variances, self.independent, component.output
        )
        return component.whiten(cross)

    def samples_per_chunk(self, memory_budget: int) -> int:
        """Query samples per chunk within a quarter of the memory budget.

        A chunk holds a few float64 ``[C, A]`` kernels against the anchors per
        sample (cross kernel, whitened, reduced).
        """
        per_sample = 4 * 8 * self.anchors.num_outputs * self.anchors.num_rows
        return max(1, memory_budget // (4 * per_sample))

    def decompose(self) -> None:
        """Prepare for many hyperparameter values (eigenvectors of exact parts)."""
        for component in self.components:
            component.decompose()

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
            directions = getattr(component, "directions", None)
            if directions is not None:  # J(x) D, factored: [N, C, r]
                z = features(jac, directions)
                if self.independent:
                    z = z[:, component.output]
            elif self.independent:  # only the component's output has a kernel
                output_rows = JacobianRows.all_rows(
                    jac, self.block_sizes, component.output
                )
                z = self._project(output_rows, component)
            else:
                z = self._project(rows, component)
                z = z.reshape(jac.num_samples, jac.num_outputs, -1)
            projections.append(z)
        return Projected(prior, projections, diagonal)

    def covariance(self, projected: Projected, factor: Tensor, ratio: Tensor) -> Tensor:
        r"""The posterior covariance of a projected chunk, ``[N, C, C]`` (``[N, C]``).

        Args:
            projected: From :meth:`project`.
            factor: :math:`c = \pi / \pi_{\mathrm{fit}}`.
            ratio: :math:`\rho = s / c`.
        """
        prior = projected.prior.double()
        for component, y in zip(self.components, projected.projections, strict=True):
            z = component.reduce(y.flatten(0, -2), ratio).reshape(*y.shape[:-1], -1)
            if self.independent:
                reduction = z.square().sum(-1)[:, None]
                index = torch.tensor([component.output], device=z.device)
                prior = prior.index_add(1, index, reduction, alpha=-1)
            elif projected.diagonal:
                prior = prior - z.square().sum(-1)
            else:
                prior = prior - z @ z.mT
        if self.independent and not projected.diagonal:
            prior = prior.diag_embed()
        return (prior / factor).to(projected.prior.dtype)

    def joint_covariance(
        self, rows: JacobianRows, factor: Tensor, ratio: Tensor
    ) -> Tensor:
        """The posterior covariance among all query rows, ``[R, R]``."""
        prior = ntk(rows, rows, self.variances, self.independent)
        total = prior.double()
        for component in self.components:
            z = component.reduce(self._project(rows, component), ratio)
            total = total - z @ z.mT
        return ((total + total.mT) / (2 * factor)).to(prior.dtype)


def features(jac: SegmentedJacobian, directions: Tensor) -> Tensor:
    r""":math:`J(x)\, D` per sample, ``[N, C, r]`` (factored segments stay factored)."""
    local = directions.to(jacobian_like(jac))
    product = jac.matmul(slice(0, jac.num_params), local)
    if product is None:  # segments that do not span the subset: explicit
        product = jac.dense() @ local
    return product.to(directions)


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
