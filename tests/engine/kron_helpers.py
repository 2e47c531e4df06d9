"""Hand-computed Kronecker factors from per-position dense quantities (for tests).

Every weight with an input factor is viewed as acting on inputs ``x[n, p]`` at
positions ``p`` (the positions of all its calls) with output-side GGN blocks
``G[n, p, :, q, :]`` w.r.t. its outputs at positions ``p`` and ``q``; the two
approximations of Eschenhagen et al. (2023) are then written out literally.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jacrev

from bayescurv.engine import reference

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
APPROXES = ["expand", "reduce"]


def ungroup(model: nn.Module) -> nn.Module:
    """Replace every grouped convolution by an ungrouped one of the same shape."""
    torch.manual_seed(1)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, CONVS) and child.groups > 1:
                new = type(child)(
                    child.in_channels,
                    child.out_channels,
                    child.kernel_size,
                    stride=child.stride,
                    padding=child.padding,
                    dilation=child.dilation,
                    bias=child.bias is not None,
                    padding_mode=child.padding_mode,
                )
                setattr(parent, name, new.double())
    return model


def conv_patches(module: nn.Module, x: Tensor) -> Tensor:
    """Input patches ``[N, L, C_in * K]``: the Jacobian of the output w.r.t. the weight.

    Independent of the engine's unfolding; needs ``groups=1``.
    """
    weight = module.weight.detach()

    def out(w: Tensor) -> Tensor:
        return torch.func.functional_call(module, {"weight": w}, (x,))

    jac = jacrev(out)(weight)  # [N, C_out, *S, C_out, C_in, *K]
    dims = len(module.kernel_size)
    first = jac[:, 0].flatten(1, dims).select(2, 0)  # [N, L, C_in, *K]
    return first.flatten(2)


def layer_inputs(module: nn.Module, args: tuple[Tensor, ...]) -> Tensor:
    """Inputs at the positions of one call, ``[N, R, d_in]``."""
    x = args[0]
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1])
    if isinstance(module, CONVS):
        return conv_patches(module, x)
    if isinstance(module, nn.Embedding):
        onehot = F.one_hot(x.reshape(x.shape[0], -1), module.num_embeddings).double()
        if module.padding_idx is not None:
            onehot[..., module.padding_idx] = 0
        return onehot
    raise TypeError(type(module).__name__)


def output_dim(module: nn.Module) -> int:
    """Size of the output side ``d`` of the weight's factors."""
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    return module.weight.shape[0]


def positional_ggn(model, loss_func, inputs, targets, module) -> Tensor:
    """Output-side GGN blocks over all positions of all calls, ``[N, P, d, P, d]``."""
    ggn = reference.output_ggn(model, loss_func, inputs, targets, module)
    n, k, z = ggn.shape[:3]
    d = output_dim(module)
    r = z // d
    if isinstance(module, CONVS):  # outputs are channel-major [C, L]
        g = ggn.reshape(n, k, d, r, k, d, r).permute(0, 1, 3, 2, 4, 6, 5)
    else:  # position-major [T, d]
        g = ggn.reshape(n, k, r, d, k, r, d)
    return g.reshape(n, k * r, d, k * r, d)


def hand_factors(model, loss_func, inputs, targets, module) -> dict[str, list[Tensor]]:
    """``{"expand": [B, A], "reduce": [B, A]}`` of ``module.weight`` by definition."""
    calls = reference.layer_calls(model, inputs, module)
    x = torch.cat([layer_inputs(module, args) for args, _ in calls], dim=1)
    g = positional_ggn(model, loss_func, inputs, targets, module)
    n, p = x.shape[:2]
    b_expand = torch.einsum("npdpe->de", g)
    a_expand = torch.einsum("npi,npj->ij", x, x) / (n * p)
    b_reduce = g.sum((1, 3)).sum(0)
    mean = x.mean(1)
    a_reduce = mean.T @ mean / n
    return {"expand": [b_expand, a_expand], "reduce": [b_reduce, a_reduce]}


def ggn_blocks(model, loss_func, inputs, targets) -> dict[str, Tensor]:
    """Diagonal blocks of the dense GGN per trainable parameter, ``[P_i, P_i]``."""
    ggn = reference.ggn(model, loss_func, inputs, targets)
    blocks, start = {}, 0
    for name, p in reference.trainable_params(model).items():
        stop = start + p.numel()
        blocks[name] = ggn[start:stop, start:stop]
        start = stop
    return blocks
