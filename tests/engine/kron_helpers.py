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


def conv_patches(module: nn.Module, x: Tensor, group: int = 0) -> Tensor:
    """Input patches ``[N, L, C_in * K / G]`` of group ``group``: a Jacobian.

    The Jacobian of the group's first output channel w.r.t. its weight row;
    independent of the engine's unfolding.
    """
    weight = module.weight.detach()

    def out(w: Tensor) -> Tensor:
        return torch.func.functional_call(module, {"weight": w}, (x,))

    channel = group * module.out_channels // module.groups
    jac = jacrev(out)(weight)  # [N, C_out, *S, C_out, C_in / G, *K]
    dims = len(module.kernel_size)
    first = jac[:, channel].flatten(1, dims).select(2, channel)  # [N, L, C_in/G, *K]
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
    """``{"expand": [B, A], "reduce": [B, A]}`` of ``module.weight`` by definition.

    A grouped convolution's factors are the stacks ``[G, d, d]`` of its groups'.
    """
    calls = reference.layer_calls(model, inputs, module)
    g = positional_ggn(model, loss_func, inputs, targets, module)
    groups = getattr(module, "groups", 1)
    if groups == 1:
        x = torch.cat([layer_inputs(module, args) for args, _ in calls], dim=1)
        return _hand_formulas(x, g)
    width = g.shape[-1] // groups
    per_group = []
    for j in range(groups):
        x = torch.cat([conv_patches(module, args[0], j) for args, _ in calls], dim=1)
        rows = slice(j * width, (j + 1) * width)
        per_group.append(_hand_formulas(x, g[:, :, rows][..., rows]))
    return {
        approx: [torch.stack([f[approx][i] for f in per_group]) for i in range(2)]
        for approx in APPROXES
    }


def _hand_formulas(x: Tensor, g: Tensor) -> dict[str, list[Tensor]]:
    """Both approximations from inputs ``[N, P, d_in]``, blocks ``[N, P, d, P, d]``."""
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
