"""How the compat layer behaves around ``loss.backward()``: what is computed when."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from bayescurv.compat.backpack import backpack, disable, extend
from bayescurv.compat.backpack import extensions as ext
from bayescurv.engine import reference
from tests.cases import Problem
from tests.compat.conftest import fresh, run_backpack, savefield
from tests.conftest import assert_close


def _extended(problem: Problem) -> tuple[nn.Module, nn.Module]:
    return extend(copy.deepcopy(problem.model)), extend(
        copy.deepcopy(problem.loss_func)
    )


def test_grad_is_written_once_and_accumulates():
    p = fresh("mlp")
    model, loss_func = _extended(p)
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    with backpack(ext.BatchGrad(), ext.DiagGGNExact()):
        loss_func(model(p.inputs), p.targets).backward()
    loss = p.loss_func(p.model(p.inputs), p.targets)
    grads = torch.autograd.grad(loss, list(p.model.parameters()))
    for param, g in zip(model.parameters(), grads, strict=True):
        assert_close(param.grad, g + 1, ".grad accumulated once")


def test_nothing_is_computed_outside_backpack():
    p = fresh("mlp")
    model, loss_func = _extended(p)
    loss_func(model(p.inputs), p.targets).backward()
    assert not any(hasattr(param, "grad_batch") for param in model.parameters())


def _objective(output: Tensor, targets: Tensor) -> Tensor:
    """A scaled functional loss plus a penalty on the outputs (not a loss module)."""
    return 3 * nn.functional.cross_entropy(output, targets) + output.square().mean()


@pytest.mark.parametrize("name", ["mlp", "residual_cnn", "attention"])
def test_first_order_of_any_scalar_function(name: str):
    """BackPACK's first-order quantities need no loss module: J_n^T g_n per sample."""
    p = fresh(name)
    model = extend(copy.deepcopy(p.model))
    with backpack(ext.BatchGrad(), ext.Variance()):
        _objective(model(p.inputs), p.targets).backward()
    expected = reference.per_sample_gradients(p.model, _objective, p.inputs, p.targets)
    for n, g in expected.items():
        param = dict(model.named_parameters())[n]
        assert_close(param.grad_batch, g, f"grad_batch {n}")
        assert_close(param.variance, g.square().mean(0) - g.mean(0).square(), n)


def test_scaled_loss_scales_first_order_only():
    """As in BackPACK: first order follows the incoming gradient, second order not.

    Second-order quantities are those of the loss module alone.
    """
    p = fresh("mlp")
    plain = run_backpack(p, [ext.BatchGrad(), ext.DiagGGNExact(), ext.KFLR()])
    model, loss_func = _extended(p)
    loss = 2 * loss_func(model(p.inputs), p.targets)
    with backpack(ext.BatchGrad(), ext.DiagGGNExact(), ext.KFLR()):
        with pytest.warns(UserWarning, match="loss module alone"):
            loss.backward()
    for (n, a), b in zip(plain.named_parameters(), model.parameters(), strict=True):
        assert_close(b.grad_batch, 2 * a.grad_batch, f"grad_batch {n}")
        assert_close(b.diag_ggn_exact, a.diag_ggn_exact, f"diag_ggn_exact {n}")
        for f, g in zip(b.kflr, a.kflr, strict=True):
            assert_close(f, g, f"kflr {n}")


def test_last_layer_on_stored_features():
    """Extending a submodule called on its own gives its parameters' quantities."""
    p = fresh("mlp", "mse", "sum")
    body, head = p.model[:2], extend(copy.deepcopy(p.model[2]))
    loss_func = extend(copy.deepcopy(p.loss_func))
    with torch.no_grad():
        features = body(p.inputs)
    with backpack(ext.BatchGrad(), ext.DiagGGNExact()):
        loss_func(head(features), p.targets).backward()
    individual = reference.per_sample_gradients(
        p.model, p.loss_func, p.inputs, p.targets
    )
    blocks = reference.per_sample_ggn(p.model, p.loss_func, p.inputs, p.targets)
    diag = reference.split_vector(p.model, torch.diagonal(blocks, dim1=1, dim2=2))
    for n, param in head.named_parameters():
        assert_close(param.grad_batch, individual[f"2.{n}"], f"grad_batch {n}")
        assert_close(param.diag_ggn_exact, diag[f"2.{n}"].sum(0), f"diag {n}")


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor, *, scale: float) -> Tensor:
        return scale * self.lin(x)


def test_keyword_inputs_are_replayed():
    torch.manual_seed(0)
    model = _Scaled().double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    extended, loss_func = extend(copy.deepcopy(model)), extend(nn.CrossEntropyLoss())
    with backpack(ext.BatchGrad(), ext.DiagGGNExact()):
        loss_func(extended(x, scale=3.0), y).backward()

    def call(module: nn.Module, inputs: Tensor) -> Tensor:
        return module(inputs, scale=3.0)

    wrapped = _Call(model, call)
    blocks = reference.per_sample_ggn(wrapped, nn.CrossEntropyLoss(), x, y)
    diag = reference.split_vector(wrapped, torch.diagonal(blocks, dim1=1, dim2=2))
    assert_close(
        extended.lin.weight.diag_ggn_exact, diag["module.lin.weight"].sum(0), ""
    )


class _Call(nn.Module):
    def __init__(self, module: nn.Module, call) -> None:
        super().__init__()
        self.module, self.call = module, call

    def forward(self, x: Tensor) -> Tensor:
        return self.call(self.module, x)


def test_repeated_backward_recomputes():
    p = fresh("mlp")
    model, loss_func = _extended(p)
    loss = loss_func(model(p.inputs), p.targets)
    with backpack(ext.BatchGrad()):
        loss.backward(retain_graph=True)
    first = {n: q.grad_batch for n, q in model.named_parameters()}
    with backpack(ext.SumGradSquared(), retain_graph=True):
        loss.backward()
    for n, q in model.named_parameters():
        assert_close(q.sum_grad_squared, first[n].square().sum(0), n)


def test_extension_hook_sees_every_layer_once():
    p = fresh("mlp")
    plain = run_backpack(p, [ext.DiagHessian()])
    total, seen = [0.0], []

    def hook(module: nn.Module) -> None:
        seen.append(type(module).__name__)
        for param in module.parameters(recurse=False):
            total[0] += param.diag_h.sum().item()
            del param.diag_h

    run_backpack(p, [ext.DiagHessian()], extension_hook=hook)
    assert seen == ["CrossEntropyLoss", "Linear", "ReLU", "Linear"]
    expected = sum(q.diag_h.sum().item() for q in plain.parameters())
    assert total[0] == pytest.approx(expected, rel=1e-12)


def test_disable_stores_nothing():
    p = fresh("mlp")
    model, loss_func = _extended(p)
    with disable():
        loss = loss_func(model(p.inputs), p.targets)
    loss.backward(retain_graph=True)  # plain backward works
    with backpack(ext.BatchGrad()), pytest.raises(RuntimeError, match="disable"):
        loss.backward()


def test_subsampling_selects_samples():
    p = fresh("cnn", "ce", "mean")
    full = run_backpack(p, [ext.BatchGrad(), ext.SqrtGGNExact()])
    sub = run_backpack(
        p, [ext.BatchGrad(subsampling=[0, 2]), ext.SqrtGGNExact(subsampling=[3, 1])]
    )
    for (n, a), b in zip(full.named_parameters(), sub.parameters(), strict=True):
        assert_close(b.grad_batch, a.grad_batch[[0, 2]], f"grad_batch {n}")
        assert_close(b.sqrt_ggn_exact, a.sqrt_ggn_exact[:, [3, 1]], f"sqrt {n}")


def test_batchnorm_statistics_are_not_replayed():
    """The replay does not update running statistics a second time."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    reference_model = copy.deepcopy(model)
    reference_model(x)
    extended, loss_func = extend(model), extend(nn.CrossEntropyLoss())
    loss = loss_func(extended(x), y)
    with backpack(ext.BatchGrad()), pytest.raises(ValueError, match="eval"):
        loss.backward()
    assert torch.equal(extended[1].running_mean, reference_model[1].running_mean)
    assert int(extended[1].num_batches_tracked) == 1


def test_monte_carlo_draws_are_fresh_and_seeded():
    p = fresh("mlp")
    model, loss_func = _extended(p)
    draws = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        with backpack(ext.DiagGGNMC()):
            loss_func(model(p.inputs), p.targets).backward()
        draws.append(model[0].weight.diag_ggn_mc.clone())
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])


def test_convolution_kfac_weight_and_bias_share_draws():
    """BackPACK's conv weight B is the bias block; both come from the same draws."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(12, 3)
    )
    x, y = torch.randn(4, 2, 4, 4), torch.randint(0, 3, (4,))
    p = Problem(net.double(), nn.CrossEntropyLoss(), x.double(), y)
    model = run_backpack(p, [ext.DiagGGNMC(mc_samples=2), ext.KFAC(mc_samples=3)])
    conv = model[0]
    assert_close(conv.weight.kfac[0], conv.bias.kfac[0], "B of weight and bias")


def test_tuple_output_warns_and_is_not_tracked():
    lstm = extend(nn.LSTM(3, 2, batch_first=True))
    with pytest.warns(UserWarning, match="not one tensor"):
        lstm(torch.randn(2, 4, 3))


def test_debug_prints(capsys: pytest.CaptureFixture[str]):
    p = fresh("mlp")
    model = extend(copy.deepcopy(p.model), debug=True)
    loss_func = extend(copy.deepcopy(p.loss_func))
    with backpack(ext.BatchGrad(), debug=True):
        loss_func(model(p.inputs), p.targets).backward()
    out = capsys.readouterr().out
    assert "Extending Sequential" in out
    assert "BatchGrad" in out


def test_use_converter_returns_the_module():
    model = nn.Linear(2, 2)
    assert extend(model, use_converter=True) is model


def test_savefield_values_are_for_trainable_parameters_only():
    p = fresh("mlp")
    model = copy.deepcopy(p.model)
    model[0].weight.requires_grad_(False)
    problem = Problem(model, p.loss_func, p.inputs, p.targets)
    extended = run_backpack(problem, [ext.DiagGGNExact()])
    assert not hasattr(extended[0].weight, "diag_ggn_exact")
    assert set(savefield(extended, "diag_ggn_exact")) == {
        "0.bias",
        "2.weight",
        "2.bias",
    }


def test_functional_calls_are_not_tracked():
    """torch.func transforms of an extended model inside a backpack block."""
    p = fresh("mlp")
    model = extend(copy.deepcopy(p.model))
    params = {n: q.detach() for n, q in model.named_parameters()}

    def loss(values: dict[str, Tensor]) -> Tensor:
        output = torch.func.functional_call(model, values, (p.inputs,))
        return p.loss_func(output, p.targets)

    with backpack(ext.BatchGrad()):
        grads = torch.func.grad(loss)(params)
    expected = torch.autograd.grad(
        p.loss_func(p.model(p.inputs), p.targets), list(p.model.parameters())
    )
    assert_close(grads["0.weight"], expected[0], "gradient through functional_call")
    assert not hasattr(model[0].weight, "grad_batch")


class _Scale(nn.Module):
    """A custom layer without an engine rule (BackPACK needs module extensions)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, dim, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


def test_custom_layer_without_module_extension():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), _Scale(4), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    problem = Problem(net, nn.CrossEntropyLoss(), x, y)
    extension = ext.DiagGGNExact()
    with pytest.warns(UserWarning, match="ignored"):
        extension.set_module_extension(_Scale, object())
    with pytest.warns(UserWarning, match="_Scale"):  # the engine's generic rule
        model = run_backpack(problem, [extension, ext.BatchGrad()])
    individual = reference.per_sample_gradients(net, problem.loss_func, x, y)
    blocks = reference.per_sample_ggn(net, problem.loss_func, x, y)
    diag = reference.split_vector(net, torch.diagonal(blocks, dim1=1, dim2=2))
    assert_close(model[2].weight.grad_batch, individual["2.weight"], "grad_batch")
    assert_close(model[2].weight.diag_ggn_exact, diag["2.weight"].sum(0), "diag")


class _Slice(nn.Module):
    """A parameter-free module between the model and the loss."""

    def __init__(self, start: int, stop: int) -> None:
        super().__init__()
        self.start, self.stop = start, stop

    def forward(self, x: Tensor) -> Tensor:
        return x[:, self.start : self.stop]


def test_extended_modules_between_model_and_loss():
    """GGN diagonals of output chunks, one backward pass each, sum to the whole."""
    p = fresh("mlp", "mse", "sum")
    whole = run_backpack(p, [ext.DiagGGNExact(), ext.BatchGrad()])
    model, loss_func = _extended(p)
    output = model(p.inputs)
    total = {n: torch.zeros_like(q) for n, q in model.named_parameters()}
    for start in range(output.shape[1]):
        chunk = extend(_Slice(start, start + 1))
        loss = loss_func(chunk(output), p.targets[:, start : start + 1])
        with backpack(ext.DiagGGNExact(), ext.BatchGrad()):
            loss.backward(retain_graph=True)
        for n, q in model.named_parameters():
            total[n] += q.diag_ggn_exact
    for n, q in whole.named_parameters():
        assert_close(total[n], q.diag_ggn_exact, f"sum over chunks {n}")
    assert_close(
        model[2].bias.grad_batch[:, -1], whole[2].bias.grad_batch[:, -1], "last chunk"
    )


def test_a_raising_forward_leaves_no_state():
    p = fresh("mlp")
    model, loss_func = _extended(p)
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 7, dtype=torch.float64))  # wrong input size
    with backpack(ext.BatchGrad()):
        loss_func(model(p.inputs), p.targets).backward()
    expected = reference.per_sample_gradients(p.model, p.loss_func, p.inputs, p.targets)
    assert_close(model[0].weight.grad_batch, expected["0.weight"], "grad_batch")


def _total_variance(model: nn.Module, x: Tensor, y: Tensor):
    """Total variance of the individual gradients as a function of the parameters."""
    n = x.shape[0]

    def sample_loss(params: dict[str, Tensor], xn: Tensor, yn: Tensor) -> Tensor:
        output = torch.func.functional_call(model, params, (xn[None],))
        return nn.functional.cross_entropy(output, yn[None]) / n

    def total(params: dict[str, Tensor]) -> Tensor:
        per_sample = torch.func.vmap(
            torch.func.grad(sample_loss), in_dims=(None, 0, 0)
        )(params, x, y)
        return sum(
            (g.square().mean(0) - g.mean(0).square()).sum() for g in per_sample.values()
        )

    return total


# torch warns that backward(create_graph=True) links parameters and their .grad
CREATE_GRAPH_WARNING = "ignore:Using backward.. with create_graph=True:UserWarning"


@pytest.mark.filterwarnings(CREATE_GRAPH_WARNING)
@pytest.mark.parametrize("second_order", [False, True], ids=["alone", "with-ggn"])
def test_quantities_are_differentiable_under_create_graph(second_order: bool):
    """BackPACK's "gradient of the variance": backward(create_graph=True).

    Alone or with a second-order extension, Variance comes from the extended loss.
    """
    p = fresh("mlp")
    model, loss_func = _extended(p)
    exts = [ext.Variance(), ext.DiagGGNExact()] if second_order else [ext.Variance()]
    with backpack(*exts):
        loss_func(model(p.inputs), p.targets).backward(create_graph=True)
    params = list(model.parameters())
    total = sum(q.variance.sum() for q in params)
    grads = torch.autograd.grad(total, params)
    detached = {n: q.detach() for n, q in p.model.named_parameters()}
    expected = torch.func.grad(_total_variance(p.model, p.inputs, p.targets))(detached)
    for (n, _), g in zip(model.named_parameters(), grads, strict=True):
        assert_close(g, expected[n], f"gradient of the variance w.r.t. {n}")
    if second_order:
        assert model[0].weight.diag_ggn_exact.requires_grad


@pytest.mark.filterwarnings(CREATE_GRAPH_WARNING)
def test_hessian_diagonals_stay_detached_under_create_graph():
    p = fresh("mlp")
    model, loss_func = _extended(p)
    with backpack(ext.DiagHessian(), ext.BatchGrad()):
        loss_func(model(p.inputs), p.targets).backward(create_graph=True)
    assert not model[0].weight.diag_h.requires_grad
    assert not model[0].weight.grad_batch.requires_grad


@pytest.mark.filterwarnings(CREATE_GRAPH_WARNING)
def test_first_order_of_other_scalars_are_differentiable():
    """The loss is not extended: the gradient of the variance still comes out right."""
    p = fresh("mlp")
    model = extend(copy.deepcopy(p.model))
    loss = nn.functional.cross_entropy(model(p.inputs), p.targets)
    with backpack(ext.Variance(), ext.BatchGrad(), ext.BatchL2Grad()):
        loss.backward(create_graph=True)
    params = list(model.parameters())
    grads = torch.autograd.grad(sum(q.variance.sum() for q in params), params)
    detached = {n: q.detach() for n, q in p.model.named_parameters()}
    expected = torch.func.grad(_total_variance(p.model, p.inputs, p.targets))(detached)
    for (n, q), g in zip(model.named_parameters(), grads, strict=True):
        assert_close(g, expected[n], f"gradient of the variance w.r.t. {n}")
        flat = q.grad_batch.flatten(1)
        assert_close(q.batch_l2, flat.square().sum(1), f"batch_l2 {n}")
