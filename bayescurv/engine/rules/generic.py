r"""The generic rule: per-sample quantities of any layer from :mod:`torch.func`.

For a layer :math:`y = f(x; \theta)` whose samples do not interact, the per-sample,
per-column parameter vectors are vector-Jacobian products of the forward of one sample,

.. math:: J_{vn} = \Big(\frac{\partial f(x_n; \theta)}{\partial \theta}\Big)^\top
    g_{vn},

computed with :func:`torch.func.vjp` of the layer's forward
(:func:`torch.func.functional_call` overriding the layer's own trainable parameters),
under :func:`torch.func.vmap` over the columns ``v`` and over the samples ``n`` of the
recorded call. It re-runs the layer's forward, so it costs more than a hand-written
rule, and it needs a deterministic forward that :func:`torch.func.vmap` can vectorize.

# NOTE [Differentiable results]
# Normally the rule runs under ``torch.no_grad()`` on detached parameters. When the
# engine records with ``create_graph=True`` (the recorded inputs or the columns carry
# an autograd graph), it runs with gradients enabled on the parameters themselves:
# ``torch.func`` transforms compose with ordinary autograd, so the per-sample vectors
# stay differentiable w.r.t. inputs, columns and parameters.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from bayescurv.engine.rules.base import LayerRule
from bayescurv.engine.rules.call import (
    LayerCall,
    as_call,
    check_reproduced,
    flatten,
    wants,
)


class GenericRule(LayerRule):
    r"""Per-sample quantities of any layer via ``torch.func`` (vjp under vmap).

    Used automatically (with a one-time warning per class) for layers that hold
    trainable parameters but have no registered rule; register it explicitly to
    silence the warning. It covers the layer's *own* parameters
    (``named_parameters(recurse=False)``): submodules with parameters are recorded on
    their own, and their parameters are held fixed when the layer's forward is
    differentiated. Every tensor argument (positional or keyword, nested ones
    included) is taken to carry the batch on axis 0 and every tensor output too;
    subclass and override :meth:`input_batch_axes` and
    :meth:`~LayerRule.output_batch_axes` for other layouts.

    Raises ``ValueError`` when the recomputed per-sample forward does not reproduce
    the recorded output (samples that interact, random forward, wrong batch axes)
    and ``RuntimeError`` naming the layer when :func:`torch.func.vmap` cannot
    vectorize its forward.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import engine
        >>> class Scale(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.weight = nn.Parameter(torch.tensor([2.0, -1.0]))
        ...     def forward(self, x):
        ...         return x * self.weight
        >>> engine.register_rule(Scale, engine.GenericRule())
        >>> x, y = torch.randn(4, 2), torch.randn(4, 2)
        >>> res = engine.backprop(Scale(), nn.MSELoss(reduction="sum"), x, y,
        ...                       [engine.DiagGGNExact()])
        >>> # closed form: GGN diagonal of sum_n ||x_n * w - y_n||^2 is 2 sum_n x_n^2
        >>> torch.allclose(res["diag_ggn_exact"]["weight"], 2 * (x**2).sum(0))
        True
    """

    def check(self, module: nn.Module) -> None:  # noqa: D102
        for sub in module.modules():
            name = type(sub).__name__
            if isinstance(sub, nn.modules.batchnorm._BatchNorm) and (
                sub.training or sub.running_mean is None
            ):
                raise ValueError(
                    f"{type(module).__name__} contains {name} normalizing with batch "
                    "statistics, which couple the samples: the generic rule cannot "
                    "compute per-sample quantities. Call model.eval() first."
                )
            if isinstance(sub, nn.modules.dropout._DropoutNd) and (
                sub.training and sub.p > 0
            ):
                raise ValueError(
                    f"{type(module).__name__} contains {name} in train mode: the "
                    "generic rule re-runs the forward and needs it deterministic. "
                    "Call model.eval() first."
                )

    def input_batch_axes(self, module: nn.Module, call: LayerCall) -> tuple[Any, Any]:
        """Batch axes of the call's ``(args, kwargs)``, as ``vmap`` ``in_dims``.

        The default maps every tensor with at least one dimension along axis 0.
        """
        leaves, rebuild = flatten((call.args, call.kwargs))
        return rebuild(
            [0 if isinstance(x, Tensor) and x.dim() > 0 else None for x in leaves]
        )

    def per_sample(self, module, inputs, grad_output):  # noqa: D102
        call = as_call(inputs)
        # see NOTE [Differentiable results]
        keep_graph = torch.is_grad_enabled() and any(
            t.requires_grad for t in (grad_output, *call.tensors())
        )
        params = {
            name: p if keep_graph else p.detach()
            for name, p in module.named_parameters(recurse=False)
            if p.requires_grad and wants(call, name)
        }
        args_axes, kwargs_axes = self.input_batch_axes(module, call)
        out_axes = call.output_axes
        v, n = grad_output.shape[:2]

        def sample_output(
            theta: dict[str, Tensor], args: tuple, kwargs: dict
        ) -> Tensor:
            batched = _unsqueeze((args, kwargs), (args_axes, kwargs_axes))
            # only the layer's own attributes: a child sharing a parameter is
            # recorded (and counted) on its own
            out = functional_call(
                module, theta, batched[0], batched[1], tie_weights=False
            )
            return _flat_sample(module, out, out_axes)

        def one_sample(args: tuple, kwargs: dict, g: Tensor) -> tuple[Tensor, Any]:
            out, pull = vjp(lambda theta: sample_output(theta, args, kwargs), params)
            (grads,) = vmap(pull)(g)
            return out, grads

        columns = grad_output.reshape(v, n, -1)
        mapped = vmap(one_sample, in_dims=(args_axes, kwargs_axes, 1), out_dims=(0, 1))
        try:
            with torch.set_grad_enabled(keep_graph), warnings.catch_warnings():
                # vmap's per-sample fallback for ops without a batching rule
                warnings.filterwarnings("ignore", message=".*performance drop.*")
                outputs, grads = mapped(call.args, call.kwargs, columns)
        except RuntimeError as err:
            raise RuntimeError(
                f"The generic rule cannot evaluate {type(module).__name__} one sample "
                f"at a time with torch.func ({err}). Register a hand-written rule "
                "with bayescurv.engine.register_rule."
            ) from err
        check_reproduced(module, call, outputs)
        return grads


def _unsqueeze(tree: Any, axes: Any) -> Any:
    """Re-insert a batch axis of size one where ``vmap`` removed it."""
    leaves, rebuild = flatten(tree)
    axis_leaves, _ = flatten(axes)
    return rebuild(
        [
            x if ax is None else x.unsqueeze(ax)
            for x, ax in zip(leaves, axis_leaves, strict=True)
        ]
    )


def _flat_sample(
    module: nn.Module, output: Any, axes: tuple[int | None, ...] | None
) -> Tensor:
    """One sample's recorded outputs (batch axis of size one) as one flat vector."""
    leaves, _ = flatten(output)
    if axes is None:  # not recorded by the engine: every tensor, batch on axis 0
        axes = tuple(0 if isinstance(x, Tensor) else None for x in leaves)
    if len(leaves) != len(axes):
        raise ValueError(
            f"{type(module).__name__} returned {len(leaves)} outputs when re-run, "
            f"but {len(axes)} when recorded."
        )
    parts = []
    for i, (leaf, ax) in enumerate(zip(leaves, axes, strict=True)):
        if ax is None:
            continue
        if leaf.dim() <= ax or leaf.shape[ax] != 1:
            raise ValueError(
                f"{type(module).__name__}: output {i} has shape {tuple(leaf.shape)} "
                f"for a single sample, expected size 1 along its batch axis {ax}: "
                "its output does not carry the batch on that axis (or the samples "
                "interact)."
            )
        parts.append(leaf.select(ax, 0).reshape(-1))
    return torch.cat(parts)
