r"""Dense reference implementations with :mod:`torch.func` (small models only).

Everything the engine computes in structured form is checked against these in float64.
Matrices are over the flattened trainable parameters in ``model.named_parameters()``
order; use :func:`split_vector` to map a flat vector back to parameter names.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

from bayescurv.engine.autodiff import twice_differentiable


def trainable_params(model: nn.Module) -> dict[str, Tensor]:
    """Detached copies of the trainable parameters, by name."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def positions(model: nn.Module, names: list[str]) -> Tensor:
    """Indices of the named parameter tensors in the flat trainable vector, ``[k]``.

    The flat vector is that of :func:`trainable_params` (``named_parameters()``
    order, frozen parameters left out), e.g. to pick a subset's block of :func:`ggn`.
    """
    chosen, start = [], 0
    for name, p in trainable_params(model).items():
        if name in names:
            chosen.append(torch.arange(start, start + p.numel()))
        start += p.numel()
    return torch.cat(chosen)


def _args(inputs: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)


def _flatten(tensors: dict[str, Tensor], lead: int) -> Tensor:
    """Concatenate ``[*lead_shape, *p]`` tensors into ``[*lead_shape, P]``."""
    return torch.cat([t.flatten(start_dim=lead) for t in tensors.values()], dim=lead)


def split_vector(model: nn.Module, vec: Tensor) -> dict[str, Tensor]:
    """Split a flat ``[..., P]`` tensor into the trainable parameters' shapes."""
    out, start = {}, 0
    for name, p in trainable_params(model).items():
        stop = start + p.numel()
        out[name] = vec[..., start:stop].reshape(*vec.shape[:-1], *p.shape)
        start = stop
    return out


def per_sample_gradients(
    model: nn.Module, loss_func: nn.Module, inputs, targets: Tensor
) -> dict[str, Tensor]:
    """Individual gradients ``[N, *p]`` scaled as in the reduced loss.

    # NOTE [Per-sample copies of the parameters]
    # Each sample gets its own copy of the parameters, the batch loss (with its true
    # reduction and normalization) is evaluated on the concatenated outputs, and the
    # gradient w.r.t. copy n is sample n's contribution, whatever the reduction. Plain
    # autograd in a loop, no vmap: torch 2.13's batching rule for the embedding backward
    # ignores ``padding_idx``, and a reference must not inherit such bugs.
    """
    params = trainable_params(model)
    args = _args(inputs)
    n = args[0].shape[0]
    copies = [
        {k: p.clone().requires_grad_(True) for k, p in params.items()} for _ in range(n)
    ]
    outputs = [
        functional_call(model, copies[i], tuple(a[i : i + 1] for a in args))
        for i in range(n)
    ]
    loss = loss_func(torch.cat(outputs), targets)
    flat = [p for copy in copies for p in copy.values()]
    grads = torch.autograd.grad(loss, flat, allow_unused=True, materialize_grads=True)
    k = len(params)
    return {
        name: torch.stack([grads[i * k + j] for i in range(n)])
        for j, name in enumerate(params)
    }


def jacobian(model: nn.Module, inputs) -> Tensor:
    """Jacobian of the model output w.r.t. the parameters, ``[N, O, P]``."""
    params = trainable_params(model)
    args = _args(inputs)
    jac = jacrev(lambda theta: functional_call(model, theta, args))(params)
    n = args[0].shape[0]
    return _flatten({k: v.reshape(n, -1, *params[k].shape) for k, v in jac.items()}, 2)


def loss_hessian(model: nn.Module, loss_func: nn.Module, inputs, targets) -> Tensor:
    """Hessian of the loss w.r.t. the model output, ``[N, O, N, O]``."""
    with torch.no_grad():
        output = model(*_args(inputs))
    n = output.shape[0]
    hess = hessian(lambda f: loss_func(f, targets))(output)
    return hess.reshape(n, output[0].numel(), n, output[0].numel())


def per_sample_ggn(model: nn.Module, loss_func: nn.Module, inputs, targets) -> Tensor:
    r"""Per-sample GGNs :math:`J_n^\top (\nabla^2_{f_n} \ell) J_n`, ``[N, P, P]``."""
    jac = jacobian(model, inputs)
    hess = loss_hessian(model, loss_func, inputs, targets)
    blocks = torch.stack([hess[i, :, i, :] for i in range(hess.shape[0])])
    return torch.einsum("nop,noq,nqr->npr", jac, blocks, jac)


def ggn(model: nn.Module, loss_func: nn.Module, inputs, targets) -> Tensor:
    r"""The GGN matrix :math:`J^\top (\nabla_f^2 \ell) J`, ``[P, P]``.

    Uses the full output Hessian (including any cross-sample blocks).
    """
    jac = jacobian(model, inputs)
    hess = loss_hessian(model, loss_func, inputs, targets)
    return torch.einsum("nop,nomq,mqr->pr", jac, hess, jac)


def param_hessian(model: nn.Module, loss_func: nn.Module, inputs, targets) -> Tensor:
    """Hessian of the loss w.r.t. the flattened parameters, ``[P, P]``.

    # NOTE [Reverse-over-reverse reference Hessians]
    # torch.func.hessian (forward-over-reverse under vmap) fails on fused attention
    # kernels (no forward-mode rule) and inherits vmap's embedding-backward batching
    # rule, which ignores padding_idx in torch 2.13. The reference instead
    # differentiates each gradient entry again with plain autograd, one row at a time
    # (slow, but exact and free of batching rules), with attention in its composite
    # implementation.
    """
    params = {
        k: p.clone().requires_grad_(True) for k, p in trainable_params(model).items()
    }
    with twice_differentiable():
        output = functional_call(model, params, _args(inputs))
    leaves = list(params.values())
    grads = torch.autograd.grad(
        loss_func(output, targets), leaves, create_graph=True, materialize_grads=True
    )
    flat = _flatten(dict(enumerate(grads)), 0)
    return torch.stack([_flat_grad(flat[i], leaves) for i in range(flat.numel())])


def per_sample_hessian_diagonals(
    model: nn.Module, loss_func: nn.Module, inputs, targets: Tensor
) -> dict[str, Tensor]:
    r"""Diagonals of the per-sample Hessians :math:`\nabla_\theta^2 \rho\,\ell_n`.

    Returns ``name -> [N, *p]``, scaled as in the reduced loss (they sum to the
    diagonal of :func:`param_hessian`). Per-sample parameter copies as in
    :func:`per_sample_gradients`; the Hessian w.r.t. copy ``n`` is sample ``n``'s.
    Reverse-over-reverse, see NOTE [Reverse-over-reverse reference Hessians].
    """
    params = trainable_params(model)
    args = _args(inputs)
    n = args[0].shape[0]
    copies = [
        {k: p.clone().requires_grad_(True) for k, p in params.items()} for _ in range(n)
    ]
    with twice_differentiable():
        outputs = [
            functional_call(model, copies[i], tuple(a[i : i + 1] for a in args))
            for i in range(n)
        ]
    loss = loss_func(torch.cat(outputs), targets)
    leaves = [p for copy in copies for p in copy.values()]
    grads = torch.autograd.grad(loss, leaves, create_graph=True, materialize_grads=True)
    k = len(params)
    # entry i of the summed per-copy gradients, differentiated w.r.t. every copy
    flat = torch.stack(
        [_flatten(dict(enumerate(grads[j * k : (j + 1) * k])), 0) for j in range(n)]
    )  # [N, P]
    summed = flat.sum(0)
    diags = torch.stack(
        [
            _flat_grad(summed[i], leaves).reshape(n, -1)[:, i]
            for i in range(flat.shape[1])
        ],
        dim=1,
    )  # [N, P]
    return split_vector(model, diags)


def _flat_grad(scalar: Tensor, leaves: list[Tensor]) -> Tensor:
    """Gradient of a scalar w.r.t. ``leaves``, flattened (zeros where unrelated)."""
    if not scalar.requires_grad:
        return torch.cat([torch.zeros_like(t).flatten() for t in leaves])
    grads = torch.autograd.grad(
        scalar, leaves, retain_graph=True, allow_unused=True, materialize_grads=True
    )
    return torch.cat([g.flatten() for g in grads])


def empirical_fisher(model: nn.Module, loss_func: nn.Module, inputs, targets) -> Tensor:
    r"""Empirical Fisher :math:`\sum_n g_n g_n^\top` of the individual gradients."""
    grads = _flatten(per_sample_gradients(model, loss_func, inputs, targets), 1)
    return grads.T @ grads


def layer_calls(
    model: nn.Module, inputs, module: nn.Module
) -> list[tuple[tuple[Tensor, ...], Tensor]]:
    """``(inputs, output)`` of every call of ``module`` in one forward pass."""
    calls = []

    def hook(mod: nn.Module, args: tuple, out: Tensor) -> None:
        calls.append((tuple(a.detach() for a in args), out.detach()))

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(*_args(inputs))
    finally:
        handle.remove()
    return calls


def output_ggn(
    model: nn.Module, loss_func: nn.Module, inputs, targets, module: nn.Module
) -> Tensor:
    r"""Per-sample GGN w.r.t. the outputs of every call of ``module``.

    With :math:`z_{nk}` the (flattened) output of call ``k`` for sample ``n`` and
    :math:`J_{nk} = \partial f_n / \partial z_{nk}`, returns
    ``G[n, k, :, l, :]`` :math:`= J_{nk}^\top (\nabla^2_{f_n} \ell) J_{nl}`, of shape
    ``[N, K, Z, K, Z]`` (``Z`` entries per call and sample). Samples must not interact.

    # NOTE [Pulling back eigenvectors]
    # The per-sample loss Hessians are eigendecomposed, H_n = sum_j l_nj u_nj u_nj^T,
    # and the columns sqrt(l_nj) u_nj of all samples are pulled back together with plain
    # autograd (one backward pass per output entry of a sample, no vmap: its fallback
    # for attention backward is slow).
    """
    shapes = [out.shape for _, out in layer_calls(model, inputs, module)]
    args = _args(inputs)
    deltas = [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    pending = iter(deltas)
    handle = module.register_forward_hook(lambda m, a, out: out + next(pending))
    try:
        output = model(*args)
    finally:
        handle.remove()
    hess = loss_hessian(model, loss_func, inputs, targets)
    n, o = hess.shape[:2]
    evals, evecs = torch.linalg.eigh(torch.stack([hess[i, :, i, :] for i in range(n)]))
    roots = evecs * evals.clamp_min(0).sqrt().unsqueeze(1)  # [N, O, O], columns j
    pulled = []
    for j in range(o):
        column = roots[:, :, j].reshape(output.shape)
        grads = torch.autograd.grad(
            output, deltas, column, retain_graph=True, materialize_grads=True
        )
        pulled.append(torch.stack([g.reshape(n, -1) for g in grads], 1))
    cols = torch.stack(pulled)  # [O, N, K, Z]
    return torch.einsum("jnkz,jnlw->nkzlw", cols, cols)
