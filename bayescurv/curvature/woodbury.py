r"""Factorizations of a diagonal plus a positive semi-definite low-rank term.

Both classes never form an ``[n, n]`` matrix (except :meth:`Factorization.inverse`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bayescurv.curvature.factorizations import Factorization
from bayescurv.curvature.linalg import check_positive, cholesky


class WoodburyFactorization(Factorization):
    r"""Diagonal plus low rank, :math:`M = D + G G^\top`, by Woodbury.

    Here :math:`D = \operatorname{diag}(d)` with :math:`d > 0` and :math:`G` is
    ``[n, k]``. With the ``[k, k]`` capacitance matrix
    :math:`K = I + G^\top D^{-1} G = L_K L_K^\top`,

    .. math::
        M^{-1} = D^{-1} - D^{-1} G K^{-1} G^\top D^{-1}, \qquad
        \log\det M = \textstyle\sum_i \log d_i + \log\det K

    (Woodbury identity and matrix determinant lemma). Samples are
    :math:`x = M^{-1} (D^{1/2} z_1 + G z_2)` with :math:`z_1 \in \mathbb{R}^n`,
    :math:`z_2 \in \mathbb{R}^k`: the bracket has covariance :math:`M`, so
    :math:`x` has covariance :math:`M^{-1} M M^{-1} = M^{-1}`.

    Args:
        diag: ``d``, ``[n]``, all positive.
        root: ``G``, ``[n, k]``.
        owner: Name of the structure, used in error messages.
    """

    def __init__(self, diag: Tensor, root: Tensor, owner: str) -> None:
        check_positive(diag, owner)
        self.diag = diag
        self.scaled_root = root / diag[:, None]  # D^{-1} G, [n, k]
        self.root = root
        eye = torch.eye(root.shape[1], dtype=root.dtype, device=root.device)
        self.capacitance_factor = cholesky(eye + root.mT @ self.scaled_root, owner)
        self.size = diag.shape[0]
        self.noise_dim = self.size + root.shape[1]

    def logdet(self) -> Tensor:  # noqa: D102
        log_capacitance = 2 * self.capacitance_factor.diagonal().log().sum()
        return self.diag.log().sum() + log_capacitance

    def solve(self, x: Tensor) -> Tensor:  # noqa: D102
        projected = torch.cholesky_solve(
            self.scaled_root.mT @ x, self.capacitance_factor
        )
        return x / self.diag[:, None] - self.scaled_root @ projected

    def inverse_diagonal(self) -> Tensor:  # noqa: D102
        whitened = self._whiten(self.scaled_root.mT)  # [k, n]
        return self.diag.reciprocal() - whitened.square().sum(0)

    def sample_transform(self, z: Tensor) -> Tensor:  # noqa: D102
        noise, low_rank_noise = z[: self.size], z[self.size :]
        draw = self.diag.sqrt()[:, None] * noise + self.root @ low_rank_noise
        return self.solve(draw)

    def inv_quad_batch(self, jac: Tensor) -> Tensor:  # noqa: D102
        diagonal_part = torch.einsum("ncp,p,ndp->ncd", jac, self.diag.reciprocal(), jac)
        whitened = self._whiten((jac @ self.scaled_root).mT)  # [N, k, C]
        return diagonal_part - whitened.mT @ whitened

    def _whiten(self, x: Tensor) -> Tensor:
        r""":math:`L_K^{-1} x` for ``x: [..., k, K]``."""
        return torch.linalg.solve_triangular(self.capacitance_factor, x, upper=False)

    @property
    def _dtype(self) -> torch.dtype:
        return self.diag.dtype

    @property
    def _device(self) -> torch.device:
        return self.diag.device


class IsotropicLowRankFactorization(Factorization):
    r"""Isotropic plus low rank, :math:`M = c I + U \operatorname{diag}(\sigma) U^\top`.

    Here :math:`U` ``[n, k]`` has orthonormal columns, :math:`\sigma \ge 0` and
    :math:`c > 0`.

    :math:`M` has eigenvalues :math:`e = \sigma + c` on the span of :math:`U` and
    :math:`c` on its complement, so every spectral function is

    .. math::
        f(M) = f(c)\, I + U \operatorname{diag}\big(f(e) - f(c)\big) U^\top

    and costs :math:`O(nk)` per vector with no factorization at all; the log
    determinant :math:`\sum_i \log e_i + (n - k) \log c` costs :math:`O(k)`.

    Args:
        shift: ``c``, a positive 0-d tensor.
        basis: ``U``, ``[n, k]`` orthonormal columns.
        eigenvalues: :math:`\sigma`, ``[k]``, non-negative.
        owner: Name of the structure, used in error messages.
    """

    def __init__(
        self, shift: Tensor, basis: Tensor, eigenvalues: Tensor, owner: str
    ) -> None:
        check_positive(shift.reshape(1), owner)
        self.shift = shift
        self.basis = basis
        self.eigenvalues = eigenvalues + shift
        check_positive(self.eigenvalues, owner)
        self.size = self.noise_dim = basis.shape[0]

    def logdet(self) -> Tensor:  # noqa: D102
        complement = (self.size - self.basis.shape[1]) * self.shift.log()
        return self.eigenvalues.log().sum() + complement

    def solve(self, x: Tensor) -> Tensor:  # noqa: D102
        return self._apply(-1.0, x)

    def inverse_diagonal(self) -> Tensor:  # noqa: D102
        on_span = self.eigenvalues.reciprocal() - self.shift.reciprocal()
        return self.shift.reciprocal() + self.basis.square() @ on_span

    def sample_transform(self, z: Tensor) -> Tensor:  # noqa: D102
        return self._apply(-0.5, z)

    def inv_quad_batch(self, jac: Tensor) -> Tensor:  # noqa: D102
        on_span = self.eigenvalues.reciprocal() - self.shift.reciprocal()
        projected = jac @ self.basis  # [N, C, k]
        isotropic = jac @ jac.mT / self.shift
        return isotropic + torch.einsum("nck,k,ndk->ncd", projected, on_span, projected)

    def _apply(self, power: float, x: Tensor) -> Tensor:
        r""":math:`M^{p} x` for ``x: [n, K]``."""
        on_span = self.eigenvalues.pow(power) - self.shift.pow(power)
        return self.shift.pow(power) * x + self.basis @ (
            on_span[:, None] * (self.basis.mT @ x)
        )

    @property
    def _dtype(self) -> torch.dtype:
        return self.basis.dtype

    @property
    def _device(self) -> torch.device:
        return self.basis.device
