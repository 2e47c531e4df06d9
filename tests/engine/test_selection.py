"""``params=``: subsets equal the full result restricted, tied weights, errors."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from bayescurv import engine
from bayescurv.engine import reference
from bayescurv.engine.selection import select_parameters
from tests.cases import MODELS, ModelCase, Problem, make_problem
from tests.conftest import assert_close
from tests.engine.checks import EXACT
from tests.engine.test_features import Tied

COLUMNS = [
    *EXACT,
    engine.DiagGGNMC(mc_samples=2),
    engine.BatchDiagGGNMC(mc_samples=2),
    engine.SqrtGGNMC(mc_samples=2),
    engine.Jacobian(factored=True),
]
KRON = [engine.KFAC(mc_samples=2, kfac_approx="reduce"), engine.KFLR()]
HESSIAN = [engine.DiagHessian(), engine.BatchDiagHessian()]
HESSIAN_MODELS = {"mlp", "cnn", "residual_mlp", "weight_shared", "tokens"}


def _subset(model: nn.Module) -> list[str | Tensor]:
    """Every other trainable parameter, half by name and half as tensors.

    Layers with a weight and a bias keep only their weight.
    """
    chosen = [(n, p) for n, p in model.named_parameters() if p.requires_grad][::2]
    half = len(chosen) // 2
    return [n for n, _ in chosen[:half]] + [p for _, p in chosen[half:]]


def _value(value: object) -> list[Tensor]:
    if isinstance(value, engine.LinearJacobian):
        return [value.dense()]
    return list(value) if isinstance(value, list) else [value]


def _assert_restricted(full: engine.BackpropResult, part: engine.BackpropResult):
    for savefield in part.keys():
        for name, value in part[savefield].items():
            expected = _value(full[savefield][name])
            for i, (a, e) in enumerate(zip(_value(value), expected, strict=True)):
                assert_close(a, e, f"{savefield} {name} [{i}]")


def _both(p: Problem, extensions: list, subset: list, seed: int = 0):
    """The full and the subset result (same MC draws)."""
    runs = []
    for params in (None, subset):
        p.model.zero_grad(set_to_none=True)
        runs.append(
            engine.backprop(
                p.model,
                p.loss_func,
                p.inputs,
                p.targets,
                extensions,
                params=params,
                generator=torch.Generator().manual_seed(seed),
            )
        )
    return runs


@pytest.mark.parametrize("model_case", MODELS, ids=lambda m: m.name)
def test_subset_equals_full_restricted(model_case: ModelCase):
    p = make_problem(model_case, "ce", "mean")
    subset = _subset(p.model)
    exts = COLUMNS + (KRON if model_case.kron else [])
    full, part = _both(p, exts, subset)
    names = set(select_parameters(p.model, subset))
    for savefield in part.keys():
        assert set(part[savefield]) == names, savefield
    _assert_restricted(full, part)
    # .grad: the selected parameters as for the full call, the others untouched
    for name, param in p.model.named_parameters():
        if name in names:
            assert_close(
                param.grad, full[engine.BatchGrad.savefield][name].sum(0), name
            )
        else:
            assert param.grad is None, name


@pytest.mark.parametrize(
    "model_case", [m for m in MODELS if m.name in HESSIAN_MODELS], ids=lambda m: m.name
)
def test_subset_hessian_diagonals(model_case: ModelCase):
    p = make_problem(model_case, "ce", "sum")
    full, part = _both(p, HESSIAN, _subset(p.model))
    _assert_restricted(full, part)


def test_subset_kfra():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4), nn.ELU(), nn.Linear(4, 3)
    ).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    p = Problem(model, nn.CrossEntropyLoss(), x, torch.randint(0, 3, (6,)))
    full, part = _both(p, [engine.KFRA()], ["2.weight", "4.bias"])
    assert set(part["kfra"]) == {"2.weight", "4.bias"}
    _assert_restricted(full, part)


def test_layers_without_selected_parameters_are_not_recorded():
    calls = []

    class Counting(engine.GenericRule):
        def per_sample(self, module, inputs, grad_output):
            calls.append(type(module).__name__)
            return super().per_sample(module, inputs, grad_output)

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3, dtype=torch.float64))

        def forward(self, x: Tensor) -> Tensor:
            return x * self.weight

    engine.register_rule(Scale, Counting(), overwrite=True)
    model = nn.Sequential(Scale(), nn.Linear(3, 2)).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2).double()
    loss = nn.MSELoss()
    engine.backprop(model, loss, x, y, [engine.DiagGGNExact()], params=["1.weight"])
    assert calls == []
    engine.backprop(model, loss, x, y, [engine.DiagGGNExact()])
    assert calls == ["Scale"]


@pytest.fixture
def tied() -> Problem:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 6, (3, 4), generator=gen)
    targets = torch.randint(0, 6, (3,), generator=gen)
    return Problem(Tied().double(), nn.CrossEntropyLoss(), tokens, targets)


@pytest.mark.parametrize(
    "params",
    [None, ["out.weight"], "tensor", ["embed.weight", "mix.weight"]],
    ids=["all", "alias", "tensor", "with_weight_only_layer"],
)
def test_tied_weight_is_one_parameter(tied: Problem, params):
    if params == "tensor":
        params = [tied.model.out.weight]
    exts = [
        engine.BatchGrad(),
        engine.DiagGGNExact(),
        engine.SqrtGGNExact(),
        engine.Jacobian(factored=True),
        engine.DiagHessian(),
    ]
    res = engine.backprop(
        tied.model, tied.loss_func, tied.inputs, tied.targets, exts, params=params
    )
    assert "out.weight" not in res["grad_batch"]
    args = (tied.model, tied.loss_func, tied.inputs, tied.targets)
    grads = reference.per_sample_gradients(*args)
    diag = reference.split_vector(
        tied.model, torch.diagonal(reference.per_sample_ggn(*args), dim1=1, dim2=2)
    )
    hess = reference.split_vector(
        tied.model, torch.diagonal(reference.param_hessian(*args))
    )
    jac = reference.split_vector(
        tied.model, reference.jacobian(tied.model, tied.inputs)
    )
    for name in res["grad_batch"]:
        assert_close(res["grad_batch"][name], grads[name], f"grad_batch {name}")
        assert_close(res["diag_ggn_exact"][name], diag[name].sum(0), f"ggn {name}")
        assert_close(res["diag_h"][name], hess[name], f"diag_h {name}")
        jacobian = res["jacobian"][name]
        assert_close(jacobian.movedim(0, 1), jac[name], f"jacobian {name}")
        assert not isinstance(jacobian, engine.LinearJacobian)


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        (["0.weight", "nope"], ValueError, r"'nope', which is not a parameter"),
        ([torch.zeros(2)], ValueError, r"tensor of shape \(2,\) that is not a param"),
        (["0.bias"], ValueError, r"'0.bias', which has requires_grad=False"),
        ("0.weight", TypeError, "got a single str"),
        ([], ValueError, "selects no parameter"),
        ([("0.weight", None)], TypeError, "got tuple"),
    ],
    ids=["unknown", "foreign", "frozen", "single", "empty", "pairs"],
)
def test_bad_params(params, error, match):
    model = nn.Sequential(nn.Linear(3, 2))
    model[0].bias.requires_grad_(False)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    with pytest.raises(error, match=match):
        engine.backprop(model, nn.MSELoss(), x, y, [engine.BatchGrad()], params=params)
    with pytest.raises(error, match=match):
        engine.ggn_matrix(model, nn.MSELoss(), x, y, params=params)
    with pytest.raises(error, match=match):
        engine.GGNOperator(model, nn.MSELoss(), [(x, y)], params=params)


@pytest.mark.parametrize(
    ("model_name", "subset"),
    [
        ("mlp", None),
        ("mlp", ["0.bias", "2.weight"]),  # the Kronecker path of ggn_matrix
        ("cnn", None),
        ("weight_shared", None),
        ("tied", ["out.weight", "mix.bias"]),
    ],
    ids=["mlp", "mlp_bias_only_layer", "cnn", "weight_shared", "tied"],
)
def test_dense_and_products_on_a_subset(model_name: str, subset, tied: Problem):
    """ggn_matrix, the products and the operators equal the dense blocks."""
    if model_name == "tied":
        p = tied
    else:
        p = make_problem(next(m for m in MODELS if m.name == model_name), "ce", "mean")
    subset = subset or _subset(p.model)
    selected = select_parameters(p.model, subset)
    offsets, start = {}, 0
    for name, param in p.model.named_parameters():
        offsets[name] = torch.arange(start, start + param.numel())
        start += param.numel()
    idx = torch.cat([offsets[n] for n in selected])
    args = (p.model, p.loss_func, p.inputs, p.targets)
    p.model.zero_grad(set_to_none=True)
    assert_close(
        engine.ggn_matrix(*args, params=subset),
        reference.ggn(*args)[idx][:, idx],
        "ggn_matrix",
    )
    v = torch.randn(2, len(idx), dtype=torch.float64)
    products = {
        "ggn": (engine.ggn_vector_product, engine.GGNOperator, reference.ggn),
        "hessian": (
            engine.hessian_vector_product,
            engine.HessianOperator,
            reference.param_hessian,
        ),
        "ef": (
            engine.empirical_fisher_vector_product,
            engine.EFOperator,
            reference.empirical_fisher,
        ),
    }
    for kind, (product, operator, dense) in products.items():
        expected = v @ dense(*args)[idx][:, idx]
        assert_close(product(*args, v, params=subset), expected, kind)
        op = operator(p.model, p.loss_func, [(p.inputs, p.targets)], params=subset)
        assert op.shape == (len(idx), len(idx))
        assert_close(op @ v, expected, f"{kind} operator")
    assert all(param.grad is None for param in p.model.parameters())
