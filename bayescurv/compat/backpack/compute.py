"""What runs when ``backward`` reaches the output of an extended module.

First-order extensions need only the gradient ``g`` that reaches the output (as in
BackPACK, whatever scalar was differentiated, including its scale); the others need
the extended loss applied directly to that output (BackPACK ignores the loss's scale
for them, and so does this layer). When ``g`` is exactly the gradient of the extended
loss, one engine call with that loss computes everything; otherwise the first-order
quantities come from a call that pulls back ``g`` itself (see ``replay.py``).

# NOTE [Differentiable quantities]
# Inside ``loss.backward(create_graph=True)`` the hooks run with grad mode on; the
# engine is then asked for differentiable results (``create_graph=True``), as BackPACK
# returns them, unless an extension the engine computes from detached quantities is
# active (DiagHessian, BatchDiagHessian, KFRA): then all results are detached.
# First-order quantities of a gradient g that is not the extended loss's own cannot
# use the centered output (its value is 0, but its derivative would enter that of
# the pulled-back column); they come from the per-sample Jacobians J_n (engine
# Jacobian, differentiable) as J_n^T g_n, with g's own graph.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from bayescurv import engine
from bayescurv.compat.backpack.context import Settings, internal
from bayescurv.compat.backpack.curvmatprod import block_products
from bayescurv.compat.backpack.extensions import (
    BackpropExtension,
    CurvatureMatrixProduct,
    Order,
)
from bayescurv.compat.backpack.kron_convention import (
    backpack_factors,
    convolution_weights,
    output_locations,
)
from bayescurv.compat.backpack.replay import Call, LossCall, run_engine, trainable
from bayescurv.engine.losses import LOSS_RULES

Values = dict[str, dict[nn.Parameter, Any]]
REDUCTIONS = ("mean", "sum")
_DETACHED = (engine.DiagHessian, engine.BatchDiagHessian, engine.KFRA)


def compute_and_store(
    call: Call, loss: LossCall | None, grad_output: Tensor, settings: Settings
) -> None:
    """Compute the active extensions for ``call`` and store them on its parameters.

    Raises:
        RuntimeError: If the forward call ran inside ``disable()``.
        ValueError: If a second-order extension is active but the extended loss was
            not applied directly to the call's output, or ``grad_output`` is not
            finite.
    """
    name = type(call.module).__name__
    if not call.stored:
        raise RuntimeError(
            f"The forward pass of {name} ran inside bayescurv.compat.backpack."
            "disable(), so its inputs were not stored; run it outside disable() to "
            "compute extensions in its backward pass."
        )
    if not trainable(call.module):
        return
    exts = settings.extensions
    first = [e for e in exts if e.order == Order.FIRST]
    rest = [e for e in exts if e.order != Order.FIRST]
    if rest and loss is None:
        raise ValueError(
            f"{[type(e).__name__ for e in rest]} need the loss: apply an extended "
            f"loss (extend(nn.CrossEntropyLoss()), MSELoss or BCEWithLogitsLoss) "
            f"directly to the output of the extended {name}. Its output was "
            "transformed before the loss, or the loss is not extended, or only a "
            "submodule is extended: extend the whole model, extend(model)."
        )
    if settings.debug:
        print(f"[DEBUG] bayescurv.compat.backpack: {list(exts)} on {name}")
    values: Values = {}
    keep_graph = torch.is_grad_enabled() and not any(
        isinstance(e.engine_extension(), _DETACHED) for e in exts
    )
    via_loss = loss is not None and _is_loss_gradient(loss, grad_output)
    if rest or via_loss:
        shared = first if via_loss else []
        values.update(_second_order(call, loss, rest, shared, keep_graph))
        first = [e for e in first if e not in shared]
    if first and keep_graph:  # see NOTE [Differentiable quantities]
        values.update(_first_order_differentiable(call, grad_output, first))
    elif first:
        values.update(_first_order(call, grad_output, first))
    _store(call, values, exts)
    _run_hook(call, loss, settings)


def _is_loss_gradient(loss: LossCall, grad_output: Tensor) -> bool:
    """Whether ``grad_output`` is exactly the gradient of a loss the engine supports.

    (Scale 1, nothing added.) Other losses work for first-order extensions only.
    """
    supported = type(loss.module) in LOSS_RULES
    if not supported or getattr(loss.module, "reduction", None) not in REDUCTIONS:
        return False
    output = loss.output.detach().requires_grad_(True)
    with internal(), torch.enable_grad():
        value = loss.module(output, loss.targets)
        (grad,) = torch.autograd.grad(value, output)
    return torch.equal(grad, grad_output)


def _first_order(
    call: Call, grad_output: Tensor, exts: list[BackpropExtension]
) -> Values:
    if not torch.isfinite(grad_output).all():
        raise ValueError(
            f"The gradient reaching the output of {type(call.module).__name__} is "
            "not finite; first-order extensions pull it back per sample."
        )
    # see NOTE [First-order quantities of any scalar function of the output]
    targets = -grad_output.detach() / 2
    engine_exts = [e.engine_extension() for e in exts]
    loss_func = nn.MSELoss(reduction="sum")
    return run_engine(call, loss_func, targets, engine_exts, centered=True)


_FROM_INDIVIDUAL = {
    "grad_batch": lambda g: g,
    "batch_l2": lambda g: g.flatten(1).square().sum(1),
    "sum_grad_squared": lambda g: g.square().sum(0),
    "variance": lambda g: g.square().mean(0) - g.mean(0).square(),
    "batch_dot": lambda g: g.flatten(1) @ g.flatten(1).T,
}
"""First-order savefields from the individual gradients ``[N, *p]`` (as the engine's
reductions define them)."""


def _first_order_differentiable(
    call: Call, grad_output: Tensor, exts: list[BackpropExtension]
) -> Values:
    """First-order quantities with their graph: ``J_n^T g_n`` from the Jacobians."""
    result = run_engine(call, None, None, [engine.Jacobian()], create_graph=True)
    columns = grad_output.flatten(1).T  # [C, N]
    individual = {
        p: (jac * columns.reshape(*columns.shape, *[1] * p.dim())).sum(0)
        for p, jac in result["jacobian"].items()
    }
    return {
        e.savefield: {
            p: _FROM_INDIVIDUAL[e.savefield](g) for p, g in individual.items()
        }
        for e in exts
    }


def _second_order(
    call: Call,
    loss: LossCall,
    exts: list[BackpropExtension],
    shared: list[BackpropExtension],
    keep_graph: bool,
) -> Values:
    """Second-order quantities (and ``shared`` first-order ones) from the loss."""
    products = [e for e in exts if isinstance(e, CurvatureMatrixProduct)]
    values: Values = {e.savefield: block_products(e, call, loss) for e in products}
    # NOTE [Monte Carlo draws of the convolution factors]: KFAC goes first so that
    # its sampled columns are the generator's first draws, in this call and in the
    # kfac_approx="reduce" call below, which draws only those.
    engine_exts = sorted(
        (e.engine_extension() for e in [*exts, *shared] if e not in products),
        key=lambda e: not isinstance(e, engine.KFAC),
    )
    if not engine_exts:
        return values
    seed = _seed(engine_exts)
    convolutions = convolution_weights(call.module)
    kron = [e for e in engine_exts if isinstance(e, (engine.KFAC, engine.KFLR))]
    with output_locations(list(convolutions.values())) as locations:
        values.update(
            run_engine(
                call,
                loss.module,
                loss.targets,
                engine_exts,
                create_graph=keep_graph,
                generator=_generator(seed, call),
            )
        )
    if kron and convolutions:
        reduce = run_engine(
            call,
            loss.module,
            loss.targets,
            [replace(e, kfac_approx="reduce") for e in kron],
            create_graph=keep_graph,
            generator=_generator(seed, call),
        )
        for ext in kron:
            field = values[ext.savefield]
            for weight, layer in convolutions.items():
                field[weight] = backpack_factors(
                    field[weight],
                    reduce[ext.savefield][weight],
                    layer,
                    locations[layer],
                )
    return values


def _seed(exts: list[engine.Extension]) -> int | None:
    """A seed from the global generator when Monte Carlo extensions run.

    The replay restores the random state of the forward pass (for dropout), so Monte
    Carlo draws get their own generator, seeded from the global one: fresh draws in
    every backward pass, reproducible under ``torch.manual_seed``.
    """
    if not any(e.mc_samples for e in exts):
        return None
    return int(torch.randint(0, 2**62, (1,)).item())


def _generator(seed: int | None, call: Call) -> torch.Generator | None:
    if seed is None:
        return None
    device = next(iter(trainable(call.module))).device
    return torch.Generator(device=device).manual_seed(seed)


def _store(call: Call, values: Values, exts: tuple[BackpropExtension, ...]) -> None:
    for ext in exts:
        for param, value in values[ext.savefield].items():
            setattr(param, ext.savefield, ext.select(value))


def _run_hook(call: Call, loss: LossCall | None, settings: Settings) -> None:
    """BackPACK's ``extension_hook``: the loss, then the layers in backward order."""
    hook = settings.extension_hook
    if hook is None:
        return
    modules = [
        m
        for m in call.module.modules()
        if not any(True for _ in m.children())
        or any(True for _ in m.parameters(recurse=False))
    ]
    if loss is not None:
        hook(loss.module)
    for module in reversed(modules):
        hook(module)
