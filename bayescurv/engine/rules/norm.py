r"""Rules for the affine parameters of normalization layers.

All three layers compute :math:`y = \hat x \odot w + b` with a normalized input
:math:`\hat x`; the per-sample vectors are :math:`\sum_s g_{vns} \hat x_{ns}` (weight)
and :math:`\sum_s g_{vns}` (bias), summed over the positions ``s`` that share a
parameter entry.

* ``BatchNorm{1,2,3}d`` only in eval mode with running statistics: in train mode the
  batch statistics couple the samples and per-sample quantities are undefined.
* ``LayerNorm``: statistics over the trailing ``normalized_shape`` dimensions.
* ``GroupNorm``: statistics over each group of channels and all spatial positions.
* ``RMSNorm``: :math:`\hat x = x / \sqrt{\operatorname{mean}(x^2) + \epsilon}` over the
  trailing ``normalized_shape`` dimensions; weight only.

# NOTE [Kronecker factors of normalization parameters]
# The affine vectors of normalization layers are small (one entry per channel or
# feature), so KFAC/KFLR give them a single full factor ``[B]``: the exact GGN block
# (KFLR) or its Monte Carlo estimate (KFAC) of the parameter, built from the
# per-sample vectors. No Kronecker or diagonal approximation is made.

``Embedding`` is a ``Linear`` layer on one-hot inputs: its Kronecker input factor is
diagonal (token frequencies, see :class:`EmbeddingRule`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bayescurv.engine.rules.base import LayerRule
from bayescurv.engine.rules.kron_stats import KFACApprox, one_hot_stats


def _affine_per_sample(
    module: nn.Module,
    x_hat: Tensor,
    grad_output: Tensor,
    param_shape_dims: int,
    lead: int,
) -> dict[str, Tensor]:
    """Sum ``g * x_hat`` and ``g`` over every axis not indexing the parameter.

    Args:
        module: The layer (its ``weight``/``bias`` may be ``None``).
        x_hat: Normalized input ``[N, *]``.
        grad_output: Columns ``[V, N, *]``.
        param_shape_dims: Number of axes spanned by the parameter.
        lead: Index (in ``x_hat``) of the first parameter axis.
    """
    v, n = grad_output.shape[:2]
    param_axes = range(lead, lead + param_shape_dims)
    sum_axes = [d + 1 for d in range(1, x_hat.dim()) if d not in param_axes]
    out = {}
    if module.weight is not None:
        prod = grad_output * x_hat.unsqueeze(0)
        out["weight"] = prod.sum(sum_axes) if sum_axes else prod
    if getattr(module, "bias", None) is not None:
        out["bias"] = grad_output.sum(sum_axes) if sum_axes else grad_output
    return {k: t.reshape(v, n, *getattr(module, k).shape) for k, t in out.items()}


class _AffineRule(LayerRule):
    """Full-block Kronecker factors from the per-sample vectors (see module NOTE)."""

    def kron_input(self, module, inputs, approx):
        return {}

    def kron_output(self, module, inputs, grad_output):
        per_sample = self.per_sample(module, inputs, grad_output)
        return {name: t.flatten(2).unsqueeze(2) for name, t in per_sample.items()}

    def kron_shapes(self, module, name, approx):
        numel = module.get_parameter(name).numel()
        return [(numel, numel)]


class BatchNormRule(_AffineRule):
    """``nn.BatchNorm{1,2,3}d`` in eval mode (running statistics)."""

    linear_in_params = True

    def check(self, module: nn.Module) -> None:  # noqa: D102
        if module.training or module.running_mean is None:
            raise ValueError(
                f"{type(module).__name__} normalizes with batch statistics (train mode "
                "or track_running_stats=False), which couples the samples of a batch: "
                "per-sample quantities are undefined. Call model.eval() first (the "
                "Laplace approximation of a trained network uses eval mode)."
            )

    def per_sample(self, module, inputs, grad_output):  # noqa: D102
        x = inputs[0]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = module.running_mean.reshape(shape)
        std = (module.running_var.reshape(shape) + module.eps).sqrt()
        return _affine_per_sample(module, (x - mean) / std, grad_output, 1, 1)


class LayerNormRule(_AffineRule):
    """``nn.LayerNorm`` over trailing ``normalized_shape`` dimensions."""

    linear_in_params = True

    def per_sample(self, module, inputs, grad_output):  # noqa: D102
        x = inputs[0]
        dims = tuple(range(-len(module.normalized_shape), 0))
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
        x_hat = (x - mean) / (var + module.eps).sqrt()
        k = len(module.normalized_shape)
        return _affine_per_sample(module, x_hat, grad_output, k, x.dim() - k)


class GroupNormRule(_AffineRule):
    """``nn.GroupNorm`` on ``[N, C, *S]``."""

    linear_in_params = True

    def per_sample(self, module, inputs, grad_output):  # noqa: D102
        x = inputs[0]
        n = x.shape[0]
        grouped = x.reshape(n, module.num_groups, -1)
        mean = grouped.mean(-1, keepdim=True)
        var = grouped.var(-1, unbiased=False, keepdim=True)
        x_hat = ((grouped - mean) / (var + module.eps).sqrt()).reshape(x.shape)
        return _affine_per_sample(module, x_hat, grad_output, 1, 1)


class RMSNormRule(_AffineRule):
    r"""``nn.RMSNorm`` over trailing ``normalized_shape`` dimensions.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import engine
        >>> layer = nn.RMSNorm(3, eps=0.0)
        >>> x, y = torch.randn(4, 3), torch.randn(4, 3)
        >>> res = engine.backprop(layer, nn.MSELoss(reduction="sum"), x, y,
        ...                       [engine.DiagGGNExact()])
        >>> x_hat = x / x.square().mean(1, keepdim=True).sqrt()
        >>> torch.allclose(res["diag_ggn_exact"]["weight"], 2 * (x_hat**2).sum(0))
        True
    """

    linear_in_params = True

    def per_sample(self, module, inputs, grad_output):  # noqa: D102
        x = inputs[0]
        dims = tuple(range(-len(module.normalized_shape), 0))
        eps = torch.finfo(x.dtype).eps if module.eps is None else module.eps
        x_hat = x * torch.rsqrt(x.square().mean(dims, keepdim=True) + eps)
        k = len(module.normalized_shape)
        return _affine_per_sample(module, x_hat, grad_output, k, x.dim() - k)


class EmbeddingRule(LayerRule):
    r"""``nn.Embedding``: per-sample vectors scatter :math:`g_{vnt}` to row ``idx_nt``.

    Rows at ``padding_idx`` get no gradient, as in PyTorch.

    Kronecker factors: the layer is ``Linear`` on one-hot inputs :math:`e_{i_{nt}}` with
    the weight's *leading* axis on the input side, so the factors are ``[A, B]`` with
    ``kron(A, B)`` the block in the row-major flattening of ``weight``
    ``[num_embeddings, dim]`` and ``B: [dim, dim]``. For ``kfac_approx="expand"``
    ``A`` is diagonal and returned as its diagonal ``[num_embeddings]``, the token
    frequencies :math:`A_{kk} = \#\{(n, t): i_{nt} = k\} / (NT)`; for ``"reduce"``
    it is the dense ``[num_embeddings, num_embeddings]`` matrix
    :math:`\frac{1}{N}\sum_n \bar e_n \bar e_n^\top` of per-sample frequencies
    :math:`\bar e_n`. Tokens at ``padding_idx`` count as zero inputs.
    """

    linear_in_params = True

    def check(self, module: nn.Module) -> None:  # noqa: D102
        if module.scale_grad_by_freq:
            raise ValueError(
                "Embedding(scale_grad_by_freq=True) scales gradients by token counts "
                "across the batch, which couples the samples: per-sample quantities "
                "are undefined."
            )

    def per_sample(self, module, inputs, grad_output):  # noqa: D102
        idx = inputs[0]
        v, n = grad_output.shape[:2]
        idx = idx.reshape(n, -1)
        g = grad_output.reshape(v, n, idx.shape[1], module.embedding_dim)
        onehot = torch.nn.functional.one_hot(idx, module.num_embeddings).to(g.dtype)
        if module.padding_idx is not None:
            onehot[..., module.padding_idx] = 0
        return {"weight": torch.einsum("vntd,ntk->vnkd", g, onehot)}

    def kron_input(self, module, inputs, approx: KFACApprox):  # noqa: D102
        idx = inputs[0].reshape(inputs[0].shape[0], -1)
        stats = one_hot_stats(
            idx, module.num_embeddings, approx, module.weight.dtype, module.padding_idx
        )
        return {"weight": stats}

    def kron_output(self, module, inputs, grad_output):  # noqa: D102
        v, n = grad_output.shape[:2]
        return {"weight": grad_output.reshape(v, n, -1, module.embedding_dim)}

    def kron_shapes(self, module, name, approx):  # noqa: D102
        num, dim = module.weight.shape
        a = (num,) if approx == KFACApprox.EXPAND else (num, num)  # expand: diagonal
        return [a, (dim, dim)]
