"""Accumulation dtypes: Gram matrices of float32 vectors formed in float64.

A float32 model with more weights than data x outputs has a rank-deficient GGN (and
rank-deficient Kronecker factors). With ``dtype=torch.float64`` the engine must
reproduce the float64 model's matrices to float32 vector accuracy (~1e-7) with an
exact null space (~1e-16 of the largest eigenvalue); without it, round-off fills the
null space (~1e-8 and above). float64 models must see no float32 constant.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bayescurv import engine
from bayescurv.engine import reference
from bayescurv.engine.rules import kron_stats
from tests.cases import CASE_IDS, CASES, make_problem

F64 = torch.float64
VECTOR_RTOL = 1e-6  # float32 vectors, exact products
NULL_EXACT = 1e-13  # null-space eigenvalues / largest, float64 products
NULL_SMEARED = 1e-10  # float32 products exceed this somewhere in the null space
TIGHT = 1e-12  # float64 end to end against the float64 references


def _mlp(width_in: int = 12, hidden: int = 8, out: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(width_in, hidden),
        nn.Tanh(),
        nn.Linear(hidden, hidden),
        nn.Tanh(),
        nn.Linear(hidden, out),
    )


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 3),
    )


def _problem(kind: str):
    """A float32 model, its float64 copy, float32 data (rank-deficient GGN)."""
    gen = torch.Generator().manual_seed(1)
    if kind == "mlp-mse":
        model, loss = _mlp(), nn.MSELoss(reduction="sum")
        x = torch.randn(5, 12, generator=gen)
        y = torch.randn(5, 1, generator=gen)
    else:  # generic GGN path (convolution), cross-entropy
        model, loss = _cnn(), nn.CrossEntropyLoss()
        x = torch.randn(4, 2, 4, 4, generator=gen)
        y = torch.randint(0, 3, (4,), generator=gen)
    y64 = y.double() if y.is_floating_point() else y
    return model, copy.deepcopy(model).double(), loss, x, y, x.double(), y64


def _null_ratio(matrix: torch.Tensor, reference_matrix: torch.Tensor) -> float:
    """Largest |eigenvalue| in the reference's null space, over the largest one."""
    ref = torch.linalg.eigvalsh(reference_matrix)
    rank = int((ref > 1e-9 * ref[-1]).sum())
    evals = torch.linalg.eigvalsh(matrix.double())
    null = evals[: evals.numel() - rank]
    assert null.numel() > 0, "the test matrix must be rank-deficient"
    return (null.abs().max() / evals[-1]).item()


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("kind", ["mlp-mse", "cnn-ce"])
def test_ggn_matrix_float64_accumulation_keeps_the_null_space(kind):
    m32, m64, loss, x, y, x64, y64 = _problem(kind)
    expected = engine.ggn_matrix(m64, loss, x64, y64)
    accumulated = engine.ggn_matrix(m32, loss, x, y, dtype=F64)
    assert accumulated.dtype == F64
    assert _rel(accumulated, expected) < VECTOR_RTOL
    assert _null_ratio(accumulated, expected) < NULL_EXACT
    plain = engine.ggn_matrix(m32, loss, x, y)
    assert plain.dtype == torch.float32
    assert _null_ratio(plain, expected) > NULL_SMEARED  # what dtype= fixes


def test_ggn_matrix_accumulates_into_out_of_its_dtype():
    m32, _, loss, x, y, _, _ = _problem("mlp-mse")
    size = sum(p.numel() for p in m32.parameters())
    total = torch.zeros(size, size, dtype=F64)
    engine.ggn_matrix(m32, loss, x[:2], y[:2], out=total)
    engine.ggn_matrix(m32, loss, x[2:], y[2:], out=total)
    whole = engine.ggn_matrix(m32, loss, x, y, dtype=F64)
    torch.testing.assert_close(total, whole, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"out has dtype torch.float64 but dtype="):
        engine.ggn_matrix(m32, loss, x, y, out=total, dtype=torch.float32)


def _kron(model, loss, x, y, ext, **kw):
    return engine.backprop(model, loss, x, y, [ext], accumulate_grad=False, **kw)


@pytest.mark.parametrize(
    ("kind", "ext"), [("mlp-mse", "KFLR"), ("cnn-ce", "KFLR"), ("mlp-mse", "KFRA")]
)
def test_kronecker_factors_float64_accumulation(kind, ext):
    m32, m64, loss, x, y, x64, y64 = _problem(kind)
    cls = getattr(engine, ext)
    field = cls.savefield
    expected = _kron(m64, loss, x64, y64, cls())[field]
    accumulated = _kron(m32, loss, x, y, cls(dtype=F64))[field]
    plain = _kron(m32, loss, x, y, cls())[field]
    smeared = []
    for name, factors in expected.items():
        for got, raw, want in zip(accumulated[name], plain[name], factors, strict=True):
            assert got.dtype == F64, name
            assert _rel(got, want) < VECTOR_RTOL, name
            if got.shape[0] > 1 and torch.linalg.matrix_rank(want) < got.shape[0]:
                assert _null_ratio(got, want) < NULL_EXACT, name
                smeared.append(_null_ratio(raw, want))
    assert smeared, "the problem must have rank-deficient factors"
    assert max(smeared) > NULL_SMEARED  # what dtype= fixes


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kfac_float64_accumulation_has_exact_rank(approx):
    m32, m64, loss, x, y, x64, y64 = _problem("mlp-mse")
    gen = torch.Generator().manual_seed(0)
    ext = engine.KFAC(mc_samples=2, kfac_approx=approx, dtype=F64)
    factors = _kron(m32, loss, x, y, ext, generator=gen)["kfac"]
    exact_a = _kron(m64, loss, x64, y64, engine.KFLR(kfac_approx=approx))["kflr"]
    b_first, a_first = factors["0.weight"]
    assert b_first.dtype == a_first.dtype == F64
    assert _rel(a_first, exact_a["0.weight"][1]) < VECTOR_RTOL  # inputs: not sampled
    # A of the first layer: 12 x 12 from 5 samples; B of the hidden layer: 8 x 8 from
    # 5 samples x 2 draws sharing one sampled output direction per sample
    assert _null_ratio(a_first, exact_a["0.weight"][1]) < NULL_EXACT


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "shape", [(3, 4, 5, 2), (3, 4, 2, 5), (3, 4, 1, 5)], ids=["R>d", "R<d", "R=1"]
)
@pytest.mark.parametrize("layout", ["contiguous", "channel_major"])
def test_sum_outer_upcasts_chunk_by_chunk(monkeypatch, shape, layout, dtype):
    monkeypatch.setattr(kron_stats, "_GRAM_CHUNK", 3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    if layout == "channel_major":
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    expected = torch.einsum("abrd,abre->de", x.to(dtype), x.to(dtype))
    actual = kron_stats.sum_outer(x, dtype)
    assert actual.dtype == dtype
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def test_operator_to_dense_float64_accumulation():
    m32, m64, _, x, y, x64, y64 = _problem("mlp-mse")
    loss = nn.MSELoss()  # mean over the whole data set, uneven batches
    batches32 = [(x[:3], y[:3]), (x[3:], y[3:])]
    batches64 = [(x64[:3], y64[:3]), (x64[3:], y64[3:])]
    expected = engine.GGNOperator(m64, loss, batches64).to_dense()
    accumulated = engine.GGNOperator(m32, loss, batches32).to_dense(dtype=F64)
    assert accumulated.dtype == F64
    assert _rel(accumulated, expected) < VECTOR_RTOL
    assert _null_ratio(accumulated, expected) < NULL_EXACT
    # curvatures that are not one Gram matrix per batch: products, then cast
    hessian = engine.HessianOperator(m32, loss, batches32).to_dense(dtype=F64)
    assert hessian.dtype == F64


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: engine.KFLR(dtype="float64"), TypeError, "must be a torch.dtype"),
        (lambda: engine.KFAC(dtype=torch.float16), ValueError, "not an accumulation"),
        (lambda: engine.KFRA(dtype=torch.int64), ValueError, "not an accumulation"),
    ],
    ids=["string", "half", "integer"],
)
def test_accumulation_dtype_is_validated(make, error, match):
    with pytest.raises(error, match=match):
        make()


# float64 stays float64: one case per loss and a few model families
TIGHT_CASES = [
    (case, i)
    for case, i in zip(CASES, CASE_IDS, strict=True)
    if case[0].name in ("mlp", "residual_cnn", "tokens", "attention")
    and case[2] == "mean"
]


@pytest.mark.parametrize(
    "case", [c for c, _ in TIGHT_CASES], ids=[i for _, i in TIGHT_CASES]
)
def test_float64_results_have_no_float32_round_off(case):
    """No float32 constant enters a float64 computation (it would cost ~3e-8)."""
    problem = make_problem(*case)
    args = (problem.model, problem.loss_func, problem.inputs, problem.targets)
    expected = reference.ggn(*args)
    scale = expected.abs().max()
    dense = engine.ggn_matrix(*args)
    assert ((dense - expected).abs().max() / scale).item() < TIGHT
    kron = [engine.KFLR()] if case[0].kron else []
    res = engine.backprop(*args, [engine.DiagGGNExact(), *kron], accumulate_grad=False)
    diag = torch.cat([d.flatten() for d in res["diag_ggn_exact"].values()])
    assert ((diag - expected.diagonal()).abs().max() / scale).item() < TIGHT
    for factors in res["kflr"].values() if kron else []:
        assert all(f.dtype == F64 for f in factors)
