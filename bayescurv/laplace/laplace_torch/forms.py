r"""laplace-torch's representations of the data term and the posterior precision.

bayescurv keeps every curvature as a :mod:`bayescurv.curvature` structure
(``la.precision``). laplace-torch code reads ``la.H`` and ``la.posterior_precision`` in
its own forms, which these functions give:

======== ================================== =========================================
structure ``H`` (data term, unscaled)         ``posterior_precision``
======== ================================== =========================================
full     ``[P, P]``                           ``[P, P]``
diag     ``[P]``                              ``[P]``
kron     ``KronDecomposed`` (its factors:     ``KronDecomposed`` with scale and prior
         ``la.H_facs``, a ``Kron``)
lowrank  ``(U, eigenvalues)``                 ``((U, s * eigenvalues), p)``
======== ================================== =========================================

For ``lowrank``, bayescurv's structure is :math:`U \operatorname{diag}(\lambda)
U^\top + \operatorname{diag}(d)` (the diagonal remainder ``d`` keeps the diagonal of
the curvature exact); laplace-torch's tuple has no room for ``d``, so
``posterior_precision`` folds :math:`s d` into ``p`` (then
:math:`U \operatorname{diag}(s\lambda) U^\top + \operatorname{diag}(p) = \Lambda`
exactly) while ``H`` omits it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bayescurv.curvature import (
    CurvatureMatrix,
    Dense,
    Diagonal,
    KronBlocks,
    LowRankPlusDiag,
)
from bayescurv.laplace.enums import HessianStructure


def data_term(curvature: CurvatureMatrix, dtype: torch.dtype | None = None) -> Any:
    """The unscaled data term :math:`H` in laplace-torch's form (module table).

    Args:
        curvature: The data term as a structure.
        dtype: Cast to this dtype (e.g. the model's), sharing the decompositions.
    """
    if dtype is not None:
        curvature = curvature.to(dtype)
    if isinstance(curvature, Dense):
        return curvature.matrix
    if isinstance(curvature, Diagonal):
        return curvature.entries
    if isinstance(curvature, KronBlocks):
        from bayescurv.laplace.laplace_torch.matrix import KronDecomposed  # noqa: PLC0415

        return KronDecomposed.from_blocks(curvature)
    if isinstance(curvature, LowRankPlusDiag):
        return curvature.eigenvectors, curvature.eigenvalues
    raise TypeError(f"no laplace-torch form for {type(curvature).__name__}.")


def zero_data_term(
    structure: HessianStructure, params: list[Tensor], size: int, like: Tensor
) -> Any:
    """laplace-torch's data term before ``fit``: zeros in the structure's form.

    ``[P, P]`` (full), ``[P]`` (diag), a ``Kron`` of zero factors per parameter tensor
    (kron) and ``None`` (lowrank), as laplace-torch initializes them.

    Args:
        structure: The Hessian structure.
        params: The subset's parameter tensors (their shapes give the Kron factors).
        size: ``P``, the number of weights of the subset.
        like: Dtype and device of the result.
    """
    if structure is HessianStructure.FULL:
        return like.new_zeros(size, size)
    if structure is HessianStructure.DIAG:
        return like.new_zeros(size)
    if structure is HessianStructure.KRON:
        from bayescurv.laplace.laplace_torch.matrix import Kron  # noqa: PLC0415

        return Kron.init_from_model(params, like.device, like.dtype)
    return None


def kron_factors(curvature: KronBlocks, dtype: torch.dtype | None = None) -> Any:
    """laplace-torch's undecomposed ``Kron`` of a Kronecker data term (``H_facs``)."""
    if dtype is not None:
        curvature = curvature.to(dtype)
    from bayescurv.laplace.laplace_torch.matrix import Kron  # noqa: PLC0415

    return Kron.from_blocks(curvature)


def posterior_precision(
    precision: CurvatureMatrix, prior_diag: Tensor, dtype: torch.dtype | None = None
) -> Any:
    r"""The posterior precision :math:`\Lambda` in laplace-torch's form (module table).

    Args:
        precision: :math:`\Lambda` as a structure (scaled data term plus prior).
        prior_diag: The prior precision per weight, ``[P]`` (``lowrank`` only).
        dtype: Cast to this dtype (e.g. the model's), sharing the decompositions.
    """
    if dtype is not None:
        precision = precision.to(dtype)
        prior_diag = prior_diag.to(dtype)
    if isinstance(precision, Dense):
        return precision.dense()
    if isinstance(precision, Diagonal):
        return precision.diagonal()
    if isinstance(precision, KronBlocks):
        from bayescurv.laplace.laplace_torch.matrix import KronDecomposed  # noqa: PLC0415

        return KronDecomposed.from_blocks(precision)
    if isinstance(precision, LowRankPlusDiag):
        scale = precision.scale
        values = scale * precision.eigenvalues
        return (precision.eigenvectors, values), prior_diag + scale * precision.diag
    raise TypeError(f"no laplace-torch form for {type(precision).__name__}.")
