r"""KFRA: batch-averaged GGN backpropagation through chains (Botev et al., 2017).

KFRA backpropagates one matrix per layer output instead of ``C`` (or ``M``) columns
per sample: the batch-averaged GGN :math:`\bar G` w.r.t. the output of each module of
a chain, starting from the loss Hessian summed over the batch,
:math:`\bar G_L = \sum_n \nabla^2_{f_n}\ell` (it contains ``1/N`` for mean reduction).
Module-wise rules (F. Dangel, *Backpropagation beyond the gradient*, Hessian
backpropagation with the expectation approximation
:math:`\mathbb{E}_n[J_n^\top \bar G J_n]`):

* ``Linear`` :math:`z = W a + b` (2-D inputs): :math:`\bar G_a = W^\top \bar G_z W`;
* element-wise activation :math:`a = \phi(h)` (any type of the derivative table
  :mod:`bayescurv.engine.activations`):
  :math:`\bar G_h = \bar G_a \odot \frac{1}{N}\sum_n \phi'(h_n)\phi'(h_n)^\top`
  (the residual term :math:`\phi''(h) \odot \nabla_a \ell` of the Hessian is dropped:
  KFRA approximates the GGN);
* ``Flatten``, ``Identity``, ``Dropout`` in eval mode:
  :math:`\bar G` unchanged (same per-sample row-major order).

A ``Linear`` layer whose output has :math:`\bar G_z` gets ``[B, A] =
[\bar G_z, \frac{1}{N}\sum_n a_n a_n^\top]`` for its weight and ``[\bar G_z]`` for its
bias. Everything else (other graphs, other modules, layers called twice) raises.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bayescurv.engine.activations import ACTIVATIONS
from bayescurv.engine.losses import LossRule
from bayescurv.engine.recording import Record

ELEMENTWISE: tuple[type[nn.Module], ...] = tuple(ACTIVATIONS)
"""Element-wise activations KFRA backpropagates through (the derivative table's)."""
PASS_THROUGH: tuple[type[nn.Module], ...] = (nn.Identity, nn.Flatten, nn.Dropout)
"""Modules that leave the per-sample output GGN unchanged (Dropout in eval mode)."""
_SUPPORTED = (nn.Linear, *ELEMENTWISE, *PASS_THROUGH)
_COLUMN_CHUNK = 64


def kfra_factors(
    model: nn.Module,
    loss_func: nn.Module,
    rule: LossRule,
    output: Tensor,
    targets: Tensor,
    args: tuple[Tensor, ...],
    records: list[Record],
    dtype: torch.dtype | None = None,
) -> dict[nn.Parameter, list[Tensor]]:
    """KFRA factors of every trainable parameter of a chain.

    Args:
        model: An ``nn.Sequential`` (nested ones are flattened) of supported modules.
        loss_func: The loss module.
        rule: Its loss rule.
        output: The model output ``[N, *out]``.
        targets: The targets.
        args: The model inputs (a chain takes one tensor).
        records: The recorded calls of the parameterized layers.
        dtype: Accumulation dtype (``None``: the model's); inputs, weights and
            derivatives are upcast before every product.

    Returns:
        ``parameter -> factors`` (``[B, A]`` for weights, ``[B]`` for biases).

    Raises:
        NotImplementedError: For a model that is not a chain, an unsupported module
            (named with its position) or a layer called more than once.
    """
    chain = chain_modules(model)
    recorded = _recorded_by_module(records)
    inputs = _chain_inputs(chain, recorded, args[0])
    first = min(i for i, (_, m) in enumerate(chain) if m in recorded)
    dtype = dtype or output.dtype
    ggn = _loss_ggn(rule, loss_func, output.detach(), targets, dtype)
    factors: dict[nn.Parameter, list[Tensor]] = {}
    n = output.shape[0]
    for i in range(len(chain) - 1, first - 1, -1):
        module, x = chain[i][1], inputs[i]
        if isinstance(module, nn.Linear):
            x = x.to(dtype)
            for local, p in getattr(recorded.get(module), "params", {}).items():
                factors[p] = [ggn, x.T @ x / n] if local == "weight" else [ggn]
            if i > first:
                weight = module.weight.detach().to(dtype)
                ggn = weight.T @ ggn @ weight
        elif isinstance(module, ELEMENTWISE):
            d = ACTIVATIONS[type(module)].df(module, x).flatten(1).to(dtype)
            ggn = ggn * (d.T @ d / n)
    return factors


def chain_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules of a (nested) ``nn.Sequential`` in call order, checked for KFRA."""
    if type(model) is not nn.Sequential:
        raise NotImplementedError(
            f"KFRA needs the model to be an nn.Sequential chain (every module's output "
            f"the next one's input); got {type(model).__name__}. Use KFAC or KFLR for "
            "other graphs."
        )
    chain: list[tuple[str, nn.Module]] = []
    for name, module in model.named_children():
        if type(module) is nn.Sequential:
            inner = chain_modules(module)
            chain.extend((f"{name}.{sub}", m) for sub, m in inner)
        else:
            _check_module(name, module)
            chain.append((name, module))
    return chain


def _check_module(name: str, module: nn.Module) -> None:
    if type(module) not in _SUPPORTED:
        names = ", ".join(c.__name__ for c in _SUPPORTED)
        raise NotImplementedError(
            f"KFRA does not support {type(module).__name__} at '{name}'; supported "
            f"modules: {names}. Use KFAC or KFLR for this model."
        )
    if isinstance(module, nn.Dropout) and module.training:
        raise NotImplementedError(
            f"KFRA needs Dropout at '{name}' in eval mode (call model.eval()): in "
            "train mode it drops random entries."
        )


def _recorded_by_module(records: list[Record]) -> dict[nn.Module, Record]:
    recorded: dict[nn.Module, Record] = {}
    for rec in records:
        if rec.module in recorded:
            raise NotImplementedError(
                f"KFRA needs every layer called once; {type(rec.module).__name__} was "
                "called more than once (weight sharing)."
            )
        recorded[rec.module] = rec
    return recorded


def _chain_inputs(
    chain: list[tuple[str, nn.Module]], recorded: dict[nn.Module, Record], x: Tensor
) -> list[Tensor]:
    """The input of every chain module, reusing the recorded layer outputs.

    Parameter-free modules are re-applied to their (cloned, if in-place) input.
    """
    inputs = []
    current = x.detach()
    for name, module in chain:
        inputs.append(current)
        if module in recorded:
            current = recorded[module].output.detach()
        elif isinstance(module, ELEMENTWISE):
            current = ACTIVATIONS[type(module)].value(module, current)
        else:
            with torch.no_grad():
                current = module(current)
        if isinstance(module, nn.Linear) and inputs[-1].dim() != 2:
            raise NotImplementedError(
                f"KFRA supports Linear layers on 2-D inputs [N, in]; the one at "
                f"'{name}' got shape {tuple(inputs[-1].shape)}. Use KFAC or KFLR."
            )
    return inputs


def _loss_ggn(
    rule: LossRule,
    loss_func: nn.Module,
    output: Tensor,
    targets: Tensor,
    dtype: torch.dtype,
) -> Tensor:
    r""":math:`\sum_n \nabla^2_{f_n}\ell` over flattened outputs, from exact columns."""
    total = rule.num_gram_columns(output)  # NOTE [Fewest columns]
    ggn = None
    for start in range(0, total, _COLUMN_CHUNK):
        stop = min(start + _COLUMN_CHUNK, total)
        cols = rule.gram_columns(loss_func, output, targets, start, stop)
        cols = cols.flatten(2).to(dtype)
        part = torch.einsum("cni,cnj->ij", cols, cols)
        ggn = part if ggn is None else ggn + part
    return ggn
