r"""Rule for ``nn.Linear`` on inputs ``[N, *, in]``.

With input :math:`x_{nt}` and output-side column :math:`g_{vnt}` at shared position
:math:`t`, the per-sample weight vector is :math:`\sum_t g_{vnt} x_{nt}^\top` and the
bias vector :math:`\sum_t g_{vnt}`. For the Kronecker factors the ``T`` positions are
the weight-sharing positions of :class:`~bayescurv.engine.rules.kron_stats.KFACApprox`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from bayescurv.engine.extensions import Reduction
from bayescurv.engine.pool import pooled_empty
from bayescurv.engine.rules.base import LayerRule, reduce_per_sample
from bayescurv.engine.rules.call import wants
from bayescurv.engine.rules.kron_stats import KFACApprox, input_stats


def _flatten_positions(x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Reshape ``x: [N, *, in]`` to ``[N, T, in]`` and ``g: [V, N, *, out]`` alike."""
    n = x.shape[0]
    x3 = x.reshape(n, -1, x.shape[-1])
    g4 = g.reshape(g.shape[0], n, -1, g.shape[-1])
    return x3, g4


def outer_sum(g: Tensor, x: Tensor) -> Tensor:
    r"""Per-sample weight vectors :math:`\sum_t g_{vnt} x_{nt}^\top`, ``[V, N, O, I]``.

    Args:
        g: Columns ``[V, N, T, O]``.
        x: Inputs ``[N, T, I]``.

    One batched matmul over the samples (about 3x faster than the equivalent
    ``einsum`` on CPU); the result is a permuted view.
    """
    v, n, t, o = g.shape
    cols = g.permute(1, 2, 0, 3).reshape(n, t, v * o)
    return torch.bmm(x.transpose(1, 2), cols).reshape(n, -1, v, o).permute(2, 0, 3, 1)


def _per_sample_weight(g: Tensor, x: Tensor) -> Tensor:
    r"""Per-sample weight vectors :math:`\sum_t g_{vnt} x_{nt}^\top`, ``[V, N, O, I]``.

    Args:
        g: Columns ``[V, N, T, O]``.
        x: Inputs ``[N, T, I]``.

    Written straight into (pooled, see NOTE [Reusing result memory]) contiguous
    memory: an outer product for one position, one batched matmul per column
    otherwise; ``einsum`` where autograd tracks the operands (create_graph).
    """
    if g.requires_grad or x.requires_grad or g.dtype != x.dtype:
        return torch.einsum("vnto,nti->vnoi", g, x)
    v, n, t, o = g.shape
    out = pooled_empty((v, n, o, x.shape[-1]), like=g)
    if t == 1:
        torch.mul(g[:, :, 0, :, None], x[None, :, 0, None, :], out=out)
        return out
    for col, dst in zip(g, out, strict=True):
        torch.bmm(col.transpose(1, 2), x, out=dst)
    return out


class LinearRule(LayerRule):
    """Per-sample quantities of ``nn.Linear`` with fast paths for squares and norms."""

    linear_in_params = True

    def per_sample(self, module, inputs, grad_output):  # noqa: D102
        x, g = _flatten_positions(inputs[0], grad_output)
        out = {}
        if wants(inputs, "weight"):
            out["weight"] = _per_sample_weight(g, x)
        if module.bias is not None and wants(inputs, "bias"):
            out["bias"] = g.sum(2)
        return out

    def kron_input(self, module, inputs, approx: KFACApprox):  # noqa: D102
        x = inputs[0]
        return {"weight": input_stats(x.reshape(x.shape[0], -1, x.shape[-1]), approx)}

    def kron_output(self, module, inputs, grad_output):  # noqa: D102
        g = grad_output.reshape(*grad_output.shape[:2], -1, grad_output.shape[-1])
        return {
            name: g for name in ("weight", "bias") if getattr(module, name) is not None
        }

    def materializes(self, module, inputs, reductions) -> bool:  # noqa: D102
        if not wants(inputs, "weight"):
            return False  # bias vectors [V, N, out] only
        return not self._has_fast_path(module, inputs[0], tuple(reductions))

    @staticmethod
    def _has_fast_path(module: nn.Module, x: Tensor, reductions: tuple) -> bool:
        """Closed forms exist for sums, squares/dots with one position, few norms."""
        others = set(reductions) - {Reduction.SUM}
        if not others:
            return True
        positions = x[0].numel() // x.shape[-1]
        if positions == 1:
            return Reduction.PER_SAMPLE not in others
        out_features, in_features = module.weight.shape
        return others == {Reduction.L2} and (
            positions * positions <= out_features * in_features
        )

    def reduce(  # noqa: D102
        self,
        module: nn.Module,
        inputs: tuple[Tensor, ...],
        grad_output: Tensor,
        reductions: Iterable[Reduction],
    ) -> dict[Reduction, dict[str, Tensor]]:
        reductions = tuple(reductions)
        weight = wants(inputs, "weight")
        if weight and not self._has_fast_path(module, inputs[0], reductions):
            return self._materialized(module, inputs, grad_output, reductions)
        x, g = _flatten_positions(inputs[0], grad_output)
        bias = g.sum(2) if module.bias is not None and wants(inputs, "bias") else None
        result: dict[Reduction, dict[str, Tensor]] = {}
        for red in reductions:
            result[red] = {"weight": self._weight_fast(red, x, g)} if weight else {}
            if bias is not None:
                result[red]["bias"] = reduce_per_sample(bias, red)
        return result

    def _materialized(
        self,
        module: nn.Module,
        inputs: tuple[Tensor, ...],
        grad_output: Tensor,
        reductions: tuple[Reduction, ...],
    ) -> dict[Reduction, dict[str, Tensor]]:
        """Reductions that need ``[V, N, out, in]``; the weight's sum in closed form.

        # NOTE [Sums of materialized per-sample vectors]
        # Summing [V, N, out, in] reads it once more (205 MB for BatchGrad on the
        # benchmark MLP's first layer), while g^T x is one matrix product of the
        # same number of multiply-adds, compute-bound and several times faster.
        """
        rest = tuple(r for r in reductions if r != Reduction.SUM)
        result = super().reduce(module, inputs, grad_output, rest)
        if Reduction.SUM in reductions:
            x, g = _flatten_positions(inputs[0], grad_output)
            result[Reduction.SUM] = {"weight": self._weight_fast(Reduction.SUM, x, g)}
            if module.bias is not None and wants(inputs, "bias"):
                result[Reduction.SUM]["bias"] = g.sum((0, 1, 2))
        return result

    def _weight_fast(self, red: Reduction, x: Tensor, g: Tensor) -> Tensor:
        if red == Reduction.L2:
            return self._l2(x, g)
        if red == Reduction.SUM:
            g_sum = g.sum(0)
            return g_sum.reshape(-1, g_sum.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        g0, x0 = g[:, :, 0], x[:, 0]
        if red == Reduction.DOT:
            return torch.einsum("vno,vmo->nm", g0, g0) * (x0 @ x0.T)
        if red == Reduction.SUM_SQUARED:
            return g0.square().sum(0).T @ x0.square()
        squares = g0.square().sum(0).unsqueeze(-1), x0.square().unsqueeze(1)
        if g.requires_grad or x.requires_grad or g.dtype != x.dtype:
            return squares[0] * squares[1]
        # see NOTE [Reusing result memory]
        out = pooled_empty((*squares[0].shape[:-1], x0.shape[-1]), like=g)
        return torch.mul(*squares, out=out)

    @staticmethod
    def _l2(x: Tensor, g: Tensor) -> Tensor:
        r"""``[V, N]`` squared norms :math:`\|\sum_t g_t x_t^\top\|^2`.

        Uses :math:`\sum_{t,s} (g_t^\top g_s)(x_t^\top x_s)`, exact for any ``T``.
        """
        if x.shape[1] == 1:
            return g[:, :, 0].square().sum(-1) * x[:, 0].square().sum(-1)
        gram_g = torch.einsum("vnto,vnso->vnts", g, g)
        gram_x = torch.einsum("nti,nsi->nts", x, x)
        return (gram_g * gram_x).sum((-2, -1))
