"""``GGNMP``, ``HMP`` and ``PCHMP``: products with parameter blocks, vs dense blocks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from bayescurv.compat.backpack import extensions as ext
from bayescurv.engine import reference
from tests.cases import Problem
from tests.compat.conftest import block, run_backpack
from tests.conftest import assert_close

PRODUCTS = [ext.GGNMP(), ext.HMP(), ext.PCHMP(savefield="pch_clip")]
PRODUCTS.append(ext.PCHMP(savefield="pch_abs", modify="abs"))
K = 3  # vectors per product


def _smooth_mlp() -> Problem:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2)
    ).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    return Problem(model, nn.CrossEntropyLoss(), x, torch.randint(0, 2, (6,)))


class _ResidualSmooth(nn.Module):
    """A residual block with element-wise activations (a graph, not a chain)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.act = nn.Tanh()
        self.head = nn.Linear(4, 3)
        self.out = nn.Softplus()

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.head(x + self.act(self.inner(x))))


def _residual() -> Problem:
    torch.manual_seed(1)
    model = _ResidualSmooth().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    return Problem(model, nn.MSELoss(), x, torch.randn(5, 3, dtype=torch.float64))


def dense_pch(problem: Problem, modify: str, power: int = 1) -> Tensor:
    r"""The dense positive-curvature Hessian, from dense Jacobians.

    The Hessian with every element-wise activation's residual
    :math:`J_k^\top \operatorname{diag}(r_k) J_k`, :math:`r_k = \delta_k \phi''`,
    replaced by :math:`J_k^\top \operatorname{diag}(m(\delta_k^{power} \phi''))
    J_k` (``m``: clip or abs; ``power=2`` is BackPACK 1.7.1's variant).
    """
    model, loss_func = copy.deepcopy(problem.model), problem.loss_func
    x, y = problem.inputs, problem.targets
    acts = [
        m for m in model.modules() if isinstance(m, (nn.Sigmoid, nn.Tanh, nn.Softplus))
    ]
    params = reference.trainable_params(model)
    names = list(params)

    def activation_inputs(flat: Tensor) -> tuple[Tensor, ...]:
        seen = []
        handles = [
            m.register_forward_pre_hook(lambda m, a: seen.append(a[0])) for m in acts
        ]
        try:
            functional_call(model, reference.split_vector(model, flat), (x,))
        finally:
            for h in handles:
                h.remove()
        return tuple(seen)

    theta = torch.cat([params[n].flatten() for n in names])
    hessian = reference.param_hessian(model, loss_func, x, y)
    if not acts:
        return hessian
    jacobians = jacrev(activation_inputs)(theta)
    inputs = activation_inputs(theta)
    inputs_leaf = [i.detach().requires_grad_(True) for i in inputs]
    outputs = [m(i) for m, i in zip(acts, inputs_leaf, strict=True)]

    # gradient of the loss w.r.t. each activation output, with the others fixed
    seen = []
    handles = [m.register_forward_hook(lambda m, a, o: seen.append(o)) for m in acts]
    out = model(x)
    for h in handles:
        h.remove()
    deltas = torch.autograd.grad(loss_func(out, y), seen)
    modified = {"clip": lambda r: r.clamp(min=0), "abs": torch.abs}[modify]
    for x_k, a_k, delta, jacobian in zip(
        inputs_leaf, outputs, deltas, jacobians, strict=True
    ):
        (d1,) = torch.autograd.grad(a_k.sum(), x_k, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), x_k)
        weight = modified(delta**power * d2) - delta * d2
        jac = jacobian.reshape(-1, theta.numel())
        hessian = hessian + jac.T @ (weight.flatten()[:, None] * jac)
    return hessian


@pytest.mark.parametrize("make", [_smooth_mlp, _residual], ids=["chain", "residual"])
def test_products_against_dense_blocks(make):
    problem = make()
    model = run_backpack(problem, PRODUCTS)
    args = (problem.model, problem.loss_func, problem.inputs, problem.targets)
    dense = {
        "ggnmp": reference.ggn(*args),
        "hmp": reference.param_hessian(*args),
        "pch_clip": dense_pch(problem, "clip"),
        "pch_abs": dense_pch(problem, "abs"),
    }
    gen = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        mat = torch.randn(K, *param.shape, generator=gen, dtype=param.dtype)
        for field, matrix in dense.items():
            expected = mat.flatten(1) @ block(matrix, problem.model, name).T
            actual = getattr(param, field)(mat)
            assert actual.shape == mat.shape
            assert_close(actual.flatten(1), expected, f"{field} of {name}")


def test_pch_clip_differs_from_hessian_and_is_psd():
    """The check above can fail: on this model the PCH is not the Hessian."""
    problem = _smooth_mlp()
    hessian = reference.param_hessian(
        problem.model, problem.loss_func, problem.inputs, problem.targets
    )
    pch = dense_pch(problem, "clip")
    first = block(pch, problem.model, "0.weight")
    assert (first - block(hessian, problem.model, "0.weight")).abs().max() > 1e-4
    assert torch.linalg.eigvalsh(first).min() > -1e-10


class _Masked(nn.Module):
    """Linear, a given dropout mask, Linear: the model as the forward pass saw it."""

    def __init__(self, model: nn.Sequential) -> None:
        super().__init__()
        self.first, self.last = model[0], model[2]

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.last(self.first(x) * mask)


def test_replay_sees_the_forward_pass_dropout_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 2)).double()
    x, y = (
        torch.randn(5, 4, dtype=torch.float64),
        torch.randn(5, 2, dtype=torch.float64),
    )
    problem = Problem(model.train(), nn.MSELoss(), x, y)
    torch.manual_seed(7)  # the forward pass in run_backpack draws the mask first
    extended = run_backpack(problem, [ext.GGNMP(), ext.DiagGGNExact(), ext.BatchGrad()])
    torch.manual_seed(7)
    mask = nn.Dropout(0.5)(torch.ones(5, 6, dtype=torch.float64))
    masked = _Masked(model)
    blocks = reference.per_sample_ggn(masked, problem.loss_func, (x, mask), y)
    diag = torch.diagonal(blocks, dim1=1, dim2=2).sum(0)
    weight = extended[0].weight
    expected = reference.split_vector(masked, diag)["first.weight"]
    assert_close(weight.diag_ggn_exact, expected, "diag_ggn_exact under dropout")
    eye = torch.eye(weight.numel(), dtype=weight.dtype).reshape(-1, *weight.shape)
    products = torch.diagonal(weight.ggnmp(eye).flatten(1)).reshape(weight.shape)
    assert_close(products, expected, "GGN diagonal from ggnmp under dropout")
    individual = reference.per_sample_gradients(masked, problem.loss_func, (x, mask), y)
    assert_close(weight.grad_batch, individual["first.weight"], "grad_batch")
    assert_close(weight.grad_batch.sum(0), weight.grad, ".grad of the same forward")
