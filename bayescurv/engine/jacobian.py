r"""Per-sample Jacobians of the model output: the :class:`Jacobian` extension.

With the model output :math:`f` of shape ``[N, *out]`` flattened per sample into ``C``
entries, the Jacobian rows of sample ``n`` are the vector-Jacobian products of the unit
vectors :math:`e_c`:

.. math:: J[c, n] = \frac{\partial f_{n,c}}{\partial \theta}
    = \Big(\frac{\partial f_n}{\partial \theta}\Big)^\top e_c .

This is exactly what :class:`~bayescurv.engine.SqrtGGNExact` computes with the loss
Hessian's square-root columns replaced by the identity: the engine pulls the columns
:math:`e_c` (placed in every sample at once) back to all recorded layer outputs in
chunks of columns and the layer rules turn them into per-sample vectors. No loss is
involved.

# NOTE [Factored Jacobians of linear layers]
# For ``nn.Linear`` with input :math:`a_n` and output :math:`z_n = W a_n + b`, the
# Jacobian w.r.t. the row-major weight is :math:`G_n \otimes a_n^\top` with
# :math:`G_n = \partial f_n / \partial z_n` ``[C, out]``, and w.r.t. the bias it is
# :math:`G_n`. The columns pulled back to the layer output *are* :math:`G` (as
# ``[C, N, out]``), so ``Jacobian(factored=True)`` keeps them and the recorded input
# instead of the explicit ``[C, N, out, in]``: memory ``C N (out + in)`` instead of
# ``C N out in``. A layer applied at ``T`` positions (``nn.Linear`` on ``[N, *, in]``
# sequences, an ungrouped convolution on its ``T`` unfolded patches) has the sum
# :math:`\sum_t G_{n,t} \otimes a_{n,t}^\top` with ``G [C, N, T, out]`` and
# ``a [N, T, in]``; the patches are unfolded once per call, not per column chunk.
# Only layers for which this is the whole Jacobian qualify: called once in the forward
# pass, with parameters no other call uses, no folded batch axis, and with the
# registered ``LinearRule`` or ``ConvRule``. (Recorded tensors that a later in-place
# op would overwrite are kept as copies by the engine's safe mode, so they qualify.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from bayescurv.engine.extensions import Columns, Extension, Reduction
from bayescurv.engine.losses import diagonal_columns
from bayescurv.engine.recording import Record
from bayescurv.engine.rules import ConvRule, LinearRule
from bayescurv.engine.rules.conv import unfold_input


@dataclass(frozen=True)
class Jacobian(Extension):
    r"""Per-sample Jacobians of the model output, ``jacobian``, ``[C, N, *p]``.

    .. math:: \text{jacobian}[c, n] = \partial f_{n,c} / \partial \theta

    with ``C`` the number of output entries per sample (the output ``[N, *out]``
    flattened per sample). Needs no loss: ``backprop(model, None, x, None,
    [Jacobian()])`` works; with a loss and other extensions it shares their forward
    pass. Columns are processed in chunks under ``memory_budget`` / ``chunk_size``
    with identical results. Layers called several times (or tied parameters) get the
    sum over their calls.

    Args:
        factored: Return :class:`LinearJacobian` (the layer input and
            :math:`\partial f / \partial z`) instead of the explicit tensor for the
            weight and bias of every ``nn.Linear`` called once on ``[N, in]`` inputs
            (see NOTE [Factored Jacobians of linear layers]); explicit tensors for
            all other parameters.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import engine
        >>> model = nn.Linear(3, 2)
        >>> x = torch.randn(5, 3)
        >>> res = engine.backprop(model, None, x, None, [engine.Jacobian()])
        >>> J = res["jacobian"]["weight"]  # [C, N, out, in] = d f_nc / d W
        >>> J.shape, torch.equal(J[1, 4], torch.outer(torch.eye(2)[1], x[4]))
        (torch.Size([2, 5, 2, 3]), True)
        >>> factored = engine.backprop(
        ...     model, None, x, None, [engine.Jacobian(factored=True)])
        >>> torch.equal(factored["jacobian"]["weight"].dense(), J)
        True
    """

    savefield: ClassVar[str] = "jacobian"
    columns: ClassVar[Columns] = Columns.IDENTITY
    reductions: ClassVar[tuple[Reduction, ...]] = (Reduction.PER_SAMPLE,)
    factored: bool = False


@dataclass(frozen=True)
class LinearJacobian:
    r"""The factored Jacobian of an ``nn.Linear`` (or convolution) weight or bias.

    For :math:`z_n = W a_n + b` and :math:`G_{cn} = \partial f_{n,c} / \partial z_n`,
    the weight's Jacobian rows are :math:`G_{cn} a_n^\top` (``[out, in]``) and the
    bias's are :math:`G_{cn}`. A layer applied at ``T`` positions (sequences,
    convolution patches) has :math:`\sum_t G_{cnt} a_{nt}^\top`.

    Attributes:
        inputs: The layer input :math:`a` ``[N, in]`` (or ``[N, T, in]`` at ``T``
            positions) for the weight, ``None`` for the bias.
        grads: :math:`G` ``[C, N, out]`` (or ``[C, N, T, out]`` with positions).
        param_shape: The parameter's shape if it is not ``[out, in]`` (a
            convolution's ``[out, in, *kernel]``, flattened row-major to
            ``[out, in * K]`` as its unfolded patches).

    Example:
        >>> import torch
        >>> a, g = torch.tensor([[1.0, 2.0]]), torch.tensor([[[3.0]]])  # C=N=out=1
        >>> LinearJacobian(a, g).dense()  # G a^T per column and sample
        tensor([[[[3., 6.]]]])
        >>> a2, g2 = torch.ones(1, 2, 2), torch.ones(1, 1, 2, 1)  # T=2 positions
        >>> LinearJacobian(a2, g2).dense()  # the sum over positions
        tensor([[[[2., 2.]]]])
    """

    inputs: Tensor | None
    grads: Tensor
    param_shape: torch.Size | None = None

    @property
    def shape(self) -> torch.Size:
        """The shape of :meth:`dense`: ``[C, N, out, in]`` or ``[C, N, out]``."""
        if self.inputs is None:
            return self.grads.shape
        lead = self.grads.shape[:2]
        if self.param_shape is not None:
            return torch.Size((*lead, *self.param_shape))
        return torch.Size((*lead, self.grads.shape[-1], self.inputs.shape[-1]))

    def dense(self) -> Tensor:
        """The explicit Jacobian ``[C, N, *p]``, as ``Jacobian(factored=False)``."""
        if self.inputs is None:
            return self.grads
        if self.inputs.dim() == 2:
            return self.grads.unsqueeze(-1) * self.inputs[None, :, None, :]
        return torch.einsum("cnto,nti->cnoi", self.grads, self.inputs).reshape(
            self.shape
        )


def identity_columns(output: Tensor, start: int, stop: int) -> Tensor:
    """Unit vectors ``e_c`` of output entries ``start`` to ``stop`` in every sample.

    Returns:
        ``[stop - start, *output.shape]``.
    """
    ones = torch.ones(output.shape, dtype=output.dtype, device=output.device)
    return diagonal_columns(ones, start, stop)


class FactoredLinear:
    """The pulled-back columns of the layers that get a :class:`LinearJacobian`.

    Args:
        records: The recorded layer calls of the forward pass.
    """

    def __init__(self, records: list[Record]) -> None:
        calls: dict[int, int] = {}
        for rec in records:
            for key in (id(rec.module), *(id(p) for p in rec.params.values())):
                calls[key] = calls.get(key, 0) + 1
        self.records = records
        self.indices = [
            i
            for i, rec in enumerate(records)
            if _qualifies(rec)
            and calls[id(rec.module)] == 1
            and all(calls[id(p)] == 1 for p in rec.params.values())
        ]
        self.chunks: list[list[Tensor | None]] = []

    def parameters(self) -> set[nn.Parameter]:
        """The parameters that get a :class:`LinearJacobian`."""
        return {p for i in self.indices for p in self.records[i].params.values()}

    def sizes(self) -> dict[nn.Parameter, tuple[int, int]]:
        """Per sample, the columns' entries per output and the patches' entries.

        ``parameter -> (output entries, unfolded input entries)``, what a factored
        Jacobian holds besides the recorded input (for memory estimates).
        """
        out: dict[nn.Parameter, tuple[int, int]] = {}
        for i in self.indices:
            rec = self.records[i]
            entries = rec.output[0].numel()
            patches = 0
            if isinstance(rec.module, nn.modules.conv._ConvNd):
                positions = entries // rec.module.out_channels
                patches = positions * rec.module.weight[0].numel()
            for p in rec.params.values():
                out[p] = (entries, patches)
        return out

    def add_chunk(self, pulled: list[Tensor]) -> None:
        """Keep one chunk's columns ``[V, N, out]`` at the qualifying layer outputs."""
        self.chunks.append([pulled[i] for i in self.indices])

    def result(self) -> dict[nn.Parameter, LinearJacobian]:
        """``parameter -> LinearJacobian`` of every qualifying layer."""
        out: dict[nn.Parameter, LinearJacobian] = {}
        for k, i in enumerate(self.indices):
            rec = self.records[i]
            parts = [chunk[k] for chunk in self.chunks]
            grads = parts[0] if len(parts) == 1 else torch.cat(parts)
            inputs, grads, shape = _positions(rec, grads)
            for local, p in rec.params.items():
                if local == "weight":
                    out[p] = LinearJacobian(inputs, grads, shape)
                else:  # the bias: summed over positions
                    out[p] = LinearJacobian(
                        None, grads if inputs.dim() == 2 else grads.sum(2)
                    )
        return out


def _positions(rec: Record, grads: Tensor) -> tuple[Tensor, Tensor, torch.Size | None]:
    """Inputs ``[N, (T,) in]``, columns ``[V, N, (T,) out]`` and the weight's shape."""
    x = rec.inputs[0]
    if isinstance(rec.rule, ConvRule):
        patches = unfold_input(rec.module, x).transpose(1, 2)  # [N, T, in * K]
        v, n, c_out = grads.shape[:3]
        columns = grads.reshape(v, n, c_out, -1).transpose(2, 3)  # [V, N, T, out]
        return patches, columns, rec.module.weight.shape
    if x.dim() == 2:
        return x, grads, None
    n, v = x.shape[0], grads.shape[0]
    return x.reshape(n, -1, x.shape[-1]), grads.reshape(v, n, -1, grads.shape[-1]), None


def _qualifies(rec: Record) -> bool:
    if rec.fold != 1:
        return False
    if type(rec.module) is nn.Linear and isinstance(rec.rule, LinearRule):
        return rec.inputs[0].dim() >= 2
    return (
        type(rec.module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d)
        and isinstance(rec.rule, ConvRule)
        and rec.module.groups == 1
    )
