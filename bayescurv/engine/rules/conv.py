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
factors. Grouped convolutions have no Kronecker factors (see ``kron_input``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayescurv.engine.rules.base import LayerRule
from bayescurv.engine.rules.call import wants
from bayescurv.engine.rules.kron_stats import KFACApprox, input_stats


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


def unfold_input(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """Unfold ``x: [N, C_in, *S]`` into patches ``[N, C_in * K, L]`` for any dimension.

    The channel-major ordering ``(c, k)`` matches ``weight.flatten(1)``.
    """
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, _explicit_padding(module), mode=mode)
    n, c_in = x.shape[:2]
    dims = len(module.kernel_size)
    if dims <= 2:
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
        if dims == 1:
            x = x.unsqueeze(2)
            kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
        return F.unfold(x, kernel, dilation=dilation, stride=stride)
    # N-d unfold as a grouped convolution with one-hot kernels
    k = math.prod(module.kernel_size)
    eye = torch.eye(k, dtype=x.dtype, device=x.device)
    weight = eye.reshape(k, 1, *module.kernel_size).repeat(c_in, 1, *([1] * dims))
    conv = getattr(F, f"conv{dims}d")
    patches = conv(
        x, weight, stride=module.stride, dilation=module.dilation, groups=c_in
    )
    return patches.reshape(n, c_in * k, -1)


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

    def kron_input(self, module, inputs, approx: KFACApprox):
        """Input statistics of the unfolded patches ``[N, L, C_in * K]``.

        Raises:
            NotImplementedError: For ``groups > 1``: the weight's GGN block then couples
                different input patches per output group and is not one Kronecker
                product ``kron(B, A)`` in the weight's row-major flattening.
        """
        x = inputs[0]
        self._check_batched(module, x)
        if module.groups != 1:
            raise NotImplementedError(
                f"{type(module).__name__}(groups={module.groups}) has no Kronecker "
                "factors: a grouped convolution's weight block is not one Kronecker "
                "product. Use groups=1 or a diagonal extension (DiagGGNExact/MC)."
            )
        patches = unfold_input(module, x)
        return {"weight": input_stats(patches.transpose(1, 2), approx)}

    def kron_output(self, module, inputs, grad_output):  # noqa: D102
        v, n, c_out = grad_output.shape[:3]
        g = grad_output.reshape(v, n, c_out, -1).transpose(2, 3)
        return {
            name: g for name in ("weight", "bias") if getattr(module, name) is not None
        }

    def per_sample(self, module, inputs, grad_output):  # noqa: D102
        x = inputs[0]
        self._check_batched(module, x)
        v, n, c_out = grad_output.shape[:3]
        out = {}
        if module.bias is not None and wants(inputs, "bias"):
            out["bias"] = grad_output.reshape(v, n, c_out, -1).sum(-1)
        if wants(inputs, "weight"):
            out["weight"] = self._weight(module, x, grad_output)
        return out

    @staticmethod
    def _weight(module: nn.Module, x: Tensor, grad_output: Tensor) -> Tensor:
        """Per-sample weight vectors ``[V, N, *weight.shape]``."""
        groups = module.groups
        patches = unfold_input(module, x)
        n, ck, length = patches.shape
        v = grad_output.shape[0]
        c_out = module.out_channels
        # NOTE [One bmm for all columns]
        # Columns are stacked along the output-channel axis so that one batched matmul
        # over (sample, group) does the work; an einsum here copies and runs ~1.5x
        # slower on CPU. For one column or one group the results are views.
        u = patches.reshape(n * groups, ck // groups, length)
        g = grad_output.reshape(v, n, groups, c_out // groups, length)
        g = g.permute(1, 2, 0, 3, 4).reshape(n * groups, -1, length)
        weight = torch.bmm(g, u.transpose(1, 2))
        weight = weight.reshape(n, groups, v, c_out // groups, ck // groups)
        weight = weight.permute(2, 0, 1, 3, 4)
        return weight.reshape(v, n, *module.weight.shape)
