"""Memory estimates before allocation: ``max_memory=`` refuses with the estimate.

The estimates of the large results are exact (a budget of the result's size passes,
one byte less raises), and the default budget refuses terabytes before allocating.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bayescurv import engine
from bayescurv.engine.memory import MemoryBudgetError, format_bytes


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))


X = torch.randn(5, 3)
Y = torch.randint(0, 3, (5,))
LOSS = nn.CrossEntropyLoss()


def _nbytes(value) -> int:
    """Bytes of a result (tensor, list of factors, LinearJacobian)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, engine.LinearJacobian):
        return 0 if value.inputs is None else _nbytes(value.grads)  # grads shared
    return sum(_nbytes(v) for v in value)


LARGE = {
    "BatchGrad": (engine.BatchGrad(), "BatchL2Grad, SumGradSquared or Variance"),
    "BatchDiagGGNExact": (engine.BatchDiagGGNExact(), "DiagGGNExact sums"),
    "BatchDiagGGNMC": (engine.BatchDiagGGNMC(), "DiagGGNMC sums"),
    "BatchDiagHessian": (engine.BatchDiagHessian(), "DiagHessian sums"),
    "SqrtGGNExact": (engine.SqrtGGNExact(), "DiagGGNExact or KFLR"),
    "SqrtGGNMC": (engine.SqrtGGNMC(mc_samples=2), "fewer mc_samples"),
    "Jacobian": (engine.Jacobian(), r"Jacobian\(factored=True\)"),
    "Jacobian-factored": (engine.Jacobian(factored=True), "smaller batches"),
    "BatchDotGrad": (engine.BatchDotGrad(), "smaller batches"),
    "KFLR": (engine.KFLR(), "diagonal extension"),
    "KFAC-float64": (engine.KFAC(dtype=torch.float64), "diagonal extension"),
    "KFRA": (engine.KFRA(), "diagonal extension"),
}


@pytest.mark.parametrize(("ext", "alternative"), LARGE.values(), ids=list(LARGE))
def test_estimates_are_exact_and_refuse_above_the_budget(ext, alternative):
    loss, y = (None, None) if isinstance(ext, engine.Jacobian) else (LOSS, Y)
    res = engine.backprop(_model(), loss, X, y, [ext], accumulate_grad=False)
    size = sum(_nbytes(v) for v in res[ext.savefield].values())
    engine.backprop(_model(), loss, X, y, [ext], max_memory=size)
    name = type(ext).__name__
    match = (
        rf"{name}.* needs about {format_bytes(size)}, above the budget of "
        rf"{format_bytes(size - 1)} \(max_memory\)\. Nothing was allocated\. "
        rf".*{alternative}"
    )
    with pytest.raises(MemoryBudgetError, match=match):
        engine.backprop(_model(), loss, X, y, [ext], max_memory=size - 1)


def test_factored_convolutions_count_their_columns_and_patches():
    """A factored conv holds [C, N, out, L] columns and [N, L, in K] patches.

    Not the dense [C, N, P] (a ResNet-18's 16-image chunk: ~7 GB against ~0.3 GB).
    """
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 2)
    )
    x = torch.randn(5, 2, 4, 4)
    ext = engine.Jacobian(factored=True)
    res = engine.backprop(model, None, x, None, [ext])["jacobian"]
    conv, head = res["0.weight"], res["3.weight"]
    assert isinstance(conv, engine.LinearJacobian)
    assert conv.inputs.dim() == 3  # patches [N, L, in K]
    size = _nbytes(conv.grads) + _nbytes(conv.inputs) + _nbytes(head.grads)
    engine.backprop(model, None, x, None, [ext], max_memory=size)
    with pytest.raises(MemoryBudgetError, match=format_bytes(size)):
        engine.backprop(model, None, x, None, [ext], max_memory=size - 1)


def test_several_results_count_together():
    exts = [engine.BatchGrad(), engine.SqrtGGNExact()]
    res = engine.backprop(_model(), LOSS, X, Y, exts)
    sizes = [sum(_nbytes(v) for v in res[e.savefield].values()) for e in exts]
    engine.backprop(_model(), LOSS, X, Y, exts, max_memory=sum(sizes))
    with pytest.raises(MemoryBudgetError, match=r"SqrtGGNExact.*all results together"):
        engine.backprop(_model(), LOSS, X, Y, exts, max_memory=sum(sizes) - 1)


def test_ggn_matrix_and_to_dense_refuse_above_the_budget():
    model = _model()
    with pytest.raises(
        MemoryBudgetError, match=r"ggn_matrix: the GGN \[P, P\] with P=31.*GGNOperator"
    ):
        engine.ggn_matrix(model, LOSS, X, Y, max_memory=31 * 31 * 4)
    # into a given matrix only the pulled-back columns count
    engine.ggn_matrix(model, LOSS, X, Y, out=torch.zeros(31, 31), max_memory=10_000)
    operator = engine.GGNOperator(model, LOSS, [(X, Y)])
    with pytest.raises(MemoryBudgetError, match=r"to_dense: \[P, P\] with P=31.*eigsh"):
        operator.to_dense(max_memory=100)
    assert operator.to_dense(max_memory=31 * 31 * 4).shape == (31, 31)


def test_the_default_budget_refuses_terabytes_before_allocating():
    """A 1M-weight layer's dense GGN is 4 TB: refused at once, from shapes only."""
    model = nn.Linear(1000, 1000)
    x, y = torch.randn(2, 1000), torch.randn(2, 1000)
    match = r"needs about 3\.6 TiB, above the budget of .* \(the default: 80% of the"
    with pytest.raises(MemoryBudgetError, match=match):
        engine.ggn_matrix(model, nn.MSELoss(), x, y)
    with pytest.raises(MemoryBudgetError, match=match):
        engine.GGNOperator(model, nn.MSELoss(), [(x, y)]).to_dense()
    with pytest.raises(MemoryError):  # MemoryBudgetError is a MemoryError
        engine.ggn_matrix(model, nn.MSELoss(), x, y)


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (1.5e9, TypeError, r"max_memory must be a number of bytes \(int\) or None"),
        ("8GB", TypeError, r"max_memory must be a number of bytes"),
        (0, ValueError, r"max_memory must be positive, got 0"),
    ],
    ids=["float", "string", "zero"],
)
def test_max_memory_is_validated(value, error, match):
    with pytest.raises(error, match=match):
        engine.backprop(_model(), LOSS, X, Y, [engine.BatchGrad()], max_memory=value)
