"""The Jacobian extension: against torch.func, chunking, factored linear layers."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from bayescurv import engine
from bayescurv.engine import reference
from bayescurv.engine.autodiff import twice_differentiable
from tests.cases import MODELS, ModelCase, make_problem
from tests.conftest import assert_close

# models whose rules keep the graph (attention and recurrent rules detach)
# the module (``engine.backprop`` is the function)
backprop_module = importlib.import_module("bayescurv.engine.backprop")
DIFFERENTIABLE = [m for m in MODELS if m.name not in ("attention", "recurrent")]


def _flat(values: dict[str, Tensor]) -> Tensor:
    """``name -> [C, N, *p]`` as ``[N, C, P]`` (reference layout)."""
    dense = [
        v.dense() if isinstance(v, engine.LinearJacobian) else v
        for v in values.values()
    ]
    return torch.cat([v.flatten(2) for v in dense], 2).movedim(0, 1)


@pytest.mark.parametrize("model_case", MODELS, ids=lambda m: m.name)
def test_jacobian_equals_jacrev(model_case: ModelCase):
    p = make_problem(model_case, "mse", "sum")
    res = engine.backprop(p.model, None, p.inputs, None, [engine.Jacobian()])
    assert res.loss is None
    assert_close(res.output, p.model(p.inputs).detach(), "output")
    expected = reference.jacobian(p.model, p.inputs)
    num_outputs = res.output[0].numel()
    for name, value in res["jacobian"].items():
        shape = dict(p.model.named_parameters())[name].shape
        assert value.shape == (num_outputs, len(p.inputs), *shape), name
    assert_close(_flat(res["jacobian"]), expected, "jacobian")


@pytest.mark.parametrize("model_case", MODELS, ids=lambda m: m.name)
def test_chunked_equals_unchunked_and_factored_dense(model_case: ModelCase):
    p = make_problem(model_case, "mse", "sum")
    whole = engine.backprop(p.model, None, p.inputs, None, [engine.Jacobian()])
    chunked = engine.backprop(
        p.model, None, p.inputs, None, [engine.Jacobian()], chunk_size=1
    )
    tiny_budget = engine.backprop(
        p.model, None, p.inputs, None, [engine.Jacobian()], memory_budget=1
    )
    factored = engine.backprop(
        p.model, None, p.inputs, None, [engine.Jacobian(factored=True)], chunk_size=2
    )
    for name, value in whole["jacobian"].items():
        assert_close(chunked["jacobian"][name], value, f"chunk_size=1 {name}")
        assert_close(tiny_budget["jacobian"][name], value, f"memory_budget=1 {name}")
        other = factored["jacobian"][name]
        if isinstance(other, engine.LinearJacobian):
            assert other.shape == value.shape
            other = other.dense()
        assert_close(other, value, f"factored {name}")


def test_which_layers_are_factored():
    """Linear called once (on [N, in] or [N, T, in]): factored; weight shared: not."""

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Linear(4, 4)
            self.shared = nn.Linear(4, 4)
            self.seq = nn.Linear(2, 3)
            self.head = nn.Linear(4 + 6, 2)

        def forward(self, x: Tensor) -> Tensor:
            h = torch.relu_(self.first(x))  # in place: recorded in safe mode
            h = self.shared(torch.tanh(self.shared(h)))
            s = self.seq(x.reshape(-1, 2, 2)).flatten(1)
            return self.head(torch.cat([h, s], 1))

    torch.manual_seed(0)
    model = Mixed().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    res = engine.backprop(model, None, x, None, [engine.Jacobian(factored=True)])
    kinds = {
        n: isinstance(v, engine.LinearJacobian) for n, v in res["jacobian"].items()
    }
    assert kinds == {
        "first.weight": True,
        "first.bias": True,
        "shared.weight": False,
        "shared.bias": False,
        "seq.weight": True,
        "seq.bias": True,
        "head.weight": True,
        "head.bias": True,
    }
    head = res["jacobian"]["head.weight"]
    assert head.grads.shape == (2, 5, 2)
    assert head.inputs.shape == (5, 10)
    assert res["jacobian"]["head.bias"].inputs is None
    seq = res["jacobian"]["seq.weight"]
    assert seq.grads.shape == (2, 5, 2, 3)  # [C, N, T, out]
    assert seq.inputs.shape == (5, 2, 2)  # [N, T, in]
    assert seq.shape == (2, 5, 3, 2)
    assert_close(_flat(res["jacobian"]), reference.jacobian(model, x), "jacobian")


def test_ungrouped_convolutions_are_factored_over_patches():
    """Conv weight: patches [N, T, in K] and columns [C, N, T, out]; bias summed."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 4, 2, groups=1, bias=False),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 2),
    ).double()
    x = torch.randn(5, 2, 7, 7, dtype=torch.float64)
    res = engine.backprop(model, None, x, None, [engine.Jacobian(factored=True)])
    first = res["jacobian"]["0.weight"]
    assert isinstance(first, engine.LinearJacobian)
    assert first.inputs.shape == (5, 16, 18)  # 4x4 positions, 2 * 3 * 3 patch
    assert first.grads.shape == (2, 5, 16, 3)
    assert first.shape == (2, 5, 3, 2, 3, 3)
    assert res["jacobian"]["0.bias"].grads.shape == (2, 5, 3)
    assert_close(_flat(res["jacobian"]), reference.jacobian(model, x), "jacobian")


def test_jacobian_shares_the_pass_with_loss_extensions():
    p = make_problem(MODELS[0], "ce", "mean")
    p.model.zero_grad()
    res = engine.backprop(
        p.model,
        p.loss_func,
        p.inputs,
        p.targets,
        [engine.Jacobian(), engine.DiagGGNExact(), engine.BatchGrad()],
    )
    alone = engine.backprop(
        p.model, p.loss_func, p.inputs, p.targets, [engine.DiagGGNExact()]
    )
    assert_close(_flat(res["jacobian"]), reference.jacobian(p.model, p.inputs), "J")
    for name, value in alone["diag_ggn_exact"].items():
        assert_close(res["diag_ggn_exact"][name], value, name)
    assert res.loss is not None


def test_jacobian_without_loss_leaves_grad_alone():
    p = make_problem(MODELS[0], "mse", "sum")
    p.model.zero_grad(set_to_none=True)
    engine.backprop(p.model, None, p.inputs, None, [engine.Jacobian()])
    assert all(q.grad is None for q in p.model.parameters())


def test_loss_free_call_errors():
    p = make_problem(MODELS[0], "mse", "sum")
    with pytest.raises(ValueError, match=r"\['DiagGGNExact'\] need a loss"):
        engine.backprop(p.model, None, p.inputs, None, [engine.DiagGGNExact()])
    with pytest.raises(ValueError, match="targets were given without a loss_func"):
        engine.backprop(p.model, None, p.inputs, p.targets, [engine.Jacobian()])
    with pytest.raises(ValueError, match="MSELoss needs targets"):
        engine.backprop(p.model, p.loss_func, p.inputs, None, [engine.Jacobian()])


def _reference_jacobian(model: nn.Module, theta: dict, x: Tensor) -> dict:
    """``name -> [N, C, *p]`` by ``vmap`` over samples of ``jacrev``."""

    def single(params: dict, xi: Tensor) -> Tensor:
        return functional_call(model, params, (xi[None],)).reshape(-1)

    return vmap(jacrev(single), in_dims=(None, 0))(theta, x)


def _loop_gradient(
    model: nn.Module, params: dict, x: Tensor, weights: dict
) -> list[Tensor]:
    """d/d(params, x) of <W, J> with plain autograd, one output entry at a time.

    # NOTE [Embedding padding under vmap]
    # torch.func's batching rule for the embedding backward ignores padding_idx
    # (torch 2.13), so models with a padded Embedding get this loop as reference.
    """
    with twice_differentiable():
        flat = model(x).reshape(len(x), -1)
    names = list(params)
    total = flat.new_zeros(())
    for n in range(flat.shape[0]):
        for c in range(flat.shape[1]):
            rows = torch.autograd.grad(
                flat[n, c], list(params.values()), create_graph=True,
                materialize_grads=True,
            )  # fmt: skip
            total = total + sum(
                (row * weights[k][n, c]).sum()
                for k, row in zip(names, rows, strict=True)
            )
    leaves = [*params.values(), *([x] if x.requires_grad else [])]
    return list(torch.autograd.grad(total, leaves, materialize_grads=True))


def _func_gradient(
    model: nn.Module, params: dict, x: Tensor, weights: dict
) -> list[Tensor]:
    """d/d(params, x) of <W, J> with torch.func (``grad`` of ``vmap(jacrev)``)."""
    theta = {n: q.detach() for n, q in params.items()}
    floating = x.is_floating_point()

    def scalar(theta: dict, x: Tensor) -> Tensor:
        jac = _reference_jacobian(model, theta, x)
        return sum((jac[n] * weights[n]).sum() for n in params)

    with twice_differentiable():  # the reference differentiates attention twice
        expected = grad(scalar, argnums=(0, 1) if floating else 0)(theta, x.detach())
    by_name = expected[0] if floating else expected
    return [by_name[n] for n in params] + ([expected[1]] if floating else [])


@pytest.mark.parametrize("model_case", DIFFERENTIABLE, ids=lambda m: m.name)
def test_create_graph_jacobian_gradients(model_case: ModelCase):
    """d/d(theta, x) of <W, J> through the engine equals torch.func's."""
    p = make_problem(model_case, "mse", "sum")
    params = {n: q for n, q in p.model.named_parameters() if q.requires_grad}
    floating = p.inputs.is_floating_point()
    x = p.inputs.clone().requires_grad_(floating)
    res = engine.backprop(
        p.model, None, x, None, [engine.Jacobian()], create_graph=True
    )
    gen = torch.Generator().manual_seed(3)
    weights = {
        n: torch.randn(v.movedim(0, 1).shape, generator=gen, dtype=torch.float64)
        for n, v in res["jacobian"].items()
    }
    value = sum((res["jacobian"][n].movedim(0, 1) * weights[n]).sum() for n in params)
    leaves = [*params.values(), *([x] if floating else [])]
    actual = torch.autograd.grad(value, leaves, materialize_grads=True)
    padded = any(
        isinstance(m, nn.Embedding) and m.padding_idx is not None
        for m in p.model.modules()
    )
    reference_gradient = _loop_gradient if padded else _func_gradient
    expected = reference_gradient(p.model, params, x, weights)
    names = [*params, *(["x"] if floating else [])]
    for name, a, e in zip(names, actual, expected, strict=True):
        assert_close(a, e, f"d/d{name}")


def test_create_graph_factored_and_first_order():
    """Factored linear Jacobians and individual gradients stay differentiable."""
    p = make_problem(MODELS[0], "ce", "mean")
    x = p.inputs.clone().requires_grad_(True)
    res = engine.backprop(
        p.model,
        p.loss_func,
        x,
        p.targets,
        [engine.Jacobian(factored=True), engine.BatchGrad()],
        create_graph=True,
        accumulate_grad=False,
    )
    jac = res["jacobian"]["0.weight"]
    assert isinstance(jac, engine.LinearJacobian)
    value = jac.dense().square().sum() + res["grad_batch"]["2.weight"].square().sum()
    (actual,) = torch.autograd.grad(value + res.loss, x)

    theta = {n: q.detach() for n, q in p.model.named_parameters()}

    def sample_loss(params: dict, xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(p.model, params, (xi[None],))
        return p.loss_func(out, yi[None]) / len(p.inputs)

    def scalar(xs: Tensor) -> Tensor:
        jacobians = _reference_jacobian(p.model, theta, xs)
        grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(theta, xs, p.targets)
        loss = p.loss_func(functional_call(p.model, theta, (xs,)), p.targets)
        return (
            jacobians["0.weight"].square().sum()
            + grads["2.weight"].square().sum()
            + loss
        )

    assert_close(actual, grad(scalar)(p.inputs), "d/dx")


def test_create_graph_errors_for_detached_quantities():
    p = make_problem(MODELS[0], "ce", "mean")
    with pytest.raises(NotImplementedError, match=r"\['DiagHessian'\]"):
        engine.backprop(
            p.model,
            p.loss_func,
            p.inputs,
            p.targets,
            [engine.DiagHessian()],
            create_graph=True,
        )
    attention = make_problem(
        next(m for m in MODELS if m.name == "attention"), "ce", "mean"
    )
    with pytest.raises(NotImplementedError, match="MultiheadAttentionRule"):
        engine.backprop(
            attention.model,
            None,
            attention.inputs,
            None,
            [engine.Jacobian()],
            create_graph=True,
        )


def test_chunks_stay_within_the_memory_budget(monkeypatch: pytest.MonkeyPatch):
    """The columns pulled back to all layers for one chunk fit ``memory_budget``."""
    p = make_problem(MODELS[1], "mse", "sum")
    pulled_bytes = []
    original = backprop_module.pull_back

    def spy(*args, **kwargs):
        pulled = original(*args, **kwargs)
        pulled_bytes.append(sum(g.numel() * g.element_size() for g in pulled))
        return pulled

    monkeypatch.setattr(backprop_module, "pull_back", spy)
    one_column = engine.backprop(
        p.model, None, p.inputs, None, [engine.Jacobian()], chunk_size=1
    )
    per_column = max(pulled_bytes)
    pulled_bytes.clear()
    budget = int(1.5 * per_column)
    res = engine.backprop(
        p.model, None, p.inputs, None, [engine.Jacobian()], memory_budget=budget
    )
    assert len(pulled_bytes) == res.output[0].numel()  # one column fits, two do not
    assert max(pulled_bytes) <= budget
    for name, value in one_column["jacobian"].items():
        assert_close(res["jacobian"][name], value, name)
