r"""BackPACK's Kronecker factors for convolution weights, from the engine's.

BackPACK 1.7 returns, for a convolution weight with ``L`` output locations per
sample, ``[B, A]`` with :math:`B = \sum_{v,n} (\sum_r c_{vnr})(\sum_r c_{vnr})^\top`
(the GGN block of the bias) and :math:`A = \frac{1}{N}\sum_{n,r} x_{nr}x_{nr}^\top`;
its docstring calls this a deviation from KFC by the factor ``L``. In the engine's
terms (:class:`~bayescurv.engine.KFACApprox`) that is
``[B_reduce, L * A_expand]``: the output side of ``kfac_approx="reduce"`` and ``L``
times the input side of ``kfac_approx="expand"``. The compat layer runs the engine
once more for the ``reduce`` output sides, with the same Monte Carlo draws.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Layers whose Kronecker factors follow BackPACK's convolution convention."""


def convolution_weights(module: nn.Module) -> dict[nn.Parameter, nn.Module]:
    """The trainable convolution weights in ``module``, with their layer."""
    return {
        m.weight: m
        for m in module.modules()
        if isinstance(m, CONVOLUTIONS) and m.weight.requires_grad
    }


@contextmanager
def output_locations(layers: list[nn.Module]) -> Iterator[dict[nn.Module, set[int]]]:
    """Record the output locations per sample of every call of ``layers``."""
    locations: dict[nn.Module, set[int]] = {m: set() for m in layers}

    def record(module: nn.Module, inputs: object, output: Tensor) -> None:
        locations[module].add(output.shape[2:].numel())

    handles = [m.register_forward_hook(record) for m in layers]
    try:
        yield locations
    finally:
        for handle in handles:
            handle.remove()


def backpack_factors(
    expand: list[Tensor], reduce: list[Tensor], layer: nn.Module, locations: set[int]
) -> list[Tensor]:
    """``[B_reduce, L * A_expand]`` of one convolution weight.

    Args:
        expand: The engine's ``[B, A]`` with ``kfac_approx="expand"``.
        reduce: The engine's ``[B, A]`` with ``kfac_approx="reduce"`` (same draws).
        layer: The convolution.
        locations: The output locations ``L`` of its calls.

    Raises:
        NotImplementedError: If the layer was called with different ``L``.
    """
    if len(locations) != 1:
        raise NotImplementedError(
            f"BackPACK's Kronecker factors of a convolution are defined for one call; "
            f"{type(layer).__name__} ran with output locations {sorted(locations)}. "
            "Use bayescurv.engine.KFAC/KFLR (kfac_approx='expand' or 'reduce'), "
            "which handle several calls."
        )
    (count,) = locations
    return [reduce[0], count * expand[1]]
