r"""Rule for ``nn.MultiheadAttention``.

With projections :math:`q = x_q W_q^\top + b_q`, :math:`k`, :math:`v` alike (split into
``H`` heads of size ``d``), attention weights
:math:`A = \operatorname{softmax}(q k^\top / \sqrt d + M)` (``M`` the additive masks),
head outputs :math:`o = A v` and output :math:`y = o W_o^\top + b_o`, the columns
:math:`g` of the output are pulled back through the attention in closed form:

.. math::
    \delta o = g W_o, \quad \delta v = A^\top \delta o, \quad
    \delta A = \delta o\, v^\top, \quad
    \delta S = A \odot \big(\delta A - (\delta A \odot A)\mathbf{1}\mathbf{1}^\top\big),
    \quad \delta q = \delta S\, k / \sqrt d, \quad \delta k = \delta S^\top q / \sqrt d,

and every projection is then a linear layer over the sequence positions (per-sample
weight vector :math:`\sum_t \delta q_t x_{q,t}^\top`). The rule owns ``out_proj``'s
parameters (the module uses them without calling ``out_proj``). Columns of the
returned attention weights (``need_weights=True``, if used downstream) add to
:math:`\delta A`.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import Tensor, nn

from bayescurv.engine.rules.base import LayerRule
from bayescurv.engine.rules.call import LayerCall, as_call, check_reproduced, wants
from bayescurv.engine.rules.kron_stats import (
    KFACApprox,
    grouped_input_stats,
    input_stats,
)
from bayescurv.engine.rules.linear import outer_sum


class MultiheadAttentionRule(LayerRule):
    r"""Per-sample quantities of ``nn.MultiheadAttention``.

    Batch first or not, any masks, ``kdim``/``vdim``, with or without biases,
    ``add_bias_kv`` and ``add_zero_attn``, the attention weights used downstream or
    not. Attention dropout must be off (eval mode or ``dropout=0``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import engine
        >>> mha = nn.MultiheadAttention(2, 1, batch_first=True, bias=False)
        >>> class Attend(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.mha = mha
        ...     def forward(self, x):
        ...         return self.mha(x, x, x, need_weights=False)[0].flatten(1)
        >>> x, y = torch.randn(3, 1, 2), torch.randn(3, 2)
        >>> res = engine.backprop(Attend(), nn.MSELoss(reduction="sum"), x, y,
        ...                       [engine.DiagGGNExact()])
        >>> # one token attends to itself (A = 1): y = W_o W_v x, linear in W_o with
        >>> # input W_v x, so diag = 2 sum_n (W_v x_n)^2 per output row
        >>> v = x[:, 0] @ mha.in_proj_weight[4:].T
        >>> expected = 2 * (v**2).sum(0).expand(2, 2)
        >>> torch.allclose(res["diag_ggn_exact"]["mha.out_proj.weight"], expected)
        True
    """

    owns_submodules = True
    differentiable = False  # re-runs the layer on detached weights

    def check(self, module: nn.Module) -> None:  # noqa: D102
        if module.training and module.dropout > 0:
            raise ValueError(
                f"MultiheadAttention(dropout={module.dropout}) in train mode drops "
                "attention weights at random: per-sample quantities of the recorded "
                "forward cannot be recomputed. Call model.eval() first."
            )

    def output_batch_axes(self, module, call, outputs):  # noqa: D102
        query = _arguments(module, call)["query"]
        if query.dim() != 3:
            raise ValueError(
                f"MultiheadAttention was called on an unbatched query of shape "
                f"{tuple(query.shape)}; the engine needs a batch dimension."
            )
        return [0 if module.batch_first else 1, 0][: len(outputs)]

    def per_sample(self, module, inputs, grad_output):  # noqa: D102
        call, fwd = _forward(module, inputs)
        return fwd.backward(module, *_columns(call, grad_output))

    def kron_input(self, module, inputs, approx: KFACApprox):
        """Input statistics of ``out_proj`` and the ``q``, ``k``, ``v`` projections.

        See NOTE [Kronecker factors of attention].
        """
        _, fwd = _forward(module, inputs)
        stats = {"out_proj.weight": input_stats(fwd.o, approx)}
        sources = (fwd.x_q, fwd.x_k, fwd.x_v)
        if module.in_proj_weight is None:
            names = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
            stats.update(
                (n, input_stats(x, approx)) for n, x in zip(names, sources, strict=True)
            )
        elif not wants(inputs, "in_proj_weight"):
            pass
        elif _self_attention(fwd):
            stats["in_proj_weight"] = input_stats(fwd.x_q, approx)
        else:
            stats["in_proj_weight"] = grouped_input_stats(torch.stack(sources), approx)
        return stats

    def kron_output(self, module, inputs, grad_output):  # noqa: D102
        call, fwd = _forward(module, inputs)
        g_out, g_weights = _columns(call, grad_output)
        delta_q, delta_k, delta_v = fwd.deltas(g_out, g_weights)
        src = fwd.source
        projections = (delta_q, delta_k[:, :, :src], delta_v[:, :, :src])
        out = {"out_proj.weight": g_out, "out_proj.bias": g_out}
        if module.in_proj_weight is None:
            names = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
            out.update(zip(names, projections, strict=True))
        elif not wants(inputs, "in_proj_weight"):
            pass
        elif _self_attention(fwd):
            out["in_proj_weight"] = torch.cat(projections, dim=-1)
        else:
            out["in_proj_weight"] = torch.stack(projections, dim=3)
        out["in_proj_bias"] = torch.cat([d.sum(2) for d in projections], -1)[:, :, None]
        if module.bias_k is not None:
            out["bias_k"] = delta_k[:, :, src, None]
            out["bias_v"] = delta_v[:, :, src, None]
        return {name: c for name, c in out.items() if _has(module, name)}

    def kron_shapes(self, module, name, approx):  # noqa: D102
        if name in ("bias_k", "bias_v"):  # [1, 1, E]: one full block
            size = module.embed_dim
            return [(size, size)]
        return super().kron_shapes(module, name, approx)


# NOTE [Kronecker factors of attention]
# Every projection is a linear layer over sequence positions, so KFAC/KFLR treat it
# like nn.Linear on [N, T, E] (expand or reduce over the positions). out_proj acts on
# the heads' outputs o. A fused in_proj_weight [3E, E] of self-attention (query, key
# and value the same tensor) is one linear layer with output [q, k, v] per position:
# one Kronecker product [B: 3E x 3E, A: E x E]. With different query, key and value
# tensors its three row blocks see different inputs: three Kronecker blocks, grouped
# factors [3, E, E] (the blocks between q, k and v are dropped, as between the groups
# of a grouped convolution); that needs as many query as key positions (else a clear
# NotImplementedError). Separate q/k/v_proj_weight (kdim/vdim) are three linear
# layers; biases and bias_k/bias_v get their exact GGN blocks.
def _forward(
    module: nn.Module, inputs: tuple[Tensor, ...]
) -> tuple[LayerCall, _Forward]:
    """The call and its recomputed forward, checked against the recorded output."""
    call = as_call(inputs)
    fwd = _Forward(module, _arguments(module, call))
    check_reproduced(module, call, fwd.recorded_outputs(call))
    return call, fwd


def _has(module: nn.Module, name: str) -> bool:
    """Whether the (dotted) parameter ``name`` exists and is not ``None``."""
    owner, _, local = name.rpartition(".")
    holder = module.get_submodule(owner) if owner else module
    return getattr(holder, local, None) is not None


def _columns(call: LayerCall, grad_output: Tensor) -> tuple[Tensor, Tensor | None]:
    """Columns of the output ``[V, N, L, E]`` and of the attention weights, if used."""
    cols = call.unpack(grad_output)
    return cols[0], cols[1] if len(cols) > 1 else None


def _self_attention(fwd: _Forward) -> bool:
    """Whether query, key and value are the same tensor (then also ``L = S``).

    Raises:
        NotImplementedError: For different tensors with ``L != S`` positions.
    """
    x_q, x_k, x_v = fwd.x_q, fwd.x_k, fwd.x_v
    if x_q.shape == x_k.shape == x_v.shape:
        return torch.equal(x_q, x_k) and torch.equal(x_q, x_v)
    raise NotImplementedError(
        f"MultiheadAttention: the fused in_proj_weight sees {x_q.shape[1]} query and "
        f"{x_k.shape[1]} key/value positions, so its q, k and v blocks have no common "
        "Kronecker layout. Leave in_proj_weight out with params=, use kdim/vdim "
        "(separate q/k/v projections, each with its own factors), or a diagonal "
        "extension (DiagGGNExact/DiagGGNMC)."
    )


def _arguments(module: nn.Module, call: LayerCall) -> dict[str, object]:
    """The call's arguments by name, defaults filled in."""
    bound = inspect.signature(module.forward).bind(*call.args, **call.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Boolean masks (``True`` = not allowed) as additive ``-inf``/0 masks."""
    if mask is None or mask.is_floating_point():
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        mask, float("-inf")
    )


class _Forward:
    """The attention forward, batch-first, keeping what the backward needs."""

    def __init__(self, module: nn.Module, args: dict[str, object]) -> None:
        first = (lambda t: t) if module.batch_first else (lambda t: t.transpose(0, 1))
        self.x_q, self.x_k, self.x_v = (
            first(args[name]) for name in ("query", "key", "value")
        )
        self.need_weights = bool(args["need_weights"])
        self.average = bool(args["average_attn_weights"])
        n, length, e = self.x_q.shape
        self.heads, self.source = module.num_heads, self.x_k.shape[1]
        d = e // self.heads
        w_q, w_k, w_v = _projection_weights(module)
        b_q, b_k, b_v = _projection_biases(module)
        self.q = _split(_linear(self.x_q, w_q, b_q), self.heads)
        k = _linear(self.x_k, w_k, b_k)
        v = _linear(self.x_v, w_v, b_v)
        if module.bias_k is not None:
            k = torch.cat([k, module.bias_k.detach().expand(n, 1, e)], dim=1)
            v = torch.cat([v, module.bias_v.detach().expand(n, 1, e)], dim=1)
        self.k, self.v = _split(k, self.heads), _split(v, self.heads)
        if module.add_zero_attn:
            zeros = self.k.new_zeros(n, self.heads, 1, d)
            self.k = torch.cat([self.k, zeros], dim=2)
            self.v = torch.cat([self.v, zeros], dim=2)
        scores = self.q @ self.k.transpose(-2, -1) / math.sqrt(d)
        mask = self._mask(args, n, length, self.k.shape[2])
        self.attn = torch.softmax(scores if mask is None else scores + mask, dim=-1)
        self.o = _merge(self.attn @ self.v)
        self.w_o = module.out_proj.weight.detach()
        b_o = module.out_proj.bias
        self.out = _linear(self.o, self.w_o, None if b_o is None else b_o.detach())

    def _mask(self, args: dict, n: int, length: int, keys: int) -> Tensor | None:
        """Additive mask ``[N | 1, H | 1, L, S']``, padded for extra key positions."""
        dtype = self.x_q.dtype
        mask = _float_mask(args["attn_mask"], dtype)
        if mask is not None:  # [L, S] or [N * H, L, S]
            lead = (1, 1) if mask.dim() == 2 else (n, self.heads)
            mask = mask.reshape(*lead, length, mask.shape[-1])
        padding = _float_mask(args["key_padding_mask"], dtype)
        if padding is not None:
            padding = padding.reshape(n, 1, 1, -1)
            mask = padding if mask is None else mask + padding
        if mask is not None and mask.shape[-1] < keys:
            mask = torch.nn.functional.pad(mask, (0, keys - mask.shape[-1]))
        return mask

    def recorded_outputs(self, call: LayerCall) -> Tensor:
        """The recomputed outputs in the engine's recorded (batch-first) layout."""
        n = self.out.shape[0]
        parts = [self.out.reshape(n, -1)]
        if len(call.output_shapes) > 1:
            weights = self.attn.mean(1) if self.average else self.attn
            parts.append(weights.reshape(n, -1))
        return torch.cat(parts, dim=1)

    def backward(
        self, module: nn.Module, g_out: Tensor, g_weights: Tensor | None
    ) -> dict[str, Tensor]:
        """Per-sample vectors of every parameter from columns ``[V, N, L, E]``."""
        grads = {"out_proj.weight": outer_sum(g_out, self.o)}
        if module.out_proj.bias is not None:
            grads["out_proj.bias"] = g_out.sum(2)
        delta_q, delta_k, delta_v = self.deltas(g_out, g_weights)
        src = self.source
        if module.bias_k is not None:
            shape = (*g_out.shape[:2], *module.bias_k.shape)
            grads["bias_k"] = delta_k[:, :, src].reshape(shape)
            grads["bias_v"] = delta_v[:, :, src].reshape(shape)
        w = [
            outer_sum(delta, x)
            for delta, x in (
                (delta_q, self.x_q),
                (delta_k[:, :, :src], self.x_k),
                (delta_v[:, :, :src], self.x_v),
            )
        ]
        if module.in_proj_weight is not None:
            grads["in_proj_weight"] = torch.cat(w, dim=2)
        else:
            names = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
            grads.update(zip(names, w, strict=True))
        if module.in_proj_bias is not None:
            biases = (delta_q, delta_k[:, :, :src], delta_v[:, :, :src])
            grads["in_proj_bias"] = torch.cat([b.sum(2) for b in biases], dim=2)
        return grads

    def deltas(
        self, g_out: Tensor, g_weights: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Columns at the projections ``q``, ``k``, ``v``: ``[V, N, L | S', E]``.

        ``S'`` counts the extra key positions of ``add_bias_kv``/``add_zero_attn``.
        """
        d = self.q.shape[-1]
        delta_o = _split(g_out @ self.w_o, self.heads)
        delta_v = torch.einsum("nhls,vnhld->vnhsd", self.attn, delta_o)
        delta_a = torch.einsum("vnhld,nhsd->vnhls", delta_o, self.v)
        if g_weights is not None:
            delta_a = delta_a + (
                g_weights.unsqueeze(2) / self.heads if self.average else g_weights
            )
        delta_s = self.attn * (delta_a - (delta_a * self.attn).sum(-1, keepdim=True))
        delta_q = _merge(torch.einsum("vnhls,nhsd->vnhld", delta_s, self.k)) / d**0.5
        delta_k = _merge(torch.einsum("vnhls,nhld->vnhsd", delta_s, self.q)) / d**0.5
        return delta_q, delta_k, _merge(delta_v)


def _projection_weights(module: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    if module.in_proj_weight is not None:
        return module.in_proj_weight.detach().chunk(3)
    return tuple(
        getattr(module, f"{name}_proj_weight").detach() for name in ("q", "k", "v")
    )


def _projection_biases(module: nn.Module) -> tuple[Tensor | None, ...]:
    if module.in_proj_bias is None:
        return (None, None, None)
    return module.in_proj_bias.detach().chunk(3)


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.nn.functional.linear(x, weight, bias)


def _split(x: Tensor, heads: int) -> Tensor:
    """``[..., T, E]`` to ``[..., H, T, d]``."""
    *lead, t, e = x.shape
    return x.reshape(*lead, t, heads, e // heads).transpose(-3, -2)


def _merge(x: Tensor) -> Tensor:
    """``[..., H, T, d]`` to ``[..., T, E]``."""
    *lead, h, t, d = x.shape
    return x.transpose(-3, -2).reshape(*lead, t, h * d)
