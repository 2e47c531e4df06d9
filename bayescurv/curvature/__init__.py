r"""Structured posterior precisions: linear algebra that knows nothing about models.

Every structure is an immutable :class:`CurvatureMatrix`
:math:`\Lambda = s \odot H + \operatorname{diag}(\pi)` over a flat parameter vector of
size ``P`` split into named blocks (``block_sizes``, ``block_names``). ``add_prior`` and
``scaled`` return new objects sharing the decomposition of the data term ``H``, so the
log determinant is cheap and differentiable in the prior precision and the scale.

Example:
    >>> import math, torch
    >>> from bayescurv.curvature import Diagonal
    >>> ggn = Diagonal(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    >>> posterior = ggn.scaled(2.0).add_prior(1.0)  # diag(3, 5, 7)
    >>> math.isclose(posterior.logdet().item(), math.log(3 * 5 * 7))
    True
    >>> posterior.inverse_diagonal()
    tensor([0.3333, 0.2000, 0.1429], dtype=torch.float64)
"""

from bayescurv.curvature.base import CurvatureMatrix
from bayescurv.curvature.dense import Dense
from bayescurv.curvature.diagonal import Diagonal
from bayescurv.curvature.kron import KronBlocks
from bayescurv.curvature.linalg import NotPositiveDefiniteError
from bayescurv.curvature.lowrank import LowRankPlusDiag
from bayescurv.curvature.prior import PriorStructure
from bayescurv.curvature.registry import STRUCTURES, structure_from_state_dict

__all__ = [
    "STRUCTURES",
    "CurvatureMatrix",
    "Dense",
    "Diagonal",
    "KronBlocks",
    "LowRankPlusDiag",
    "NotPositiveDefiniteError",
    "PriorStructure",
    "structure_from_state_dict",
]
