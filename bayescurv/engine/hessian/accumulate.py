"""Signed sums of the layer rules' squared-column reductions, per parameter."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bayescurv.engine.extensions import Reduction
from bayescurv.engine.recording import Record

# Reductions of Hessian columns: sums of squares (signed), never per-column vectors
_SUPPORTED = {Reduction.SUM_SQUARED, Reduction.BATCH_SQUARED}


class DiagAccumulator:
    """Signed sums of the rules' squared-column reductions, per parameter."""

    def __init__(self, reductions: set[Reduction], budget: int) -> None:
        unsupported = set(reductions) - _SUPPORTED
        if unsupported:
            raise ValueError(
                f"Hessian columns support only {sorted(r.value for r in _SUPPORTED)} "
                f"reductions, got {sorted(r.value for r in unsupported)}."
            )
        self.reductions = set(reductions)
        self.budget = budget
        self.values: dict[Reduction, dict[nn.Parameter, Tensor]] = {
            red: {} for red in self.reductions
        }
        self._owned: set[tuple[Reduction, int]] = set()

    def add_columns(self, rec: Record, columns: Tensor, sign: float) -> None:
        """Add ``sign`` times the reductions of ``columns: [V, N, *out]`` of a call."""
        if columns.shape[0] == 0:
            return
        for red, by_name in _reduce(rec, columns, self.reductions, self.budget).items():
            for local, p in rec.params.items():
                self.add(red, p, by_name[local], sign)

    def add(
        self, red: Reduction, p: nn.Parameter, value: Tensor, sign: float = 1.0
    ) -> None:
        """Add ``sign * value`` of reduction ``red`` for parameter ``p``.

        Sums accumulate in place in a tensor this accumulator allocated (never in one
        a rule returned), so large per-sample results ``[N, *p]`` are not re-copied.
        """
        key = (red, id(p))
        current = self.values[red].get(p)
        if current is None:
            if sign == 1.0:
                self.values[red][p] = value
                return
            self.values[red][p] = -value
        elif key in self._owned:
            current.add_(value, alpha=sign)
            return
        else:
            self.values[red][p] = torch.add(current, value, alpha=sign)
        self._owned.add(key)


def _reduce(
    rec: Record, columns: Tensor, reductions: set[Reduction], budget: int
) -> dict[Reduction, dict[str, Tensor]]:
    """The rule's reductions, fed in chunks if it materializes per-sample vectors."""
    rule, module, inputs = rec.rule, rec.module, rec.inputs
    if not rule.materializes(module, inputs, reductions):
        return rule.reduce(module, inputs, columns, reductions)
    numel = sum(p.numel() for p in rec.params.values())
    step = max(1, budget // max(columns.shape[1] * numel * columns.element_size(), 1))
    total: dict[Reduction, dict[str, Tensor]] = {}
    for start in range(0, columns.shape[0], step):
        part = rule.reduce(module, inputs, columns[start : start + step], reductions)
        for red, by_name in part.items():
            for name, value in by_name.items():
                old = total.setdefault(red, {}).get(name)
                total[red][name] = value if old is None else old + value
    return total


def split_parameters(
    records: Sequence[Record],
) -> tuple[list[Record], list[nn.Parameter]]:
    """Calls handled through their output, and parameters needing direct products.

    A call goes through its output if its rule is linear in the parameters and none
    of its parameters is used by another call.
    """
    calls: dict[nn.Parameter, int] = {}
    for rec in records:
        for p in rec.params.values():
            calls[p] = calls.get(p, 0) + 1
    simple, direct = [], []
    for rec in records:
        if rec.rule.linear_in_params and all(
            calls[p] == 1 for p in rec.params.values()
        ):
            simple.append(rec)
        else:
            known = {id(p) for p in direct}
            direct.extend(p for p in rec.params.values() if id(p) not in known)
    return simple, direct
