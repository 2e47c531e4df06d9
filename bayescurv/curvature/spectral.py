r"""Kronecker-factored eigenbases, decomposed once and shared.

For symmetric factors :math:`F_i = Q_i \operatorname{diag}(\lambda_i) Q_i^\top`,

.. math::
    F_1 \otimes \dots \otimes F_m
    = (Q_1 \otimes \dots \otimes Q_m)\,
      \operatorname{diag}(\lambda_1 \otimes \dots \otimes \lambda_m)\,
      (Q_1 \otimes \dots \otimes Q_m)^\top ,

so :math:`s\, (F_1 \otimes \dots \otimes F_m) + \pi I` has the same eigenvectors and
eigenvalues :math:`s\, \lambda_{1,i} \cdots \lambda_{m,j} + \pi`: damping and scaling
are exact and cost :math:`O(n)` once the factors are decomposed. A dense matrix is the
case :math:`m = 1`.

A grouped block (a grouped convolution's weight) is block-diagonal with ``G``
Kronecker products :math:`F_{g,1} \otimes \dots \otimes F_{g,m}`: its factors and
their eigenpairs carry a leading group axis, ``[G, n_i, n_i]`` and ``[G, n_i]``, and
vectors are flattened group-major.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import reduce

from torch import Tensor

from bayescurv.curvature.linalg import (
    clamp_roundoff,
    eigh_with_rotation,
    mode_products,
    symmetric_eigh,
)
from bayescurv.curvature.rotation import Rotation


class KronEigenbasis:
    r"""The eigendecomposition of :math:`F_1 \otimes \dots \otimes F_m`.

    Vectors are flattened row-major over the factor sizes ``[n_1, ..., n_m]``.

    Attributes:
        factor_eigenvalues: ``m`` tensors ``[n_i]`` (``[G, n_i]`` if grouped).
        factor_eigenvectors: ``m`` orthonormal tensors ``[n_i, n_i]`` (columns;
            ``[G, n_i, n_i]`` if grouped).
        sizes: ``(n_1, ..., n_m)``, per group if grouped.
        groups: ``G`` for a grouped block (see the module docstring), else ``0``.
    """

    def __init__(
        self,
        eigenvalues: Sequence[Tensor],
        eigenvectors: Sequence[Tensor],
        rotations: Sequence[Rotation] | None = None,
    ) -> None:
        self.factor_eigenvalues = tuple(eigenvalues)
        self.factor_eigenvectors = tuple(eigenvectors)
        self.sizes = tuple(q.shape[-1] for q in self.factor_eigenvectors)
        first = self.factor_eigenvectors[0]
        self.groups = first.shape[0] if first.dim() == 3 else 0
        self._rotations = None if rotations is None else tuple(rotations)

    @classmethod
    def decompose(cls, factors: Sequence[Tensor], owner: str) -> KronEigenbasis:
        """Eigendecompose every symmetric PSD factor ``[n_i, n_i]``.

        Negative eigenvalues within round-off are zeroed (see
        :func:`~bayescurv.curvature.linalg.clamp_roundoff`): in a Kronecker product
        a factor's round-off is multiplied by the other factor's largest eigenvalue,
        so a tiny prior precision would otherwise leave the precision indefinite.
        """
        if factors[0].dim() == 3:  # grouped: batched decompositions, dense products
            pairs = [symmetric_eigh(factor, owner) for factor in factors]
            return cls([clamp_roundoff(p[0]) for p in pairs], [p[1] for p in pairs])
        triples = [eigh_with_rotation(factor, owner) for factor in factors]
        return cls(
            [clamp_roundoff(t[0]) for t in triples],
            [t[1] for t in triples],
            [t[2] for t in triples],
        )

    @property
    def numel(self) -> int:
        r"""Size :math:`n = n_1 \cdots n_m` of the Kronecker product (times ``G``)."""
        return max(self.groups, 1) * reduce(int.__mul__, self.sizes, 1)

    def eigenvalues(self) -> Tensor:
        r"""Eigenvalues :math:`\lambda_1 \otimes \dots \otimes \lambda_m`, ``[n]``."""
        return reduce(_outer, self.factor_eigenvalues).flatten()

    def _grid(self, x: Tensor) -> Tensor:
        """``x: [n, *rest]`` as ``[(G,) n_1, ..., n_m, -1]``."""
        groups = (self.groups,) if self.groups else ()
        return x.reshape(*groups, *self.sizes, -1)

    def _modes(self, tensor: Tensor, matrices: Sequence[Tensor]) -> Tensor:
        return mode_products(tensor, matrices, grouped=bool(self.groups))

    def rotate(self, x: Tensor) -> Tensor:
        r"""Coordinates in the eigenbasis, :math:`Q^\top x`.

        Args:
            x: ``[n, K]``.

        Returns:
            ``[n, K]``.
        """
        transposed = [q.mT for q in self.factor_eigenvectors]
        return self._modes(self._grid(x), transposed).reshape(x.shape)

    def rotate_rows(self, x: Tensor) -> Tensor:
        r"""Eigenbasis coordinates of the rows of ``x``, :math:`x Q`, ``[K, n]``.

        The row layout keeps the ``K`` axis leading, so two factors need just two
        batched matrix products, :math:`Q_1^\top X_k Q_2` for ``X_k: [n_1, n_2]``,
        and no transposed copies (the common case of ``inv_quad_form_batch``).
        """
        rows = x.shape[0]
        groups = (self.groups,) if self.groups else ()
        if len(self.sizes) == 1 and not groups:
            return x @ self.factor_eigenvectors[0]
        if len(self.sizes) == 2:  # a group axis broadcasts: [G, n, n] @ [K, G, n, m]
            first, second = self.factor_eigenvectors
            grid = x.reshape(rows, *groups, *self.sizes)
            return (first.mT @ grid @ second).reshape(rows, -1)
        return self.rotate(x.mT).mT

    def factor_rotations(self) -> tuple[Rotation, ...]:
        r"""Per factor, :math:`x \mapsto x Q_i` (exact unit eigenvectors skipped).

        Recorded by the decomposition, or read off the eigenvectors on first use
        (see NOTE [Rotations that skip exact unit eigenvectors] in
        :mod:`bayescurv.curvature.rotation`).
        """
        if self._rotations is None:
            self._rotations = tuple(Rotation.of(q) for q in self.factor_eigenvectors)
        return self._rotations

    def unrotate(self, y: Tensor) -> Tensor:
        r"""Back from eigenbasis coordinates, :math:`Q y`, ``[n, K] -> [n, K]``."""
        return self._modes(self._grid(y), self.factor_eigenvectors).reshape(y.shape)

    def apply(self, weights: Tensor, x: Tensor) -> Tensor:
        r""":math:`Q \operatorname{diag}(w) Q^\top x` for ``w: [n]``, ``x: [n, K]``."""
        return self.unrotate(weights[:, None] * self.rotate(x))

    def diagonal(self, weights: Tensor) -> Tensor:
        r"""Diagonal of :math:`Q \operatorname{diag}(w) Q^\top`, ``[n]``.

        Entry :math:`(r_1, \dots, r_m)` is
        :math:`\sum_{i_1..i_m} w_{i_1..i_m} \prod_k Q_k[r_k, i_k]^2`: mode products
        with the squared eigenvector matrices.
        """
        squares = [q.square() for q in self.factor_eigenvectors]
        return self._modes(self._grid(weights), squares).flatten()

    def map(self, fn: Callable[[Tensor], Tensor]) -> KronEigenbasis:
        """A new basis with ``fn`` applied to every tensor (e.g. ``.to(...)``)."""
        return KronEigenbasis(
            [fn(v) for v in self.factor_eigenvalues],
            [fn(q) for q in self.factor_eigenvectors],
        )

    def state_dict(self) -> dict[str, list[Tensor]]:
        """The factor eigenpairs as plain tensors."""
        return {
            "eigenvalues": list(self.factor_eigenvalues),
            "eigenvectors": list(self.factor_eigenvectors),
        }


def _outer(a: Tensor, b: Tensor) -> Tensor:
    """Flattened outer products over the last axis: ``[..., n * m]``."""
    return (a[..., :, None] * b[..., None, :]).flatten(-2)


class LazyEigenbasis:
    """Decomposes its factors on first use, once; copies of a structure share it.

    Args:
        factors: Symmetric ``[n_i, n_i]`` factors.
        owner: Name of the structure, used in error messages.
        basis: An already computed decomposition (e.g. from a state dict).
    """

    def __init__(
        self,
        factors: Sequence[Tensor],
        owner: str,
        basis: KronEigenbasis | None = None,
    ) -> None:
        self.factors = tuple(factors)
        self.owner = owner
        self._basis = basis

    @property
    def is_computed(self) -> bool:
        """Whether the decomposition has been computed."""
        return self._basis is not None

    def get(self) -> KronEigenbasis:
        """The decomposition, computed on the first call only."""
        if self._basis is None:
            self._basis = KronEigenbasis.decompose(self.factors, self.owner)
        return self._basis

    def map(self, fn: Callable[[Tensor], Tensor]) -> LazyEigenbasis:
        """A new holder with ``fn`` applied to factors and any computed basis."""
        basis = None if self._basis is None else self._basis.map(fn)
        factors = [fn(f) for f in self.factors]
        return LazyEigenbasis(factors, self.owner, basis)

    def state_dict(self) -> dict[str, list[Tensor]] | None:
        """The computed decomposition, or ``None`` if not computed yet."""
        return None if self._basis is None else self._basis.state_dict()

    @staticmethod
    def basis_from_state(
        state: dict[str, list[Tensor]] | None,
    ) -> KronEigenbasis | None:
        """Inverse of :meth:`state_dict`."""
        if state is None:
            return None
        return KronEigenbasis(state["eigenvalues"], state["eigenvectors"])
