"""The compat layer beside BackPACK itself (skipped when BackPACK is not installed).

Same code, once with ``backpack`` and once with ``bayescurv.compat.backpack``: every
deterministic savefield coincides to float64 tolerance on models BackPACK supports,
convolution Kronecker factors included. Run with an environment that has
``backpack-for-pytorch`` (e.g. ``/work/lt/.venv``).
"""

from __future__ import annotations

import copy
from types import ModuleType

import pytest
import torch
from torch import nn

from bayescurv.compat import backpack as compat
from bayescurv.compat.backpack import extensions as compat_ext
from bayescurv.engine import reference
from tests.cases import Problem
from tests.compat.conftest import block, fresh
from tests.compat.test_products import dense_pch
from tests.conftest import assert_close

original = pytest.importorskip("backpack")
original_ext = pytest.importorskip("backpack.extensions")

pytestmark = pytest.mark.filterwarnings(
    # BackPACK's module hooks warn when the network input does not require grad,
    "ignore:Full backward hook is firing:UserWarning",
    # and about its own conventions for transposed convolutions;
    "ignore:.*approximation.*:UserWarning",
    # torch 2.14 (BackPACK's environment) scripts helpers inside torch.func.hessian
    "ignore:`torch.jit.script` is deprecated:FutureWarning",
)

EXACT = {
    "BatchGrad": "grad_batch",
    "BatchL2Grad": "batch_l2",
    "SumGradSquared": "sum_grad_squared",
    "Variance": "variance",
    "DiagGGNExact": "diag_ggn_exact",
    "BatchDiagGGNExact": "diag_ggn_exact_batch",
    "DiagHessian": "diag_h",
    "BatchDiagHessian": "diag_h_batch",
    "SqrtGGNExact": "sqrt_ggn_exact",
    "KFLR": "kflr",
}
RANDOM = {"DiagGGNMC", "BatchDiagGGNMC", "SqrtGGNMC", "KFAC"}


def _run(
    library: ModuleType, exts: ModuleType, problem: Problem, names, scale: float = 1.0
) -> nn.Module:
    model = library.extend(copy.deepcopy(problem.model))
    loss_func = library.extend(copy.deepcopy(problem.loss_func))
    loss = loss_func(model(problem.inputs), problem.targets)
    with library.backpack(*(getattr(exts, n)() for n in names)):
        (scale * loss).backward()
    return model


def _both(problem: Problem, names, scale: float = 1.0) -> tuple[nn.Module, nn.Module]:
    return (
        _run(original, original_ext, problem, names, scale),
        _run(compat, compat_ext, problem, names, scale),
    )


def _assert_same(theirs: nn.Module, ours: nn.Module, fields) -> None:
    for (name, a), b in zip(theirs.named_parameters(), ours.parameters(), strict=True):
        for field in fields:
            x, y = getattr(a, field), getattr(b, field)
            if isinstance(x, list):
                assert len(x) == len(y), f"{field} of {name}"
                for i, (f, g) in enumerate(zip(x, y, strict=True)):
                    assert_close(g, f, f"{field}[{i}] of {name}")
            else:
                assert_close(y, x, f"{field} of {name}")


def _sigmoid_mlp(loss: str) -> Problem:
    torch.manual_seed(0)
    outputs = 1 if loss == "bce" else 3
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(12, 5), nn.Sigmoid(), nn.Linear(5, 4), nn.Tanh(),
        nn.Linear(4, outputs),
    ).double()  # fmt: skip
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    targets = {
        "ce": torch.randint(0, 3, (6,)),
        "mse": torch.randn(6, 3, dtype=torch.float64),
        "bce": torch.rand(6, 1, dtype=torch.float64),
    }
    loss_func = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss}.get(
        loss, nn.BCEWithLogitsLoss
    )
    return Problem(model, loss_func(), x, targets[loss])


def _cnn() -> Problem:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 2, 2, bias=False), nn.Sigmoid(), nn.Flatten(), nn.Linear(8, 3),
    ).double()  # fmt: skip
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    return Problem(
        model, nn.CrossEntropyLoss(reduction="sum"), x, torch.randint(0, 3, (5,))
    )


@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_mlp_quantities_coincide(loss: str):
    names = [*EXACT, "KFRA"] if loss == "ce" else list(EXACT)
    theirs, ours = _both(_sigmoid_mlp(loss), names)
    _assert_same(theirs, ours, [*(EXACT[n] for n in EXACT), "grad"])
    if loss == "ce":
        _assert_same(theirs, ours, ["kfra"])


def test_cnn_quantities_coincide_with_backpack_conv_convention():
    theirs, ours = _both(_cnn(), list(EXACT))
    _assert_same(theirs, ours, [*(EXACT[n] for n in EXACT), "grad"])


def test_random_quantities_have_backpack_shapes():
    theirs, ours = _both(_cnn(), sorted(RANDOM))
    for a, b in zip(theirs.parameters(), ours.parameters(), strict=True):
        for field in ("diag_ggn_mc", "diag_ggn_mc_batch", "sqrt_ggn_mc"):
            assert getattr(a, field).shape == getattr(b, field).shape, field
        assert [f.shape for f in a.kfac] == [f.shape for f in b.kfac]


@pytest.mark.filterwarnings("ignore:.*seems to have been modified:UserWarning")
def test_scaled_loss_as_backpack():
    names = ["BatchGrad", "DiagGGNExact"]
    with pytest.warns(UserWarning, match="loss module alone"):
        ours = _run(compat, compat_ext, _sigmoid_mlp("ce"), names, scale=2.5)
    theirs = _run(original, original_ext, _sigmoid_mlp("ce"), names, scale=2.5)
    _assert_same(theirs, ours, ["grad_batch", "diag_ggn_exact", "grad"])


def test_subsampling_as_backpack():
    problem = _cnn()
    models = []
    for library, exts in [(original, original_ext), (compat, compat_ext)]:
        model = library.extend(copy.deepcopy(problem.model))
        loss_func = library.extend(copy.deepcopy(problem.loss_func))
        loss = loss_func(model(problem.inputs), problem.targets)
        with library.backpack(
            exts.BatchGrad(subsampling=[4, 1]), exts.SqrtGGNExact(subsampling=[0, 2])
        ):
            loss.backward()
        models.append(model)
    _assert_same(*models, ["grad_batch", "sqrt_ggn_exact"])


def _products(library: ModuleType, exts: ModuleType, problem: Problem) -> nn.Module:
    model = library.extend(copy.deepcopy(problem.model))
    loss_func = library.extend(copy.deepcopy(problem.loss_func))
    loss = loss_func(model(problem.inputs), problem.targets)
    with library.backpack(
        exts.GGNMP(), exts.HMP(), exts.PCHMP(savefield="clip"),
        exts.PCHMP(savefield="abs", modify="abs"),
    ):  # fmt: skip
        loss.backward()
    return model


@pytest.mark.parametrize("activation", [nn.ReLU, nn.Sigmoid])
def test_curvature_products(activation: type[nn.Module]):
    """GGNMP and HMP coincide; PCHMP where BackPACK's residual is the PCH's (ReLU).

    With a sigmoid, BackPACK 1.7.1's PCHMP uses delta^2 phi'' instead of delta
    phi'' (see NOTE [BackPACK 1.7's PCHMP squares the gradient]): the compat layer
    gives the PCH, BackPACK the other matrix (checked densely), and the two differ.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), activation(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    problem = Problem(model, nn.MSELoss(), x, torch.randn(5, 2, dtype=torch.float64))
    theirs = _products(original, original_ext, problem)
    ours = _products(compat, compat_ext, problem)
    squared = {m: dense_pch(problem, m, power=2) for m in ("clip", "abs")}
    gen = torch.Generator().manual_seed(0)
    for (name, a), b in zip(theirs.named_parameters(), ours.parameters(), strict=True):
        mat = torch.randn(3, *a.shape, generator=gen, dtype=a.dtype)
        for field in ("ggnmp", "hmp"):
            assert_close(getattr(b, field)(mat), getattr(a, field)(mat), field)
        for field in ("clip", "abs"):
            mine, other = getattr(b, field)(mat), getattr(a, field)(mat)
            variant = mat.flatten(1) @ block(squared[field], model, name).T
            assert_close(other.flatten(1), variant, f"BackPACK's {field} of {name}")
            if activation is nn.ReLU or name.startswith("2."):
                assert_close(mine, other, f"{field} of {name}")
            else:
                assert (mine - other).norm() > 1e-3 * mine.norm(), f"{field} {name}"


@pytest.mark.parametrize(
    "name", ["residual_mlp", "attention", "tokens", "weight_shared", "conv1d_norm"]
)
def test_models_backpack_rejects(name: str):
    """BackPACK raises for second order on these; the compat layer is exact.

    The dense references are those of test_extensions.py.
    """
    problem = fresh(name)
    with pytest.raises(NotImplementedError):
        _run(original, original_ext, problem, ["DiagGGNExact"])
    ours = _run(compat, compat_ext, problem, ["DiagGGNExact"])
    blocks = reference.per_sample_ggn(
        problem.model, problem.loss_func, problem.inputs, problem.targets
    )
    diag = reference.split_vector(problem.model, torch.diagonal(blocks, dim1=1, dim2=2))
    for n, p in ours.named_parameters():
        assert_close(p.diag_ggn_exact, diag[n].sum(0), n)


def test_products_after_in_place_updates():
    """As BackPACK's, the products use the backward pass's stored graph.

    An optimizer that updates a parameter in place between the products of two
    parameters (the CG-Newton example) sees the same numbers with both.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    problem = Problem(model, nn.CrossEntropyLoss(), x, torch.randint(0, 2, (5,)))
    results = []
    for library, exts in [(original, original_ext), (compat, compat_ext)]:
        extended = library.extend(copy.deepcopy(problem.model))
        loss_func = library.extend(copy.deepcopy(problem.loss_func))
        loss = loss_func(extended(problem.inputs), problem.targets)
        with library.backpack(exts.GGNMP(), exts.HMP()):
            loss.backward()
        gen = torch.Generator().manual_seed(0)
        out = []
        for p in extended.parameters():
            mat = torch.randn(2, *p.shape, generator=gen, dtype=p.dtype)
            out += [p.ggnmp(mat), p.hmp(mat)]
            p.data.add_(0.1)  # an optimizer step on this parameter
        results.append(out)
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        assert_close(b, a, f"product {i}")
