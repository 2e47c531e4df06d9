r"""The pieces of a function-space posterior: the exact (dual) and the feature form.

Each component covers the anchors of one output (independent outputs) or of all,
and says how the posterior reduces the prior covariance of a query,

.. math::
    \operatorname{Cov}[f_*] = \frac1c \Big(K_{**} - \sum z_* z_*^\top\Big)

(a sum over the components) from the kernel against its anchors :math:`K_{*A}`
(at the fit's prior) and :math:`\rho = s / c` (:mod:`.spectral`):

* :class:`DualComponent` (the exact GP on ``M`` points, :mod:`.exact`): with the
  output Hessian roots :math:`R` and :math:`B = R^\top K_{AA} R`,
  :math:`z_* z_*^\top = K_{*A} R\,(I/\rho + B)^{-1} R^\top K_{A*}`. The fit needs
  only the eigenvalues of :math:`B` (for the evidence); a prediction factors
  :math:`I/\rho + B` once per :math:`\rho` (Cholesky), or, after
  :meth:`DualComponent.decompose` (grid search: many values of :math:`\rho`), uses
  :math:`B = U \operatorname{diag}(\lambda) U^\top` for every :math:`\rho`;
* :class:`FeatureComponent` (Nyström, variational, :mod:`.nystrom`): features
  :math:`\phi_* = K_{*A} T` and the data term :math:`G = V \operatorname{diag}(\lambda)
  V^\top` in feature space, :math:`z_* = \phi_* V
  \operatorname{diag}\big(\sqrt{\rho\lambda / (1 + \rho\lambda)}\big)`.

# NOTE [Eigenvalues at fit, Cholesky per prediction]
# A symmetric eigendecomposition with eigenvectors costs about 9 n^3 flops (and runs
# single-threaded, see curvature.linalg), eigenvalues alone about 4/3 n^3 and a
# Cholesky factor n^3 / 3. The evidence and its tuning need only the eigenvalues of
# B; the predictive at the tuned hyperparameters needs one Cholesky factor. For
# n = M C = 2,000 this cuts the fit from ~7 s to ~1 s on a loaded 2-core machine.
# Only a grid search over many priors pays for the eigenvectors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bayescurv.curvature.linalg import (
    cholesky,
    clamp_roundoff,
    symmetric_eigh,
    symmetric_eigvalsh,
)


class DualComponent:
    r"""The exact GP on the anchors of one output (or all): see the module doc.

    Args:
        output: The anchors' output (independent outputs) or ``None``.
        roots: :math:`R_n`, ``[M, C, C]`` (all outputs) or the diagonal roots of
            the component's output ``[M]``.
        data_term: :math:`B = R^\top K_{AA} R`, ``[A, A]``.
        eigenvalues: Its eigenvalues (computed if not given).
    """

    kind = "dual"

    def __init__(
        self,
        output: int | None,
        roots: Tensor,
        data_term: Tensor,
        eigenvalues: Tensor | None = None,
    ) -> None:
        self.output = output
        self.roots = roots.double()
        self.data_term = ((data_term + data_term.mT) / 2).double()
        if eigenvalues is None:
            eigenvalues = symmetric_eigvalsh(self.data_term, "FunctionalLaplace")
        self.eigenvalues = clamp_roundoff(eigenvalues.double()).clamp_min(0)
        self._eigenvectors: Tensor | None = None
        self._factor: tuple[float, Tensor] | None = None

    def whiten(self, cross: Tensor) -> Tensor:
        r""":math:`K_{*A} R`, ``[R, A]`` (hyperparameter-free)."""
        cross = cross.double()
        if self.roots.ndim == 1:
            return cross * self.roots
        num, classes = self.roots.shape[:2]
        rows = cross.reshape(-1, num, classes)
        return torch.einsum("rma,mac->rmc", rows, self.roots).reshape(len(cross), -1)

    def reduce(self, whitened: Tensor, ratio: Tensor) -> Tensor:
        r""":math:`z` with :math:`z z^\top = y (I/\rho + B)^{-1} y^\top`."""
        if self._eigenvectors is not None:
            scale = (ratio / (1 + ratio * self.eigenvalues)).sqrt()
            return (whitened @ self._eigenvectors) * scale
        factor = self._cholesky(float(ratio))
        return torch.linalg.solve_triangular(factor, whitened.mT, upper=False).mT

    def decompose(self) -> None:
        r"""Compute the eigenvectors of :math:`B` (for many values of :math:`\rho`)."""
        if self._eigenvectors is None:
            values, vectors = symmetric_eigh(self.data_term, "FunctionalLaplace")
            self.eigenvalues = clamp_roundoff(values).clamp_min(0)
            self._eigenvectors = vectors

    def _cholesky(self, ratio: float) -> Tensor:
        if self._factor is None or self._factor[0] != ratio:
            eye = torch.eye(len(self.data_term), dtype=torch.float64)
            shifted = self.data_term + eye.to(self.data_term) / ratio
            self._factor = (ratio, cholesky(shifted, "FunctionalLaplace"))
        return self._factor[1]

    def state(self) -> dict[str, object]:
        """Tensors and strings for a ``state_dict``."""
        return {
            "kind": self.kind,
            "output": self.output,
            "roots": self.roots,
            "data_term": self.data_term,
            "eigenvalues": self.eigenvalues,
        }


class FeatureComponent:
    r"""Nyström (or variational) features of one output (or all): the module doc.

    Args:
        output: The anchors' output (independent outputs) or ``None``.
        transform: :math:`T`, ``[A, k]`` (features :math:`\phi = K_{*A} T`).
        eigenvalues: :math:`\lambda` of the feature-space data term, ``[r]``.
        eigenvectors: :math:`V`, ``[k, r]``.
        directions: :math:`\Sigma_0 J_A^\top T V`, ``[P, r]``, or ``None``: the
            rotated features are then :math:`J_* \Sigma_0 J_A^\top T V`, one
            product with the query's (factored) Jacobian instead of a kernel
            against the anchors (see :mod:`.nystrom`).
    """

    kind = "feature"

    def __init__(
        self,
        output: int | None,
        transform: Tensor,
        eigenvalues: Tensor,
        eigenvectors: Tensor,
        directions: Tensor | None = None,
    ) -> None:
        self.output = output
        self.transform = transform.double()
        self.eigenvalues = eigenvalues.double()
        self.eigenvectors = eigenvectors.double()
        self.directions = None if directions is None else directions.double()
        self._projection = self.transform @ self.eigenvectors

    def whiten(self, cross: Tensor) -> Tensor:
        r""":math:`\phi_* V = K_{*A} T V`, ``[R, r]``."""
        return cross.double() @ self._projection

    def reduce(self, whitened: Tensor, ratio: Tensor) -> Tensor:
        r"""The reduction :math:`z = \phi_* V D^{1/2}`.

        With :math:`D = \rho\Lambda (I + \rho\Lambda)^{-1}`.
        """
        scaled = ratio * self.eigenvalues
        return whitened * (scaled / (1 + scaled)).sqrt()

    def decompose(self) -> None:
        """Nothing to do: the feature space is decomposed at fit."""

    def state(self) -> dict[str, object]:
        """Tensors and strings for a ``state_dict``."""
        return {
            "kind": self.kind,
            "output": self.output,
            "transform": self.transform,
            "eigenvalues": self.eigenvalues,
            "eigenvectors": self.eigenvectors,
            "directions": self.directions,
        }


Component = DualComponent | FeatureComponent


def component_from_state(state: dict[str, object]) -> Component:
    """A component saved with ``state()``."""
    values = {k: v for k, v in state.items() if k != "kind"}
    if state["kind"] == DualComponent.kind:
        return DualComponent(**values)  # type: ignore[arg-type]
    return FeatureComponent(**values)  # type: ignore[arg-type]
