r"""One rule for ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``.

The input is unfolded (im2col) into patches
:math:`U_n \in \mathbb{R}^{C_{in}K \times L}`
(``K`` kernel entries, ``L`` output locations). Per group, the per-sample weight vector
is :math:`g_{vn} U_n^\top` with :math:`g_{vn} \in \mathbb{R}^{C_{out} \times L}` and the
bias vector :math:`g_{vn} \mathbf{1}`. Stride, padding (numbers, ``"same"``,
``"valid"``, any ``padding_mode``), dilation and groups are supported.

Kronecker factors treat the ``L`` output locations as weight-sharing positions with
inputs :math:`u_{nl}` (the columns of :math:`U_n`); ``kfac_approx="expand"`` is KFC
(Grosse & Martens, 2016). Weight and bias are separate blocks (no homogeneous
coordinate is appended to the patches), so a bias-free convolution has the same weight
factors. A grouped convolution gets one Kronecker block per group (see ``kron_input``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayescurv.engine.extensions import Reduction
from bayescurv.engine.pool import pooled_empty
from bayescurv.engine.rules.base import (
    CONCATENATED,
    LayerRule,
    merge_chunks,
    reduce_per_sample,
)
from bayescurv.engine.rules.call import (
    TRANSIENT_BYTES,
    cached,
    memory_budget,
    wants,
)
from bayescurv.engine.rules.conv_squares import pairs_cheaper, squared_sums
from bayescurv.engine.rules.kron_stats import (
    KFACApprox,
    grouped_input_stats,
    input_stats,
)


def _explicit_padding(module: nn.modules.conv._ConvNd) -> list[int]:
    """Padding as ``F.pad`` amounts (last dimension first)."""
    kernel, dilation = module.kernel_size, module.dilation
    if module.padding == "valid":
        pads = [(0, 0)] * len(kernel)
    elif module.padding == "same":
        pads = []
        for k, d in zip(kernel, dilation, strict=True):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
    else:
        pads = [(p, p) for p in module.padding]
    return [amount for pair in reversed(pads) for amount in pair]


# NOTE [Taps that read only padding]
# A convolution on a small map has kernel taps that read zero padding for every
# output position: torchvision's ResNet-18 on 32x32 inputs runs its last stage's
# 3x3 convolutions on 1x1 maps, where only the centre tap reads the input, yet the
# backward of each of them costs 9 taps' work for every column pulled back (C = 10
# per test batch in a GLM predictive). While recording, ConvRule.graph_output hands
# downstream
#   output.detach() + (c - c.detach()),  c = the convolution with the live taps only,
# which has the layer's own values bit for bit (x - x = 0 exactly for finite x; an
# infinite output becomes NaN, non-finite either way) and pulls columns back
# through the cropped kernel: the same gradients, since the dropped taps multiply
# zeros. Along each spatial axis tap u reads input index o s - p + u d for the
# outputs o = 0 .. L_out - 1, so the live taps are u with
# p - (L_out - 1) s <= u d <= L_in - 1 + p. The cropped call keeps symmetric
# padding p - u_lo d and must give the same output size (otherwise nothing is
# cropped); only zero padding with explicit sizes, and inputs that carry a graph.
# Only crops to a single tap per axis are taken, with the weight slice made
# contiguous: a pointwise convolution, which the backends run well. A 3x3 stride-2
# convolution from 2x2 to 1x1 maps cropped to its 2x2 live taps ran its forward 4x
# slower (3.0 vs 0.7 ms, one CPU thread) and saved a third of its backward. On the
# 1x1 maps the backward of a column went from 1.75 to 0.31 ms.
def _live_taps(module: nn.modules.conv._ConvNd, x: Tensor) -> list[slice] | None:
    """The kernel taps that read input entries, per spatial axis (see the NOTE).

    ``None`` unless one tap per axis does and others do not, or when the layer's
    padding is not explicit zeros.
    """
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        return None
    dims = len(module.kernel_size)
    if x.dim() != dims + 2:
        return None
    taps, cropped = [], False
    for size, k, s, p, d in zip(
        x.shape[2:],
        module.kernel_size,
        module.stride,
        module.padding,
        module.dilation,
        strict=True,
    ):
        out = (size + 2 * p - d * (k - 1) - 1) // s + 1
        low = max(0, -(-(p - (out - 1) * s) // d))
        high = min(k - 1, (size - 1 + p) // d)
        if out < 1 or low > high:
            return None
        padding = p - low * d
        if (size + 2 * padding - d * (high - low) - 1) // s + 1 != out:
            return None
        taps.append(slice(low, high + 1))
        cropped |= low > 0 or high < k - 1
    return taps if cropped and all(t.stop - t.start == 1 for t in taps) else None


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def unfold_input(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """Unfold ``x: [N, C_in, *S]`` into patches ``[N, C_in * K, L]`` for any dimension.

    The channel-major ordering ``(c, k)`` matches ``weight.flatten(1)``.

    # NOTE [Unfolding as one strided copy]
    # The padded input viewed with ``as_strided`` as ``[N, C_in, *kernel, *out]`` (a
    # kernel offset steps by the dilation, an output location by the stride) is the
    # patch tensor; one reshape copies it. This works for every dimension and, on
    # CPU, takes about 0.6x the time of ``F.unfold`` (im2col) on the 3C3D
    # convolutions, and a fraction of the one-hot grouped convolution it replaces
    # for 3-D.
    """
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, _explicit_padding(module), mode=mode)
    n, c_in = x.shape[:2]
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    spatial = x.stride()[2:]
    out = [
        (size - d * (k - 1) - 1) // s + 1
        for size, k, s, d in zip(x.shape[2:], kernel, stride, dilation, strict=True)
    ]
    view = x.as_strided(
        (n, c_in, *kernel, *out),
        (
            *x.stride()[:2],
            *(st * d for st, d in zip(spatial, dilation, strict=True)),
            *(st * s for st, s in zip(spatial, stride, strict=True)),
        ),
        x.storage_offset(),
    )
    if x.requires_grad:
        return view.reshape(n, c_in * math.prod(kernel), math.prod(out))
    # see NOTE [Reusing result memory]
    patches = pooled_empty((n, c_in * math.prod(kernel), math.prod(out)), like=x)
    patches.view(view.shape).copy_(view)
    return patches


# NOTE [Convolution sums and norms without per-sample vectors]
# The gradient (Reduction.SUM) of one column is the convolution's own weight gradient
# (aten.convolution_backward, the kernel of loss.backward()), far faster than summing
# per-sample vectors built from im2col; several columns are summed first. The squared
# norm of a per-sample weight vector g_n U_n^T is sum_{l,l'} (g_l . g_l') (u_l . u_l')
# over the L output locations: for L (C_out + C_in K) < C_out C_in K (deep layers on
# small maps) these two L x L Gram matrices are cheaper than the [C_out, C_in K]
# vector. Squared entries summed over columns (and samples) expand over location
# pairs the same way (bayescurv/engine/rules/conv_squares.py), chosen per call by the
# cost model of NOTE [When location pairs beat per-sample vectors]. Other reductions
# (per-sample vectors, dot products), norms of grouped convolutions and the
# differentiable path (create_graph) materialize the per-sample vectors.
_CLOSED = frozenset(
    {Reduction.SUM, Reduction.L2, Reduction.SUM_SQUARED, Reduction.BATCH_SQUARED}
)
_SQUARED = frozenset({Reduction.SUM_SQUARED, Reduction.BATCH_SQUARED})
_MANY_COLUMNS = 2**20  # a column count at which only the per-column costs matter


def _closed_form(
    module: nn.modules.conv._ConvNd,
    inputs: tuple[Tensor, ...],
    reductions: Iterable[Reduction],
    columns: int = _MANY_COLUMNS,
) -> bool:
    """Whether every reduction has a closed form worth taking (see the NOTE above).

    Without the number of ``columns`` the squared reductions count as closed when the
    location pairs beat per-sample vectors for many columns; :meth:`ConvRule.reduce`
    decides again with the columns it receives.
    """
    reductions = set(reductions)
    if not reductions <= _CLOSED:
        return False
    if not reductions & (_SQUARED | {Reduction.L2}):
        return True
    shapes = getattr(inputs, "output_shapes", ())
    if not shapes:  # a plain tuple: the output size is unknown
        return False
    length = math.prod(shapes[0][1:])
    c_out, rest = module.weight.shape[0], module.weight[0].numel()
    if Reduction.L2 in reductions and (
        module.groups != 1 or length * (c_out + rest) >= c_out * rest
    ):
        return False
    batch = Reduction.BATCH_SQUARED in reductions
    return not reductions & _SQUARED or pairs_cheaper(
        columns, c_out, rest * module.groups, length, module.groups, batch
    )


def _weight_sum(module: nn.modules.conv._ConvNd, x: Tensor, g: Tensor) -> Tensor:
    """The summed weight gradient of columns ``g: [N, C_out, *S']``."""
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    padded = F.pad(x, _explicit_padding(module), mode=mode)
    dims = len(module.kernel_size)
    return torch.ops.aten.convolution_backward(
        g,
        padded,
        module.weight.detach(),
        None,
        list(module.stride),
        [0] * dims,
        list(module.dilation),
        False,
        [0] * dims,
        module.groups,
        [False, True, False],
    )[1]


def _weight_l2(
    module: nn.modules.conv._ConvNd, inputs: tuple[Tensor, ...], g: Tensor
) -> Tensor:
    """Squared norms ``[V, N]`` of the per-sample weight vectors, from Gram matrices."""
    patches = _patches(module, inputs)  # [N, C_in K, L]
    cols = g.flatten(3)  # [V, N, C_out, L]
    gram_u = patches.transpose(1, 2) @ patches
    gram_g = cols.transpose(2, 3) @ cols
    return (gram_g * gram_u).sum((2, 3))


def _patches(module: nn.modules.conv._ConvNd, inputs: tuple[Tensor, ...]) -> Tensor:
    """The call's unfolded input ``[N, C_in * K, L]``, once per backward sweep.

    See NOTE [Derived inputs are computed once per sweep].
    """
    return cached(inputs, "patches", lambda: unfold_input(module, inputs[0]))


class ConvRule(LayerRule):
    """Per-sample quantities of ``nn.Conv{1,2,3}d`` via im2col."""

    linear_in_params = True

    @staticmethod
    def _check_batched(module: nn.Module, x: Tensor) -> None:
        if x.dim() == len(module.kernel_size) + 1:
            raise ValueError(
                f"{type(module).__name__} was called on an unbatched input of shape "
                f"{tuple(x.shape)}; the engine needs a leading batch dimension."
            )

    def graph_output(self, module, args, kwargs, output):
        """The output pulled back through the live taps only.

        See NOTE [Taps that read only padding].
        """
        x = args[0] if args else None
        if (
            not isinstance(x, Tensor)
            or kwargs
            or not x.requires_grad
            or not torch.is_grad_enabled()
            or type(module) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d)
            or not isinstance(output, Tensor)
        ):
            return output
        taps = _live_taps(module, x)
        if taps is None:
            return output
        padding = [
            p - t.start * d
            for p, t, d in zip(module.padding, taps, module.dilation, strict=True)
        ]
        live = _CONV[len(taps)](
            x,
            module.weight[(slice(None), slice(None), *taps)].contiguous(),
            module.bias,
            module.stride,
            padding,
            module.dilation,
            module.groups,
        )
        return output.detach() + (live - live.detach())

    def kron_input(self, module, inputs, approx: KFACApprox):
        """Input statistics of the unfolded patches ``[N, L, C_in * K]``.

        A grouped convolution (``groups = G > 1``) gets one Kronecker block per group:
        group ``g``'s output channels see only its ``C_in / G`` input channels, so its
        rows of the weight act on its own patches ``[N, L, C_in K / G]`` (statistics
        with a leading group axis, factors ``[G, d, d]``). The blocks between groups
        are dropped, as KFAC drops those between layers.
        """
        x = inputs[0]
        self._check_batched(module, x)
        patches = _patches(module, inputs)
        if module.groups == 1:
            return {"weight": input_stats(patches.transpose(1, 2), approx)}
        n, ck, length = patches.shape
        grouped = patches.reshape(n, module.groups, ck // module.groups, length)
        return {"weight": grouped_input_stats(grouped.permute(1, 0, 3, 2), approx)}

    def kron_output(self, module, inputs, grad_output):  # noqa: D102
        v, n, c_out = grad_output.shape[:3]
        g = grad_output.reshape(v, n, c_out, -1).transpose(2, 3)  # [V, N, L, C_out]
        out = {"bias": g} if module.bias is not None else {}
        groups = module.groups
        out["weight"] = (
            g if groups == 1 else g.reshape(*g.shape[:3], groups, c_out // groups)
        )
        return out

    def kron_shapes(self, module, name, approx):  # noqa: D102
        if name != "weight" or module.groups == 1:
            return super().kron_shapes(module, name, approx)
        g, (c_out, *rest) = module.groups, module.weight.shape
        sizes = [c_out // g, math.prod(rest)]
        return [(g, s, s) for s in sizes]

    def materializes(self, module, inputs, reductions) -> bool:
        """False where a closed form may pay off (see :func:`_closed_form`).

        The engine then hands :meth:`reduce` all columns at once, which the location
        pairs need (they sum over columns before their one large matmul); if the
        columns turn out too few for the pairs to pay off, :meth:`reduce` builds
        the per-sample vectors itself, in column chunks under the memory budget.
        """
        return not _closed_form(module, inputs, reductions)

    def reduce(self, module, inputs, grad_output, reductions):
        """Sums, norms and squares in closed form where it pays, the rest materialized.

        See NOTE [Convolution sums and norms without per-sample vectors]. Columns
        reach this method all at once when :meth:`materializes` is false, so the
        per-sample vectors it still builds (few columns, create_graph) are chunked
        over columns under the call's memory budget.
        """
        reductions = tuple(reductions)
        self._check_batched(module, inputs[0])
        if grad_output.requires_grad or not _closed_form(module, inputs, reductions):
            return self._in_chunks(module, inputs, grad_output, reductions)
        vectors = ()
        if not _closed_form(module, inputs, reductions, grad_output.shape[0]):
            # per-sample vectors summed cost less than another weight-gradient kernel
            materialized = _SQUARED | {Reduction.SUM}
            vectors = tuple(r for r in reductions if r in materialized)
        result = self._in_chunks(module, inputs, grad_output, vectors)
        closed = tuple(r for r in reductions if r not in vectors)
        for red, by_name in self._closed(module, inputs, grad_output, closed).items():
            result[red] = by_name
        return result

    def _closed(
        self,
        module: nn.modules.conv._ConvNd,
        inputs: tuple[Tensor, ...],
        grad_output: Tensor,
        reductions: tuple[Reduction, ...],
    ) -> dict[Reduction, dict[str, Tensor]]:
        """The closed forms of ``reductions`` (a subset of ``_CLOSED``)."""
        v, n, c_out = grad_output.shape[:3]
        cols = grad_output.reshape(v, n, c_out, -1)  # [V, N, C_out, L]
        result: dict[Reduction, dict[str, Tensor]] = {red: {} for red in reductions}
        if module.bias is not None and wants(inputs, "bias"):
            bias = cols.sum(-1)  # [V, N, C_out], the per-sample bias vectors
            for red in reductions:
                result[red]["bias"] = reduce_per_sample(bias, red)
        if not wants(inputs, "weight"):
            return result
        if Reduction.SUM in reductions:
            summed = grad_output.sum(0) if v > 1 else grad_output[0]
            weight_sum = _weight_sum(module, inputs[0], summed)
            result[Reduction.SUM]["weight"] = weight_sum
        if Reduction.L2 in reductions:
            result[Reduction.L2]["weight"] = _weight_l2(module, inputs, grad_output)
        squared = set(reductions) & _SQUARED
        if squared:
            patches = _patches(module, inputs)
            values = squared_sums(
                patches, cols, module.groups, squared, memory_budget(inputs)
            )
            for red, value in values.items():
                lead = (n,) if red == Reduction.BATCH_SQUARED else ()
                result[red]["weight"] = value.view(*lead, *module.weight.shape)
        return result

    def _in_chunks(
        self,
        module: nn.modules.conv._ConvNd,
        inputs: tuple[Tensor, ...],
        grad_output: Tensor,
        reductions: tuple[Reduction, ...],
    ) -> dict[Reduction, dict[str, Tensor]]:
        """Reductions of materialized per-sample vectors, chunked over columns.

        Chunks fit the memory budget, and ``TRANSIENT_BYTES`` where they are only
        summed (see NOTE [Transient per-sample vectors in small chunks]): on 3C3D's
        deepest convolution BatchDiagGGNExact then reuses one 27 MB block ten times
        instead of building 270 MB (see NOTE [No higher peak]).
        """
        if not reductions:
            return {}
        v, n = grad_output.shape[:2]
        numel = sum(p.numel() for p in module.parameters(recurse=False))
        size = n * numel * grad_output.element_size()
        budget = memory_budget(inputs)
        if not set(reductions) & CONCATENATED:
            budget = min(budget, TRANSIENT_BYTES)
        step = max(1, budget // max(size, 1))
        base = super().reduce
        return merge_chunks(
            base(module, inputs, grad_output[start : start + step], reductions)
            for start in range(0, v, step)
        )

    def per_sample(self, module, inputs, grad_output):  # noqa: D102
        x = inputs[0]
        self._check_batched(module, x)
        v, n, c_out = grad_output.shape[:3]
        out = {}
        if module.bias is not None and wants(inputs, "bias"):
            out["bias"] = grad_output.reshape(v, n, c_out, -1).sum(-1)
        if wants(inputs, "weight"):
            out["weight"] = self._weight(module, inputs, grad_output)
        return out

    @staticmethod
    def _weight(
        module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor
    ) -> Tensor:
        """Per-sample weight vectors ``[V, N, *weight.shape]``.

        # NOTE [One bmm per column]
        # Each column is one batched matmul over (sample, group), written into its
        # slice of a contiguous ``[V, N, *weight.shape]`` result. Stacking the
        # columns along the output channels for a single bmm instead copies the
        # columns ``[V, N, C_out, L]`` into that layout first and returns a permuted
        # view, which the reductions then read with strides: on 3C3D's first
        # convolution (L = 784 output locations, 10 columns) 1.5x the time of the
        # loop; on the deeper ones (L = 144, 36) the two are within a few percent.
        """
        groups = module.groups
        patches = _patches(module, inputs)
        n, ck, length = patches.shape
        v, c_out = grad_output.shape[0], module.out_channels
        u = patches.reshape(n * groups, ck // groups, length).transpose(1, 2)
        g = grad_output.reshape(v, n * groups, c_out // groups, length)
        if grad_output.requires_grad or patches.requires_grad:  # create_graph
            return torch.stack([torch.bmm(col, u) for col in g]).reshape(
                v, n, *module.weight.shape
            )
        # see NOTE [Reusing result memory]
        weight = pooled_empty((v, n * groups, c_out // groups, ck // groups), like=g)
        for col, out in zip(g, weight, strict=True):
            torch.bmm(col, u, out=out)
        return weight.reshape(v, n, *module.weight.shape)
