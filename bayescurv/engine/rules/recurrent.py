r"""One rule for ``nn.RNN``, ``nn.LSTM`` and ``nn.GRU``.

Every weight of a recurrent layer enters through a linear map applied at each time
step, e.g. :math:`a^{ih}_t = W_{ih} x_t + b_{ih}` and
:math:`a^{hh}_t = W_{hh} h_{t-1} + b_{hh}`. With :math:`\delta_{vnt}` the column
``v`` of sample ``n`` pulled back to such a pre-activation, the per-sample vectors are
those of a linear layer over the time positions,

.. math:: J^{W_{ih}}_{vn} = \sum_t \delta^{ih}_{vnt} x_{nt}^\top, \qquad
    J^{W_{hh}}_{vn} = \sum_t \delta^{hh}_{vnt} h_{n,t-1}^\top, \qquad
    J^{b}_{vn} = \sum_t \delta_{vnt}.

# NOTE [Recurrent layers: unroll, then autograd]
# The pre-activation columns need backpropagation through time, which is the
# layer's own backward. The rule re-runs the layer unrolled with the gate equations
# (LSTM: i, f, g, o; GRU: r, z, n with n = tanh(a_in + r * a_hn); RNN: tanh/relu),
# checks the result against the recorded output, and pulls the columns back to the
# pre-activations of all time steps at once with autograd. Samples do not interact,
# so gradients w.r.t. a per-sample tensor are per-sample quantities: no per-sample
# loop and no vmap over samples (which torch.func cannot do for the fused RNN
# kernels). For LSTM and RNN the ih and hh pre-activations are summed, so one delta
# serves both; GRU's hh part of the n gate is gated by r and gets its own.
#
# NOTE [Recurrent layers: columns folded into the batch]
# The V columns are folded into the batch (the input repeated V times, one plain
# backward with the columns as its gradient) instead of a vmapped backward
# (``is_grads_batched``): per-op batching overhead over the T * layers small steps
# of the unrolled graph made that ~3x slower. Memory: the unrolled forward is held
# for V * N sequences, so columns are processed in chunks of at most
# ``RecurrentRule.max_elements`` activation entries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from bayescurv.engine.rules.base import LayerRule
from bayescurv.engine.rules.call import LayerCall, as_call, check_reproduced
from bayescurv.engine.rules.kron_stats import KFACApprox, input_stats
from bayescurv.engine.rules.linear import outer_sum

_Make = Callable[[nn.Module, "_Direction", list[Tensor], int], dict[str, Tensor]]
"""Per-direction results from the pre-activation columns ``[V, N, T, *]``."""


@dataclass
class _Direction:
    """What one layer and direction needs for its per-sample vectors."""

    suffix: str
    inputs: Tensor  # [N, T, in], the layer input
    a_ih: Tensor  # [N, T, G * H], graph node
    h_prev: list[Tensor] = field(default_factory=list)  # T tensors [N, P]
    probe_hh: Tensor | None = None  # GRU: zeros added to the hh pre-activations
    m: list[Tensor] = field(default_factory=list)  # LSTM with projections
    probe_hr: Tensor | None = None


class RecurrentRule(LayerRule):
    r"""Per-sample quantities of ``nn.RNN``, ``nn.LSTM`` and ``nn.GRU``.

    Tanh/relu RNNs, LSTMs with ``proj_size``, any ``num_layers``, bidirectional,
    ``batch_first`` or not, with or without biases and initial states; every output
    may be used downstream (``output``, ``h_n``, ``c_n``). Inter-layer dropout must
    be off (eval mode or ``dropout=0``); packed sequences are not supported.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import engine
        >>> rnn = nn.RNN(2, 1, nonlinearity="relu", bias=False, batch_first=True)
        >>> with torch.no_grad():
        ...     _ = rnn.weight_hh_l0.zero_()
        ...     _ = rnn.weight_ih_l0.copy_(torch.tensor([[1.0, 1.0]]))
        >>> class Last(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.rnn = rnn
        ...     def forward(self, x):
        ...         return self.rnn(x)[1][0]  # h_n of the single layer, [N, 1]
        >>> x, y = torch.rand(5, 3, 2), torch.randn(5, 1)
        >>> res = engine.backprop(Last(), nn.MSELoss(reduction="sum"), x, y,
        ...                       [engine.DiagGGNExact()])
        >>> # W_hh = 0 and x >= 0: h_n = W_ih x_last, so diag = 2 sum_n x_last^2
        >>> expected = 2 * (x[:, -1] ** 2).sum(0, keepdim=True)
        >>> torch.allclose(res["diag_ggn_exact"]["rnn.weight_ih_l0"], expected)
        True
    """

    differentiable = False  # unrolls the layer on detached weights and states

    def check(self, module: nn.Module) -> None:  # noqa: D102
        if module.training and module.dropout > 0 and module.num_layers > 1:
            raise ValueError(
                f"{type(module).__name__}(dropout={module.dropout}) in train mode "
                "drops activations between layers at random: per-sample quantities "
                "of the recorded forward cannot be recomputed. Call model.eval()."
            )

    def output_batch_axes(self, module, call, outputs):  # noqa: D102
        x = call.args[0] if call.args else call.kwargs.get("input")
        name = type(module).__name__
        if not isinstance(x, Tensor):
            raise ValueError(
                f"{name} was called with {type(x).__name__}: packed sequences are "
                "not supported, pass a padded tensor."
            )
        if x.dim() != 3:
            raise ValueError(
                f"{name} was called on an unbatched input of shape "
                f"{tuple(x.shape)}; the engine needs a batch dimension."
            )
        return [0 if module.batch_first else 1] + [1] * (len(outputs) - 1)

    max_elements: int = 2**24
    """Bound on the unrolled activations (elements) of one chunk of columns."""

    def per_sample(self, module, inputs, grad_output):  # noqa: D102
        return self._by_direction(module, as_call(inputs), grad_output, _per_sample)

    def kron_input(self, module, inputs, approx: KFACApprox):
        """Each weight's inputs per time step: ``x_t``, ``h_{t-1}``, LSTM's ``m_t``.

        See NOTE [Kronecker factors of recurrent layers].
        """
        x, h0, c0 = _call_inputs(module, as_call(inputs))
        with torch.no_grad():
            _, directions = _unroll(module, x, h0, c0)
        stats = {}
        for d in directions:
            stats[f"weight_ih{d.suffix}"] = input_stats(d.inputs, approx)
            stats[f"weight_hh{d.suffix}"] = input_stats(
                torch.stack(d.h_prev, 1), approx
            )
            if d.m:
                stats[f"weight_hr{d.suffix}"] = input_stats(torch.stack(d.m, 1), approx)
        return stats

    def kron_output(self, module, inputs, grad_output):  # noqa: D102
        return self._by_direction(module, as_call(inputs), grad_output, _kron_vectors)

    def _by_direction(
        self, module: nn.Module, call: LayerCall, grad_output: Tensor, make: _Make
    ) -> dict[str, Tensor]:
        """``make`` of the pre-activation columns of every layer and direction.

        Columns are processed in chunks (see NOTE [Recurrent layers: columns folded
        into the batch]) whose results are concatenated along the column axis.
        """
        x, h0, c0 = _call_inputs(module, call)
        chunk = max(1, self.max_elements // _elements_per_column(module, x))
        if grad_output.shape[0] > chunk:
            pieces = [
                self._by_direction(
                    module, call, grad_output[start : start + chunk], make
                )
                for start in range(0, grad_output.shape[0], chunk)
            ]
            return {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}
        v, n = grad_output.shape[:2]
        # see NOTE [Recurrent layers: columns folded into the batch]
        x, h0 = x.repeat(v, 1, 1), h0.repeat(1, v, 1)
        c0 = None if c0 is None else c0.repeat(1, v, 1)
        with torch.enable_grad():
            outputs, directions = _unroll(module, x, h0, c0)
        axes = call.output_axes or (0,) * len(outputs)
        recorded = [
            out for out, ax in zip(outputs, axes, strict=True) if ax is not None
        ]
        check_reproduced(
            module, call, torch.cat([out[:n].reshape(n, -1) for out in recorded], 1)
        )
        columns = [c.reshape(v * n, *c.shape[2:]) for c in call.unpack(grad_output)]
        targets = [t for d in directions for t in _targets(d)]
        grads = torch.autograd.grad(recorded, targets, columns, allow_unused=True)
        deltas = iter(
            torch.zeros_like(t) if g is None else g
            for g, t in zip(grads, targets, strict=True)
        )
        result: dict[str, Tensor] = {}
        for d in directions:
            found = [
                next(deltas).reshape(v, n, *d.a_ih.shape[1:-1], -1) for _ in _targets(d)
            ]
            result.update(make(module, d, found, n))
        return result


def _elements_per_column(module: nn.Module, x: Tensor) -> int:
    """Rough size of the unrolled forward of one column: gates and states per step."""
    gates = {"LSTM": 4, "GRU": 3}.get(module.mode, 1)
    per_step = (gates + 3) * module.hidden_size + 2 * (module.proj_size or 0)
    directions = 2 if module.bidirectional else 1
    return max(1, x.shape[0] * x.shape[1] * module.num_layers * directions * per_step)


def _targets(d: _Direction) -> list[Tensor]:
    return [t for t in (d.a_ih, d.probe_hh, d.probe_hr) if t is not None]


def _per_sample(
    module: nn.Module, d: _Direction, deltas: list[Tensor], n: int
) -> dict[str, Tensor]:
    """Linear-layer per-sample vectors of one layer and direction.

    ``deltas`` are ``[V, N, T, *]``; the forward values of the first ``N`` rows of the
    folded batch are those of every column.
    """
    delta_ih = deltas[0]
    delta_hh = deltas[1] if d.probe_hh is not None else delta_ih
    h_prev = torch.stack(d.h_prev, dim=1)[:n]
    out = {
        f"weight_ih{d.suffix}": torch.einsum("vntg,nti->vngi", delta_ih, d.inputs[:n]),
        f"weight_hh{d.suffix}": torch.einsum("vntg,ntp->vngp", delta_hh, h_prev),
    }
    if module.bias:
        out[f"bias_ih{d.suffix}"] = delta_ih.sum(2)
        out[f"bias_hh{d.suffix}"] = delta_hh.sum(2)
    if d.probe_hr is not None:
        m = torch.stack(d.m, dim=1)[:n]
        out[f"weight_hr{d.suffix}"] = outer_sum(deltas[-1], m)
    return out


# NOTE [Kronecker factors of recurrent layers]
# Every weight of a recurrent layer is a linear map applied at each time step with
# per-sample vectors sum_t delta_t a_t^T (a_t = x_t, h_{t-1} or LSTM's m_t), the form
# of a Linear layer whose positions are the time steps: KFAC/KFLR "expand" and
# "reduce" (Eschenhagen et al., 2023) apply as they are, with B from the
# pre-activation columns delta_t (backpropagated through time by the rule) and A from
# the step inputs of the unrolled forward. As for any layer the factors ignore that
# h_{t-1} itself depends on the weights (that dependence is in the columns). The
# biases get their exact GGN blocks (per-sample vectors sum_t delta_t).
def _kron_vectors(
    module: nn.Module, d: _Direction, deltas: list[Tensor], n: int
) -> dict[str, Tensor]:
    """Output-side vectors ``[V, N, T, d_out]`` of one layer and direction."""
    delta_ih = deltas[0]
    delta_hh = deltas[1] if d.probe_hh is not None else delta_ih
    out = {f"weight_ih{d.suffix}": delta_ih, f"weight_hh{d.suffix}": delta_hh}
    if module.bias:
        out[f"bias_ih{d.suffix}"] = delta_ih
        out[f"bias_hh{d.suffix}"] = delta_hh
    if d.probe_hr is not None:
        out[f"weight_hr{d.suffix}"] = deltas[-1]
    return out


def _call_inputs(
    module: nn.Module, call: LayerCall
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Batch-first input ``[N, T, in]``, ``h_0`` ``[L * D, N, P]``, LSTM's ``c_0``."""
    x = call.args[0] if call.args else call.kwargs["input"]
    x = x if module.batch_first else x.transpose(0, 1)
    hx = call.args[1] if len(call.args) > 1 else call.kwargs.get("hx")
    layers = module.num_layers * (2 if module.bidirectional else 1)
    n = x.shape[0]
    size = module.proj_size or module.hidden_size
    if hx is None:
        h0 = x.new_zeros(layers, n, size)
        c0 = x.new_zeros(layers, n, module.hidden_size)
        return x, h0, c0 if module.mode == "LSTM" else None
    if module.mode == "LSTM":
        return x, hx[0].detach(), hx[1].detach()
    return x, hx.detach(), None


def _unroll(
    module: nn.Module, x: Tensor, h0: Tensor, c0: Tensor | None
) -> tuple[list[Tensor], list[_Direction]]:
    """Re-run the layer; outputs batch-first (``output``, ``h_n``, ``c_n``)."""
    num_dirs = 2 if module.bidirectional else 1
    layer_in, h_n, c_n, directions = x, [], [], []
    for layer in range(module.num_layers):
        outs = []
        for rev in range(num_dirs):
            idx = layer * num_dirs + rev
            d = _direction(module, layer, rev, layer_in)
            seq, h, c = _run_direction(
                module, d, h0[idx], None if c0 is None else c0[idx], bool(rev)
            )
            outs.append(seq)
            h_n.append(h)
            c_n.append(c)
            directions.append(d)
        layer_in = torch.cat(outs, dim=-1)
    outputs = [layer_in, torch.stack(h_n, dim=1)]
    if module.mode == "LSTM":
        outputs.append(torch.stack(c_n, dim=1))
    return outputs, directions


def _weights(module: nn.Module, suffix: str) -> dict[str, Tensor | None]:
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
    return {
        k: (
            getattr(module, k + suffix).detach()
            if hasattr(module, k + suffix)
            else None
        )
        for k in names
    }


def _direction(module: nn.Module, layer: int, rev: int, layer_in: Tensor) -> _Direction:
    suffix = f"_l{layer}" + ("_reverse" if rev else "")
    w = _weights(module, suffix)
    a_ih = torch.nn.functional.linear(layer_in, w["weight_ih"], w["bias_ih"])
    if not a_ih.requires_grad:
        a_ih.requires_grad_(True)
    d = _Direction(suffix, layer_in.detach(), a_ih)
    n, t = layer_in.shape[:2]
    if module.mode == "GRU":
        d.probe_hh = a_ih.new_zeros(n, t, a_ih.shape[-1], requires_grad=True)
    if w["weight_hr"] is not None:
        d.probe_hr = a_ih.new_zeros(n, t, module.proj_size, requires_grad=True)
    return d


def _run_direction(
    module: nn.Module, d: _Direction, h: Tensor, c: Tensor | None, reverse: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One direction over the sequence: outputs ``[N, T, P]``, final ``h``, ``c``."""
    w = _weights(module, d.suffix)
    steps = range(d.a_ih.shape[1])
    seq: list[Tensor] = [None] * len(steps)  # type: ignore[list-item]
    for t in reversed(steps) if reverse else steps:
        d.h_prev.append(h.detach())
        a_hh = torch.nn.functional.linear(h, w["weight_hh"], w["bias_hh"])
        if d.probe_hh is not None:
            a_hh = a_hh + d.probe_hh[:, t]
        h, c = _cell(module.mode, d.a_ih[:, t], a_hh, h, c)
        if w["weight_hr"] is not None:
            d.m.append(h.detach())
            h = torch.nn.functional.linear(h, w["weight_hr"]) + d.probe_hr[:, t]
        seq[t] = h
    if reverse:  # per-step values in time order, as the inputs
        d.h_prev.reverse()
        d.m.reverse()
    return torch.stack(seq, dim=1), h, c


def _cell(
    mode: str, a_ih: Tensor, a_hh: Tensor, h: Tensor, c: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """One step of the gate equations (as documented for ``nn.RNN/LSTM/GRU``)."""
    if mode == "LSTM":
        i, f, g, o = (a_ih + a_hh).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "GRU":
        r_i, z_i, n_i = a_ih.chunk(3, dim=-1)
        r_h, z_h, n_h = a_hh.chunk(3, dim=-1)
        r, z = torch.sigmoid(r_i + r_h), torch.sigmoid(z_i + z_h)
        cand = torch.tanh(n_i + r * n_h)
        return (1 - z) * cand + z * h, None
    a = a_ih + a_hh
    return (torch.tanh(a) if mode == "RNN_TANH" else torch.relu(a)), None
