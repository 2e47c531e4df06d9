r"""One rule for ``nn.ConvTranspose1d``, ``2d`` and ``3d``.

A transposed convolution :math:`y = \mathcal{C}_W^\top x` is the adjoint of the
convolution :math:`\mathcal{C}_W` with the same weight, stride, padding and dilation
(mapping ``C_out`` to ``C_in`` channels). Hence
:math:`\langle g, \mathcal{C}_W^\top x\rangle = \langle \mathcal{C}_W g, x\rangle` and
the per-sample weight vector is the weight gradient of that convolution with input
:math:`g_{vn}` and output-side vector :math:`x_n`: with the columns unfolded (im2col)
into patches :math:`U_{vn} \in \mathbb{R}^{C_{out}K \times L}` (``L`` = number of
input locations), per group

.. math:: \frac{\partial \langle g_{vn}, y_n \rangle}{\partial W} = x_n U_{vn}^\top,
    \qquad x_n \in \mathbb{R}^{C_{in} \times L},

and the bias vector is :math:`g_{vn} \mathbf{1}`. ``output_padding`` (or the
``output_size`` argument) only appends output positions that no patch of a real input
location reaches, so it needs no special case.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayescurv.engine.rules.base import LayerRule
from bayescurv.engine.rules.conv import unfold_input


class ConvTransposeRule(LayerRule):
    r"""Per-sample quantities of ``nn.ConvTranspose{1,2,3}d`` via im2col of columns.

    Any stride, padding, output padding (or ``output_size``), dilation and groups.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import engine
        >>> layer = nn.ConvTranspose1d(1, 1, kernel_size=2, stride=2, bias=False)
        >>> x, y = torch.randn(3, 1, 4), torch.randn(3, 1, 8)
        >>> res = engine.backprop(layer, nn.MSELoss(reduction="sum"), x, y,
        ...                       [engine.DiagGGNExact()])
        >>> # stride = kernel: each output sees one input, so diag = 2 sum_n,i x_ni^2
        >>> expected = 2 * (x**2).sum().expand(1, 1, 2)
        >>> torch.allclose(res["diag_ggn_exact"]["weight"], expected)
        True
    """

    linear_in_params = True

    def per_sample(self, module, inputs, grad_output):  # noqa: D102
        x = inputs[0]
        dims = len(module.kernel_size)
        if x.dim() != dims + 2:
            raise ValueError(
                f"{type(module).__name__} was called on an unbatched input of shape "
                f"{tuple(x.shape)}; the engine needs a leading batch dimension."
            )
        v, n = grad_output.shape[:2]
        c_in, c_out, groups = module.in_channels, module.out_channels, module.groups
        # NOTE [Sample-major columns for one bmm]
        # Unfolding the columns sample-major ([N, V, ...]) lets one batched matmul over
        # (sample, group) contract the input locations; the result is a view of the
        # per-sample weights. An einsum on [V, N, ...] patches copies them (~5x slower).
        cols = grad_output.transpose(0, 1).reshape(n * v, c_out, *grad_output.shape[3:])
        patches = unfold_input(module, cols)  # [N * V, C_out * K, L']
        x = _pad_to_locations(x, _locations(module, grad_output.shape[3:]))
        length = patches.shape[-1]
        u = patches.reshape(n, v, groups, -1, length).transpose(1, 2)
        u = u.reshape(n * groups, -1, length)  # [N * G, V * C_out/G * K, L']
        xg = x.reshape(n * groups, c_in // groups, length)
        weight = torch.bmm(xg, u.transpose(1, 2))  # [N * G, C_in/G, V * C_out/G * K]
        weight = weight.reshape(n, groups, c_in // groups, v, -1).permute(3, 0, 1, 2, 4)
        out = {"weight": weight.reshape(v, n, *module.weight.shape)}
        if module.bias is not None:
            out["bias"] = grad_output.reshape(v, n, c_out, -1).sum(-1)
        return out


def _locations(module: nn.Module, out_size: torch.Size) -> list[int]:
    """Patch locations per dimension when unfolding an output of size ``out_size``."""
    return [
        (size + 2 * pad - dil * (k - 1) - 1) // stride + 1
        for size, pad, dil, k, stride in zip(
            out_size,
            module.padding,
            module.dilation,
            module.kernel_size,
            module.stride,
            strict=True,
        )
    ]


def _pad_to_locations(x: Tensor, locations: list[int]) -> Tensor:
    """Zero-pad ``x: [N, C, *S]`` at the end of each spatial axis to ``locations``.

    There are more patch locations than inputs only when ``output_padding`` is at
    least the stride (allowed with dilation); those patches meet no input.
    """
    extra = [loc - size for loc, size in zip(locations, x.shape[2:], strict=True)]
    if not any(extra):
        return x
    return F.pad(x, [amount for e in reversed(extra) for amount in (0, e)])
