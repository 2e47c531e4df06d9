r"""laplace-torch's Kronecker matrices :class:`Kron` and :class:`KronDecomposed`.

A network's curvature is a block-diagonal matrix with one block per parameter tensor,
each block a Kronecker product of factors: ``[B, A]`` for a weight ``[out, in, ...]``
flattened row-major (``B: [out, out]``, ``A`` over the flattened input dimensions),
``[B]`` for a bias. A factor is a matrix ``[n, n]`` or, standing for a diagonal
matrix, the vector ``[n]`` of its diagonal.

* :class:`Kron` holds the factors themselves: it can be added to another ``Kron`` of
  the same layout (summing the factors separately, as KFAC does over batches) and
  multiplied by a scalar.
* :class:`KronDecomposed` holds every factor's eigendecomposition
  :math:`F_i = Q_i \operatorname{diag}(\lambda_i) Q_i^\top` and a per-block shift
  :math:`\delta_b` (a prior precision), representing

  .. math::
      \Lambda_b = F_{b,1} \otimes \dots \otimes F_{b,m} + \delta_b I
      = (Q_{b,1} \otimes \dots)\, \operatorname{diag}(\lambda_{b,1} \otimes \dots
      + \delta_b)\, (Q_{b,1} \otimes \dots)^\top,

  so powers :math:`\Lambda^p` (inverse, inverse square root), log determinants and
  diagonals cost :math:`O(n)` per block once decomposed. With ``damping=True`` the
  shift is split over the factors instead, :math:`\bigotimes_i (F_i +
  \delta^{1/m} I)` (laplace-torch's damped variant).

Both convert from bayescurv's :class:`~bayescurv.curvature.KronBlocks` (the structure
the Laplace layer fits): :meth:`Kron.from_blocks` for the data term,
:meth:`KronDecomposed.from_blocks` for any scaled structure with its prior, sharing the
eigendecompositions the structure has already computed.

Example:
    >>> import torch
    >>> B, A = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[3.0]])
    >>> K = Kron([[B, A], [B]])
    >>> K.diag()
    tensor([6., 3., 2., 1.])
    >>> (K.decompose() + torch.tensor(1.0)).logdet()  # log(7 * 4 * 3 * 2)
    tensor(5.1240)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import reduce

import torch
from torch import Tensor, nn

from bayescurv.curvature import KronBlocks
from bayescurv.curvature.prior import per_block
from bayescurv.laplace.laplace_torch.linalg import block_diag, symeig

__all__ = ["Kron", "KronDecomposed"]

Scalar = float | int | Tensor
"""A number, a 0-d tensor or a tensor ``[1]``."""


def _as_scalar(value: object, owner: str) -> Tensor | float:
    """A scalar as a float or 0-d tensor (gradients kept).

    Raises:
        ValueError: Naming ``owner`` for anything else.
    """
    if isinstance(value, Tensor) and value.numel() == 1 and value.ndim <= 1:
        return value.reshape(())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    shape = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
    raise ValueError(
        f"{owner}: can only multiply by a scalar (a number, a 0-d or [1] tensor), "
        f"got {shape}."
    )


def _distribute(factors: Sequence[Tensor], scalar: Tensor | float) -> list[Tensor]:
    r"""Factors whose Kronecker product is multiplied by ``scalar``.

    Each factor takes :math:`|s|^{1/m}` (laplace-torch's even split); the sign goes
    to the first factor, so a negative scalar stays exact.
    """
    magnitude = abs(scalar) ** (1.0 / len(factors))
    sign = (
        torch.sign(scalar)
        if isinstance(scalar, Tensor)
        else (scalar > 0) - (scalar < 0)
    )
    return [
        (sign * magnitude if i == 0 else magnitude) * f for i, f in enumerate(factors)
    ]


def _outer(vectors: Sequence[Tensor]) -> Tensor:
    """The Kronecker product of vectors, flattened row-major."""
    return reduce(lambda a, b: torch.outer(a, b).flatten(), vectors)


def _apply(rows: Tensor, factors: Sequence[Tensor]) -> Tensor:
    r""":math:`(F_1 \otimes \dots \otimes F_m)\, r` for every row ``r`` of ``[R, n]``.

    A 1-D factor stands for the diagonal matrix with that diagonal.
    """
    grid = rows.reshape(rows.shape[0], *(f.shape[0] for f in factors))
    for mode, factor in enumerate(factors, start=1):
        if factor.ndim == 1:
            shape = [1] * grid.ndim
            shape[mode] = -1
            grid = grid * factor.reshape(shape)
        else:
            grid = torch.tensordot(grid, factor, dims=([mode], [1])).movedim(-1, mode)
    return grid.reshape(rows.shape[0], -1)


def _batched(W: Tensor, size: int, owner: str) -> Tensor:
    """``W`` ``[P]``, ``[B, P]`` or ``[B, K, P]`` as rows ``[R, P]``."""
    if not isinstance(W, Tensor) or W.ndim not in (1, 2, 3):
        shape = list(W.shape) if isinstance(W, Tensor) else type(W).__name__
        raise ValueError(f"{owner}: W must be [P], [B, P] or [B, K, P], got {shape}.")
    if W.shape[-1] != size:
        raise ValueError(
            f"{owner}: W has {W.shape[-1]} entries in its last axis; this matrix is "
            f"over {size} parameters."
        )
    return W.reshape(-1, size)


class Kron:
    r"""Kronecker factors per parameter tensor (laplace-torch's ``Kron``).

    The represented matrix is block-diagonal with blocks
    :math:`F_{b,1} \otimes \dots \otimes F_{b,m}` in the order of ``kfacs``.

    Args:
        kfacs: Per block a list of factors (``[n, n]`` matrices or ``[n]``
            diagonals): ``[B, A]`` for a weight, ``[B]`` for a bias.

    Attributes:
        kfacs: The factors (lists, so they can be rescaled in place as laplace-torch
            does).

    Raises:
        ValueError: For an empty block or a factor that is neither 1-D nor 2-D.
    """

    def __init__(self, kfacs: Sequence[Sequence[Tensor]]) -> None:
        self.kfacs: list[list[Tensor]] = [list(factors) for factors in kfacs]
        for b, factors in enumerate(self.kfacs):
            if not factors or any(
                not isinstance(f, Tensor) or f.ndim not in (1, 2) for f in factors
            ):
                raise ValueError(
                    f"Kron: block {b} must be a non-empty list of 1-D or 2-D factors."
                )

    @classmethod
    def init_from_model(
        cls,
        model: nn.Module | Iterable[nn.Parameter],
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> Kron:
        """Zero factors for every parameter tensor of a model.

        A tensor ``[p_0, p_1, ...]`` with two or more axes gets ``[p_0 x p_0,
        (p_1 ...) x (p_1 ...)]``, a vector ``[p]`` gets ``[p x p]``.

        Args:
            model: A model (all its parameters) or an iterable of parameters.
            device: Device of the factors.
            dtype: Dtype of the factors.

        Raises:
            ValueError: For a 0-d parameter.
        """
        params = model.parameters() if isinstance(model, nn.Module) else model
        kfacs = []
        for p in params:
            if p.ndim == 0:
                raise ValueError(
                    "Kron.init_from_model: a 0-d parameter has no factors."
                )
            sizes = [p.shape[0]] if p.ndim == 1 else [p.shape[0], p[0].numel()]
            kfacs.append([torch.zeros(n, n, device=device, dtype=dtype) for n in sizes])
        return cls(kfacs)

    @classmethod
    def from_blocks(cls, blocks: KronBlocks) -> Kron:
        r"""The data term of a :class:`~bayescurv.curvature.KronBlocks`.

        The structure's scale :math:`s_b` is distributed over each block's factors
        (as :meth:`__mul__` does); the factors are shared, not copied.

        Raises:
            ValueError: If ``blocks`` carries a prior precision (a shift is not a
                Kronecker product; use :meth:`KronDecomposed.from_blocks`).
        """
        if bool((blocks.prior_precision.detach() != 0).any()):
            raise ValueError(
                "Kron.from_blocks: the structure has a prior precision, which Kron "
                "cannot hold; use KronDecomposed.from_blocks."
            )
        scales = per_block(blocks.scale, blocks.block_sizes)
        factors, counts = _ungroup(blocks.factors)
        scales = scales.repeat_interleave(counts)
        return cls([_distribute(fs, s) for fs, s in zip(factors, scales, strict=True)])

    def __add__(self, other: Kron | int) -> Kron:
        """Add the factors of a ``Kron`` of the same layout, factor by factor.

        ``0`` is the neutral element (so ``sum`` works). Note that the Kronecker
        product of sums is not the sum of Kronecker products: this is KFAC's
        accumulation over batches, not matrix addition.

        Raises:
            ValueError: For anything but a ``Kron`` of the same block and factor
                shapes.
        """
        if isinstance(other, int) and not isinstance(other, bool) and other == 0:
            return self
        if not isinstance(other, Kron):
            raise ValueError(f"Can only add Kron to Kron, got {type(other).__name__}.")
        if self._layout() != other._layout():
            raise ValueError(
                f"Kron: cannot add factors of shapes {other._layout()} to "
                f"{self._layout()}."
            )
        return Kron(
            [
                [a + b for a, b in zip(mine, theirs, strict=True)]
                for mine, theirs in zip(self.kfacs, other.kfacs, strict=True)
            ]
        )

    def __mul__(self, scalar: Scalar) -> Kron:
        """Multiply the matrix by a scalar (split evenly over each block's factors).

        Raises:
            ValueError: If ``scalar`` is not a number, 0-d or ``[1]`` tensor.
        """
        s = _as_scalar(scalar, "Kron")
        return Kron([_distribute(factors, s) for factors in self.kfacs])

    __radd__ = __add__
    __rmul__ = __mul__

    def __len__(self) -> int:
        return len(self.kfacs)

    def __repr__(self) -> str:
        return f"Kron({self._layout()})"

    def _layout(self) -> list[list[tuple[int, ...]]]:
        return [[tuple(f.shape) for f in factors] for factors in self.kfacs]

    @property
    def num_params(self) -> int:
        """``P``, the size of the represented matrix."""
        return sum(_outer_size(factors) for factors in self.kfacs)

    def decompose(self, damping: bool = False) -> KronDecomposed:
        """Eigendecompose every factor (laplace-torch's ``symeig``).

        A diagonal factor keeps its entries as eigenvalues with identity
        eigenvectors.

        Args:
            damping: See :class:`KronDecomposed`.
        """
        eigenvectors, eigenvalues = [], []
        for factors in self.kfacs:
            pairs = [
                symeig(f)
                if f.ndim == 2
                else (f, torch.eye(f.shape[0], dtype=f.dtype, device=f.device))
                for f in factors
            ]
            eigenvalues.append([values for values, _ in pairs])
            eigenvectors.append([vectors for _, vectors in pairs])
        return KronDecomposed(eigenvectors, eigenvalues, damping=damping)

    def bmm(self, W: Tensor, exponent: float = 1) -> Tensor:
        r""":math:`W H` for the rows of ``W`` (``H`` symmetric: each row times ``H``).

        Args:
            W: ``[P]``, ``[B, P]`` or ``[B, K, P]``.
            exponent: Must be 1 (powers need :meth:`decompose`).

        Returns:
            The shape of ``W``.

        Raises:
            ValueError: For another exponent or shape.
        """
        if exponent != 1:
            raise ValueError(
                "Kron.bmm: only exponent=1; decompose() first for other powers."
            )
        rows = _batched(W, self.num_params, "Kron.bmm")
        out, start = [], 0
        for factors in self.kfacs:
            size = _outer_size(factors)
            out.append(_apply(rows[:, start : start + size], factors))
            start += size
        return torch.cat(out, dim=1).reshape(W.shape)

    def logdet(self) -> Tensor:
        r""":math:`\log\det` of the matrix: :math:`\sum_i (n / n_i) \log\det F_i`."""
        total = 0
        for factors in self.kfacs:
            size = _outer_size(factors)
            for f in factors:
                logdet = f.logdet() if f.ndim == 2 else f.log().sum()
                total = total + size // f.shape[0] * logdet
        return total

    def diag(self) -> Tensor:
        """The diagonal, ``[P]``."""
        return torch.cat(
            [
                _outer([f.diagonal() if f.ndim == 2 else f for f in factors])
                for factors in self.kfacs
            ]
        )

    def to_matrix(self) -> Tensor:
        """The dense ``[P, P]`` matrix (for tests and small models)."""
        return block_diag(
            [
                _kron([f if f.ndim == 2 else torch.diag(f) for f in fs])
                for fs in self.kfacs
            ]
        )


def _ungroup(
    factors: Sequence[Sequence[Tensor]], item_ndim: int = 2
) -> tuple[list[list[Tensor]], Tensor]:
    """Grouped blocks (stacked ``[G, ...]`` factors) as ``G`` consecutive blocks.

    A grouped convolution's block is block-diagonal over its groups, and group
    ``g``'s weights are a contiguous segment of the flattened weight, so laplace-
    torch's one-Kronecker-product-per-block form holds with a block per group.

    Args:
        factors: Per block, its factors (or their eigenvectors / eigenvalues); a
            grouped block has one more leading axis ``G`` on every factor.
        item_ndim: Dimensions of one group's factor: 2 for matrices and
            eigenvectors (a diagonal factor ``[n]`` is never grouped), 1 for
            eigenvalues.

    Returns:
        The blocks, and ``[B]`` how many each original block became (for
        ``values.repeat_interleave(counts)`` of per-block scales and shifts).
    """
    blocks, counts = [], []
    for fs in factors:
        grouped = all(f.ndim == item_ndim + 1 for f in fs)
        groups = fs[0].shape[0] if grouped else 1
        blocks += [[f[g] for f in fs] for g in range(groups)] if grouped else [list(fs)]
        counts.append(groups)
    return blocks, torch.tensor(counts, device=factors[0][0].device)


def _kron(matrices: Sequence[Tensor]) -> Tensor:
    """``kron(M_1, M_2, ...)``.

    Of contiguous copies: ``torch.kron`` rejects some strides (e.g. of the
    eigenvectors ``eigh`` returns).
    """
    return reduce(lambda a, b: torch.kron(a.contiguous(), b.contiguous()), matrices)


def _outer_size(factors: Sequence[Tensor]) -> int:
    return reduce(int.__mul__, (f.shape[0] for f in factors), 1)


class KronDecomposed:
    r"""Eigendecomposed Kronecker factors plus a shift per block.

    Block :math:`b` is :math:`\bigotimes_i Q_{b,i} \operatorname{diag}(\lambda_{b,i})
    Q_{b,i}^\top + \delta_b I`, or with ``damping`` :math:`\bigotimes_i (Q_{b,i}
    \operatorname{diag}(\lambda_{b,i}) Q_{b,i}^\top + \delta_b^{1/m} I)` (a single
    factor is always shifted directly).

    Args:
        eigenvectors: Per block, the factors' eigenvectors (``[n_i, n_i]``, columns).
        eigenvalues: Per block, the factors' eigenvalues (``[n_i]``).
        deltas: The shifts: a scalar or ``[1]`` (shared) or ``[B]`` (per block);
            default 0.
        damping: Split the shift over the factors (see above).

    Attributes:
        eigenvectors: As given (lists).
        eigenvalues: As given (lists).
        deltas: ``[B]``.
        damping: As given.

    Raises:
        ValueError: For mismatched eigenpairs or an invalid ``deltas`` shape.
    """

    def __init__(
        self,
        eigenvectors: Sequence[Sequence[Tensor]],
        eigenvalues: Sequence[Sequence[Tensor]],
        deltas: Tensor | float | None = None,
        damping: bool = False,
    ) -> None:
        self.eigenvectors: list[list[Tensor]] = [list(qs) for qs in eigenvectors]
        self.eigenvalues: list[list[Tensor]] = [list(ls) for ls in eigenvalues]
        shapes = [[(q.shape[0],) for q in qs] for qs in self.eigenvectors]
        if not self.eigenvalues or shapes != [
            [tuple(v.shape) for v in ls] for ls in self.eigenvalues
        ]:
            raise ValueError(
                "KronDecomposed: eigenvectors and eigenvalues must have one [n, n] "
                "and one [n] tensor per factor, for at least one block."
            )
        like = self.eigenvalues[0][0]
        zeros = torch.zeros(len(self), dtype=like.dtype, device=like.device)
        self.deltas: Tensor = zeros if deltas is None else zeros + self._deltas(deltas)
        self.damping = damping

    @classmethod
    def from_blocks(cls, blocks: KronBlocks, damping: bool = False) -> KronDecomposed:
        r"""A :class:`~bayescurv.curvature.KronBlocks` with its scale and prior.

        Block :math:`b` of the structure is :math:`s_b \bigotimes_i F_{b,i} + \pi_b I`:
        the eigendecompositions are the structure's own (computed once and shared),
        the scale :math:`s_b` is distributed over the factors' eigenvalues and the
        prior precision :math:`\pi_b` becomes the shift. Differentiable in the scale
        and the prior.

        Args:
            blocks: The structure (any scale and prior).
            damping: See the class; note that the structure itself always shifts
                exactly (``damping=False`` reproduces its matrix).
        """
        sizes = blocks.block_sizes
        scales = per_block(blocks.scale, sizes)
        deltas = per_block(blocks.prior_precision, sizes)
        bases = blocks.eigenbases()
        vectors, counts = _ungroup([b.factor_eigenvectors for b in bases])
        values, _ = _ungroup([b.factor_eigenvalues for b in bases], item_ndim=1)
        scales, deltas = (
            scales.repeat_interleave(counts),
            deltas.repeat_interleave(counts),
        )
        return cls(
            vectors,
            [_distribute(ls, s) for ls, s in zip(values, scales, strict=True)],
            deltas=deltas,
            damping=damping,
        )

    def _deltas(self, deltas: object) -> Tensor:
        """A valid shift: 0-d, ``[1]`` or ``[B]`` (numbers become 0-d tensors)."""
        if isinstance(deltas, (int, float)) and not isinstance(deltas, bool):
            like = self.eigenvalues[0][0]
            return torch.tensor(float(deltas), dtype=like.dtype, device=like.device)
        if not isinstance(deltas, Tensor):
            raise ValueError(
                "Can only add a number or a torch.Tensor to KronDecomposed, got "
                f"{type(deltas).__name__}."
            )
        if deltas.ndim == 0 or deltas.shape in {(1,), (len(self),)}:
            return deltas
        raise ValueError(
            "KronDecomposed: the shift must be a scalar, [1] or per block "
            f"[{len(self)}], got shape {list(deltas.shape)}."
        )

    def __add__(self, deltas: Tensor | float) -> KronDecomposed:
        """Add a shift (e.g. a prior precision) to every block, or one per block."""
        return KronDecomposed(
            self.eigenvectors,
            self.eigenvalues,
            self.deltas + self._deltas(deltas),
            self.damping,
        )

    def __mul__(self, scalar: Scalar) -> KronDecomposed:
        """Multiply the factors (not the shift) by a scalar, via their eigenvalues."""
        s = _as_scalar(scalar, "KronDecomposed")
        return KronDecomposed(
            self.eigenvectors,
            [_distribute(ls, s) for ls in self.eigenvalues],
            self.deltas,
            self.damping,
        )

    __radd__ = __add__
    __rmul__ = __mul__

    def __len__(self) -> int:
        return len(self.eigenvalues)

    def __repr__(self) -> str:
        sizes = [[len(v) for v in ls] for ls in self.eigenvalues]
        return f"KronDecomposed({sizes}, damping={self.damping})"

    @property
    def num_params(self) -> int:
        """``P``, the size of the represented matrix."""
        return sum(_outer_size(ls) for ls in self.eigenvalues)

    def detach(self) -> KronDecomposed:
        """A copy cut from the autograd graph (eigenpairs and shifts)."""
        return KronDecomposed(
            [[q.detach() for q in qs] for qs in self.eigenvectors],
            [[v.detach() for v in ls] for ls in self.eigenvalues],
            self.deltas.detach(),
            self.damping,
        )

    def _block_eigenvalues(self, b: int) -> Tensor:
        """Eigenvalues of block ``b`` including the shift, ``[n_b]``."""
        values, delta = self.eigenvalues[b], self.deltas[b]
        if self.damping and len(values) > 1:
            root = delta ** (1.0 / len(values))
            return _outer([v + root for v in values])
        return _outer(values) + delta

    def logdet(self) -> Tensor:
        r""":math:`\log\det` of the matrix including the shifts."""
        return sum(self._block_eigenvalues(b).log().sum() for b in range(len(self)))

    def bmm(self, W: Tensor, exponent: float = -1) -> Tensor:
        r""":math:`W \Lambda^p` for the rows of ``W`` (``p = exponent``).

        Args:
            W: ``[P]``, ``[B, P]`` or ``[B, K, P]``.
            exponent: The power ``p`` (``-1``: solve, ``-1/2``: a square root of the
                inverse, as used for sampling).

        Returns:
            The shape of ``W``.
        """
        rows = _batched(W, self.num_params, "KronDecomposed.bmm")
        out, start = [], 0
        for b, vectors in enumerate(self.eigenvectors):
            size = _outer_size(vectors)
            coordinates = _apply(rows[:, start : start + size], [q.mT for q in vectors])
            weights = self._block_eigenvalues(b).pow(exponent)
            out.append(_apply(coordinates * weights, vectors))
            start += size
        return torch.cat(out, dim=1).reshape(W.shape)

    def inv_square_form(self, W: Tensor) -> Tensor:
        r""":math:`W_i \Lambda^{-1} W_i^\top` per entry, ``[B, K, P] -> [B, K, K]``.

        ``[B, P]`` is read as ``K = 1``.
        """
        batch = W.unsqueeze(1) if W.ndim == 2 else W
        if batch.ndim != 3:
            raise ValueError(
                "KronDecomposed.inv_square_form: W must be [B, K, P] or [B, P], got "
                f"{list(W.shape)}."
            )
        return batch @ self.bmm(batch, exponent=-1).mT

    def diag(self, exponent: float = 1) -> Tensor:
        r"""The diagonal of :math:`\Lambda^p`, ``[P]``."""
        return torch.cat(
            [
                _apply(
                    self._block_eigenvalues(b).pow(exponent)[None],
                    [q.square() for q in vectors],
                )[0]
                for b, vectors in enumerate(self.eigenvectors)
            ]
        )

    def to_matrix(self, exponent: float = 1) -> Tensor:
        r"""The dense :math:`\Lambda^p`, ``[P, P]`` (for tests and small models)."""
        blocks = []
        for b, vectors in enumerate(self.eigenvectors):
            basis = _kron(vectors)
            weights = self._block_eigenvalues(b).pow(exponent)
            blocks.append((basis * weights) @ basis.mT)
        return block_diag(blocks)
