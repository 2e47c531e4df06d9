r"""Factored Jacobians of a model's linear layers from one batched backward pass.

For every ``nn.Linear`` layer holding subset parameters that the forward pass calls
exactly once on ``[N, in]`` inputs, a forward hook records its input :math:`a` and
output :math:`z`, and one vector-Jacobian product with the ``C`` output columns
pulled back to all those outputs at once (``torch.autograd.grad(...,
is_grads_batched=True)``, as the engine pulls back its columns) gives
:math:`G = \partial f / \partial z` ``[N, C, out]``. The layer's Jacobian segments
are then :math:`G_n \otimes a_n^\top` and :math:`G_n`
(:class:`~bayescurv.laplace.sources.jacobians.LinearSegment`), never expanded.

Layers called more than once (weight sharing), on inputs with more dimensions
(sequences), or whose recorded tensors are overwritten in place later in the
forward pass (e.g. ``nn.ReLU(inplace=True)``: a gradient w.r.t. the overwritten
output would be the activation's) are left to the explicit Jacobians.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from bayescurv.laplace.data import call_model
from bayescurv.laplace.sources.jacobians import LinearSegment

_Call = tuple[Tensor, Tensor, tuple[int, int]]


def linear_segments(
    model: nn.Module,
    inputs: Any,
    params: dict[str, nn.Parameter],
    differentiable: bool = False,
) -> tuple[Tensor, dict[str, LinearSegment]]:
    """The output and the factored segments of the eligible linear layers.

    Args:
        model: The model.
        inputs: A batch of inputs (tensor, tuple or dict).
        params: The subset's parameter tensors by name.
        differentiable: Keep the autograd graph w.r.t. the inputs.

    Returns:
        The output ``[N, C]`` and a segment per parameter name of an eligible layer
        (see the module doc); the other names are absent.
    """
    layers = _candidate_layers(model, params)
    calls: dict[nn.Module, list[_Call]] = {module: [] for module in layers}

    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        calls[module].append((args[0], output, (args[0]._version, output._version)))

    handles = [module.register_forward_hook(hook) for module in layers]
    try:
        output = call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    num = output.shape[0]
    flat = output.reshape(num, -1)
    eligible = [m for m in layers if _factorizable(calls[m], num)]
    segments: dict[str, LinearSegment] = {}
    if eligible:
        grads = _output_grads(flat, [calls[m][0][1] for m in eligible], differentiable)
        for module, grad in zip(eligible, grads, strict=True):
            a = calls[module][0][0]
            a = a if differentiable else a.detach()
            for local, name in layers[module].items():
                segments[name] = LinearSegment(
                    a if local == "weight" else None, grad, module.out_features, num
                )
    return flat if differentiable else flat.detach(), segments


def _candidate_layers(
    model: nn.Module, params: dict[str, nn.Parameter]
) -> dict[nn.Module, dict[str, str]]:
    """``nn.Linear`` layers owning subset tensors: local name -> subset name."""
    by_identity = {id(p): name for name, p in params.items()}
    layers: dict[nn.Module, dict[str, str]] = {}
    for module in model.modules():
        if type(module) is not nn.Linear:
            continue
        owned = {
            local: by_identity[id(p)]
            for local, p in module.named_parameters(recurse=False)
            if id(p) in by_identity
        }
        if owned:
            layers[module] = owned
    return layers


def _factorizable(calls: list[_Call], num: int) -> bool:
    if len(calls) != 1:
        return False
    a, z, versions = calls[0]
    return (
        a.ndim == 2
        and a.shape[0] == num
        and z.shape[0] == num
        and (a._version, z._version) == versions
    )


def _output_grads(
    flat: Tensor, outputs: list[Tensor], differentiable: bool
) -> list[Tensor]:
    r""":math:`\partial f_{n,c} / \partial z_n` per layer, ``[N, C, out]``."""
    num, classes = flat.shape
    eye = torch.eye(classes, dtype=flat.dtype, device=flat.device)
    columns = eye[:, None, :].expand(classes, num, classes)
    grads = torch.autograd.grad(
        flat,
        outputs,
        columns,
        retain_graph=differentiable,
        create_graph=differentiable,
        is_grads_batched=True,
        allow_unused=True,
        materialize_grads=True,
    )
    return [
        g.movedim(0, 1) if differentiable else g.movedim(0, 1).detach() for g in grads
    ]
