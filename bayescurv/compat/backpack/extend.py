"""``extend``: hooks that remember forward calls and act when ``backward`` passes.

An extended module's forward hook stores its call (inputs, random state) on the
output tensor and registers a tensor hook there. An extended loss registers a hook
on the loss value. During ``loss.backward()`` inside ``with backpack(...)`` the loss
hook fires first and attaches the loss to the call; the output hook fires when the
gradient reaches the output, while the graph is intact, and computes and stores the
quantities (:mod:`bayescurv.compat.backpack.compute`). The normal backward pass then
writes ``.grad`` once, as without extensions.

# NOTE [Nested extended modules]
# extend() hooks every module that has parameters, as BackPACK extends recursively,
# so that a submodule called on its own (a last layer on stored features) works.
# During a call of an extended module, calls of extended modules inside it are not
# recorded: the outermost call covers them (and sums repeated calls correctly).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.modules.loss import _Loss

from bayescurv.compat.backpack.compute import compute_and_store
from bayescurv.compat.backpack.context import active, disable, is_internal
from bayescurv.compat.backpack.extensions import Order
from bayescurv.compat.backpack.replay import Call, LossCall, RngState, Then, model_of

M = TypeVar("M", bound=nn.Module)
_SLOT = "_bayescurv_backpack_call"
_EXTENDED = "_bayescurv_backpack_extended"
_RUNNING: list[_Running] = []
_WARNED: set[type] = set()


@dataclass
class _Slot:
    """The call that produced a tensor (replaced if an outer module returns it)."""

    call: Call


@dataclass
class _Running:
    """An extended module whose forward is running."""

    module: nn.Module
    nested: bool
    rng: RngState | None = field(default=None)


def extend(module: M, debug: bool = False, use_converter: bool = False) -> M:
    """Make ``module`` (a model or a loss) report to ``with backpack(...)`` blocks.

    Args:
        module: The model, any ``nn.Module`` (residual connections, attention, custom
            ``forward``: the engine handles any graph), or the loss module.
        debug: Print the modules being extended.
        use_converter: Accepted for compatibility; no conversion is needed, the module
            is returned unchanged.

    Returns:
        ``module`` itself, extended in place.

    Raises:
        TypeError: If ``module`` is not an ``nn.Module``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"extend expects an nn.Module, got {type(module).__name__}.")
    for m in module.modules():
        if getattr(m, _EXTENDED, False):
            continue
        if isinstance(m, _Loss):
            m.register_forward_hook(_loss_forward, with_kwargs=True)
        elif m is module or any(True for _ in m.parameters()):
            m.register_forward_pre_hook(_pre_forward)
            m.register_forward_hook(_post_forward, with_kwargs=True, always_call=True)
        else:
            continue
        if debug:
            print(f"[DEBUG] Extending {type(m).__name__}")
        setattr(m, _EXTENDED, True)
    return module


def _pre_forward(module: nn.Module, args: tuple[Any, ...]) -> None:
    if is_internal():
        return
    nested = bool(_RUNNING)
    record = not nested and torch.is_grad_enabled() and disable.should_store_io()
    _RUNNING.append(
        _Running(module, nested, RngState.capture(module) if record else None)
    )


def _post_forward(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
) -> None:
    if is_internal():
        return
    running = _RUNNING.pop()
    if running.nested or not torch.is_grad_enabled() or _functional(module):
        return
    if output is None:  # the forward raised (the hook runs anyway: always_call)
        return
    if not isinstance(output, Tensor):
        _warn_output(module, output)
        return
    if not output.requires_grad:
        return
    if any(True for _ in module.parameters()):
        stored = disable.should_store_io()
        call = Call(
            module,
            tuple(_detach(a) for a in args) if stored else (),
            {k: _detach(v) for k, v in kwargs.items()} if stored else {},
            running.rng,
            stored,
        )
    else:
        call = _transform(module, args, kwargs)
        if call is None:
            return
    slot = getattr(output, _SLOT, None)
    if slot is None:
        slot = _Slot(call)
        setattr(output, _SLOT, slot)
        output.register_hook(partial(_on_output_grad, slot))
    else:
        slot.call = call


def _functional(module: nn.Module) -> bool:
    """Whether the call runs with substituted parameters (``functional_call``).

    Such calls (``torch.func`` transforms of the model) are not the model's own
    forward passes; they are not tracked.
    """
    return any(not isinstance(p, nn.Parameter) for p in module.parameters())


def _transform(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Call | None:
    """An extended module without parameters applied to a tracked output.

    # NOTE [Extended modules between the model and the loss]
    # BackPACK lets extended parameter-free modules (slicing, reshaping) sit between
    # the model and the loss. Applied to the output of a tracked call, such a module
    # yields the composed call: the replay runs the model and then the module, and
    # the composed call's backward hook covers the inner call's (which is skipped).
    """
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
    slot = getattr(args[0], _SLOT, None) if args else None
    if len(tensors) != 1 or slot is None:
        return None
    inner = slot.call
    composed = Then(model_of(inner), module, kwargs)
    return Call(composed, inner.args, {}, inner.rng, inner.stored, parent=inner)


def _detach(value: Any) -> Any:
    return value.detach() if isinstance(value, Tensor) else value


def _warn_output(module: nn.Module, output: Any) -> None:
    if type(module) in _WARNED:
        return
    _WARNED.add(type(module))
    warnings.warn(
        f"bayescurv.compat.backpack: the extended {type(module).__name__} returned "
        f"{type(output).__name__}, not one tensor; its calls are not tracked. Extend "
        "the module whose output tensor the loss is computed from.",
        UserWarning,
        stacklevel=3,
    )


def _on_output_grad(slot: _Slot, grad: Tensor) -> None:
    settings = active()
    if is_internal() or not settings.extensions:
        return
    call = slot.call
    if call.covered:  # see NOTE [Extended modules between the model and the loss]
        call.covered -= 1
    else:
        loss, call.loss = call.loss, None
        compute_and_store(call, loss, grad, settings)
    if call.parent is not None:
        call.parent.covered += 1


def _loss_forward(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
) -> None:
    if is_internal() or not isinstance(output, Tensor) or not output.requires_grad:
        return
    values = [*args, kwargs.get("input"), kwargs.get("target")]
    inputs = [v for v in values if isinstance(v, Tensor)]
    if len(inputs) < 2:
        return
    prediction, targets = inputs[0], inputs[1]
    loss = LossCall(module, prediction.detach(), targets.detach())
    output.register_hook(partial(_on_loss_grad, getattr(prediction, _SLOT, None), loss))


def _on_loss_grad(slot: _Slot | None, loss: LossCall, grad: Tensor) -> None:
    settings = active()
    if is_internal() or not settings.extensions:
        return
    if slot is None:
        second = [e for e in settings.extensions if e.order != Order.FIRST]
        if second:
            raise ValueError(
                f"{[type(e).__name__ for e in second]} need the extended loss "
                f"{type(loss.module).__name__} to be applied directly to the output of "
                "an extended model: call extend(model) and compute "
                "lossfunc(model(X), y) without changing the output in between."
            )
        return
    if not bool((grad == 1).all()) and any(
        e.order != Order.FIRST for e in settings.extensions
    ):
        warnings.warn(
            f"The output of {type(loss.module).__name__} was scaled before "
            "backward(): second-order quantities are those of the loss module "
            "alone, as in BackPACK; first-order ones follow the gradient that "
            "reaches the model output.",
            UserWarning,
            stacklevel=2,
        )
    slot.call.loss = loss
