"""Restore any curvature structure from its state dict, by explicit name lookup."""

from __future__ import annotations

from typing import Any

from bayescurv.curvature.base import CurvatureMatrix
from bayescurv.curvature.dense import Dense
from bayescurv.curvature.diagonal import Diagonal
from bayescurv.curvature.kron import KronBlocks
from bayescurv.curvature.lowrank import LowRankPlusDiag

STRUCTURES: dict[str, type[CurvatureMatrix]] = {
    "Diagonal": Diagonal,
    "KronBlocks": KronBlocks,
    "Dense": Dense,
    "LowRankPlusDiag": LowRankPlusDiag,
}
"""Structure class per name, as stored under ``state["structure"]``."""


def structure_from_state_dict(state: dict[str, Any]) -> CurvatureMatrix:
    """Restore a structure saved with :meth:`CurvatureMatrix.state_dict`.

    Raises:
        ValueError: If ``state["structure"]`` names no known structure.
    """
    name = state.get("structure")
    if name not in STRUCTURES:
        raise ValueError(
            f"unknown curvature structure {name!r}; known: {sorted(STRUCTURES)}."
        )
    return STRUCTURES[name].from_state_dict(state)
