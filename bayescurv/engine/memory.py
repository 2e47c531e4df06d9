r"""Memory estimates before allocation: ``max_memory=``.

Results whose size grows with the batch, the outputs or the square of the parameter
count (per-sample gradients ``[N, P]``, GGN square roots and Jacobians ``[C, N, P]``,
dense matrices ``[P, P]``, Kronecker factors, ``batch_dot`` ``[N, N]``) are estimated
from shapes before anything is allocated. Above the budget the engine raises
:class:`MemoryBudgetError` with the estimate, the budget and a cheaper alternative,
instead of asking the allocator for terabytes (an ``nn.Linear(1000, 1000)``'s dense
GGN is 4 TB in float32).

The budget is ``max_memory`` bytes; ``None`` (the default) means
:data:`DEFAULT_FRACTION` of the memory available when the call starts: on CUDA the
free device memory (``torch.cuda.mem_get_info``), on Linux ``MemAvailable`` of
``/proc/meminfo`` (else free pages from ``os.sysconf``), elsewhere
:data:`FALLBACK_BYTES`. Temporaries are not counted: they are chunked under
``memory_budget`` (per-sample vectors, pulled-back columns, per-sample Hessians).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from bayescurv.engine.extensions import Extension
from bayescurv.engine.recording import Layer
from bayescurv.engine.rules.kron_stats import KFACApprox

DEFAULT_FRACTION = 0.8
"""Share of the available memory that results may take by default."""
FALLBACK_BYTES = 8 * 2**30
"""Available memory assumed where it cannot be read (8 GiB)."""


class MemoryBudgetError(MemoryError):
    """A result would exceed ``max_memory``; raised before anything is allocated."""


@dataclass(frozen=True)
class Estimate:
    """Bytes one result needs, and what to do instead.

    Attributes:
        what: The result, e.g. ``"BatchGrad: grad_batch [N, P] = [128, 11173962]"``.
        nbytes: Its size in bytes.
        alternative: A cheaper way to get what is probably wanted.
    """

    what: str
    nbytes: int
    alternative: str


def available_memory(device: torch.device) -> int:
    """Bytes available for new tensors on ``device`` right now (see module doc)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return FALLBACK_BYTES


def resolve_budget(max_memory: int | None, device: torch.device) -> tuple[int, str]:
    """The budget in bytes and how it was chosen (for messages).

    Raises:
        TypeError: If ``max_memory`` is not ``None`` or a positive integer.
    """
    if max_memory is None:
        budget = int(DEFAULT_FRACTION * available_memory(device))
        return budget, f"the default: {DEFAULT_FRACTION:.0%} of the available memory"
    if isinstance(max_memory, bool) or not isinstance(max_memory, int):
        raise TypeError(
            f"max_memory must be a number of bytes (int) or None, got "
            f"{type(max_memory).__name__} {max_memory!r}."
        )
    if max_memory <= 0:
        raise ValueError(f"max_memory must be positive, got {max_memory}.")
    return max_memory, "max_memory"


def check_estimates(
    estimates: Iterable[Estimate], max_memory: int | None, device: torch.device
) -> None:
    """Raise :class:`MemoryBudgetError` if the estimates exceed the budget.

    Raises:
        MemoryBudgetError: Naming the largest result, the total, the budget and the
            largest result's cheaper alternative.
    """
    estimates = [e for e in estimates if e.nbytes > 0]
    total = sum(e.nbytes for e in estimates)
    if not estimates:
        return
    budget, origin = resolve_budget(max_memory, device)
    if total <= budget:
        return
    largest = max(estimates, key=lambda e: e.nbytes)
    together = ""
    if format_bytes(total) != format_bytes(largest.nbytes):
        together = f" (all results together: {format_bytes(total)})"
    raise MemoryBudgetError(
        f"{largest.what} needs about {format_bytes(largest.nbytes)}{together}, above "
        f"the budget of {format_bytes(budget)} ({origin}). Nothing was allocated. "
        f"{largest.alternative} Pass max_memory=<bytes> to allow more."
    )


def format_bytes(nbytes: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    level = 0
    while nbytes >= 1024 and level < len(units) - 1:
        nbytes /= 1024
        level += 1
    return f"{nbytes:.0f} B" if level == 0 else f"{nbytes:.1f} {units[level]}"


_SMALLER = "smaller batches, or fewer parameters with params=."
_PER_SAMPLE = {
    "BatchGrad": (
        "[N, P]",
        "BatchL2Grad, SumGradSquared or Variance reduce over samples without it; or "
        + _SMALLER,
    ),
    "BatchDiagGGNExact": ("[N, P]", "DiagGGNExact sums over samples; or " + _SMALLER),
    "BatchDiagGGNMC": ("[N, P]", "DiagGGNMC sums over samples; or " + _SMALLER),
    "BatchDiagHessian": ("[N, P]", "DiagHessian sums over samples; or " + _SMALLER),
}
_COLUMNS = {
    "SqrtGGNExact": "DiagGGNExact or KFLR avoid the square root; or " + _SMALLER,
    "SqrtGGNMC": "fewer mc_samples, DiagGGNMC or KFAC; or " + _SMALLER,
    "Jacobian": "Jacobian(factored=True) keeps Linear layers factored; or " + _SMALLER,
}


def backprop_estimates(
    extensions: Iterable[Extension],
    layers: list[Layer],
    batch: int,
    columns: dict[str, int],
    factored: dict[nn.Parameter, tuple[int, int]],
) -> list[Estimate]:
    """Sizes of the results of :func:`~bayescurv.engine.backprop` that can be large.

    Args:
        extensions: The requested extensions.
        layers: The parameterized layers holding the selected parameters.
        batch: The batch size ``N``.
        columns: Columns per sample by extension name (``SqrtGGNExact``: the loss
            Hessian's, ``Jacobian``: the output entries, ``SqrtGGNMC``: draws).
        factored: Parameters a factored ``Jacobian`` returns factored, with their
            layer's output entries and unfolded input entries per sample
            (:meth:`~bayescurv.engine.jacobian.FactoredLinear.sizes`).
    """
    unique: list[tuple[Layer, str, nn.Parameter]] = []
    seen: set[nn.Parameter] = set()
    for layer in layers:
        for local, p in layer.params.items():
            if p not in seen:  # a tied parameter counts once
                seen.add(p)
                unique.append((layer, local, p))
    numel = sum(p.numel() * p.element_size() for _, _, p in unique)
    out = []
    for ext in extensions:
        name = type(ext).__name__
        if name in _PER_SAMPLE:
            shape, alternative = _PER_SAMPLE[name]
            what = f"{name}: {ext.savefield} {shape} with N={batch}"
            out.append(Estimate(what, batch * numel, alternative))
        elif name in _COLUMNS:
            c = columns.get(name, 1)
            size = batch * c * numel
            if name == "Jacobian" and factored:
                size = _factored_jacobian(unique, factored, batch, c)
            what = f"{name}: {ext.savefield} [C, N, P] with C={c}, N={batch}"
            out.append(Estimate(what, size, _COLUMNS[name]))
        elif name == "BatchDotGrad":
            what = f"BatchDotGrad: batch_dot [N, N] per parameter with N={batch}"
            nbytes = batch * batch * sum(p.element_size() for _, _, p in unique)
            out.append(Estimate(what, nbytes, "Use " + _SMALLER))
        elif name in ("KFAC", "KFLR", "KFRA"):
            out.append(_kron_estimate(ext, unique))
    return out


def _factored_jacobian(
    unique: list[tuple[Layer, str, nn.Parameter]],
    factored: dict[nn.Parameter, tuple[int, int]],
    batch: int,
    c: int,
) -> int:
    """Bytes of the ``[C, N, *out]`` columns per factored layer and its patches.

    A factored layer keeps its recorded input (not counted) and, a convolution, the
    unfolded patches; every other parameter is explicit ``[C, N, numel]``.
    """
    total = 0
    counted: set[int] = set()
    for layer, _, p in unique:
        if p not in factored:
            total += c * batch * p.numel() * p.element_size()
        elif id(layer.module) not in counted:  # weight and bias share the columns
            counted.add(id(layer.module))
            entries, patches = factored[p]
            total += (c * entries + patches) * batch * p.element_size()
    return total


def _kron_estimate(
    ext: Extension, unique: list[tuple[Layer, str, nn.Parameter]]
) -> Estimate:
    approx = getattr(ext, "kfac_approx", KFACApprox.EXPAND)
    nbytes = 0
    largest = (0, "")
    for layer, local, p in unique:
        itemsize = torch.empty((), dtype=ext.dtype or p.dtype).element_size()
        shapes = layer.rule.kron_shapes(layer.module, local, approx)
        size = sum(math.prod(shape) for shape in shapes) * itemsize
        nbytes += size
        largest = max(
            largest, (size, f"{type(layer.module).__name__}.{local} {shapes}")
        )
    name = type(ext).__name__
    return Estimate(
        f"{name}: Kronecker factors (largest: {largest[1]})",
        nbytes,
        "Leave the largest layers out with params= (e.g. a wide output layer), or use "
        "a diagonal extension (DiagGGNExact/DiagGGNMC).",
    )
