"""Rows of layer outputs and samples: the separability probe and folded batch axes.

A layer that sees the batch on a non-leading axis of the same size, or a model that
mixes samples, raises (naming the layer) instead of giving a wrong GGN. Layers that
see ``k N`` rows (extra axes folded into the batch sample-major) give the per-sample
quantities of the model, checked against the dense references.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bayescurv import engine
from bayescurv.engine import reference
from tests.conftest import assert_close
from tests.engine.checks import assert_same_results, check_exact_extensions

F64 = torch.float64
N = 4


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class SeqFirstByMistake(nn.Module):
    """A Linear applied to a transposed ``[T, N, d]`` tensor (T = N: no shape error)."""

    def __init__(self, positions: int, only_first: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.head = nn.Linear(2 * positions, 2)
        self.only_first = only_first

    def forward(self, x):  # x: [N, T, 3]
        h = torch.tanh(self.lin(x.transpose(0, 1)))  # the layer sees [T, N, 2]
        if self.only_first:  # only position 0 reaches the output
            h = h[:1].expand_as(h)
        return self.head(h.transpose(0, 1).flatten(1))


class Centered(nn.Module):
    """Subtracts the batch mean of a hidden layer's output."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.lin(x)
        return self.head(torch.tanh(h - h.mean(0)))


@pytest.mark.parametrize("only_first", [False, True], ids=["all", "first-position"])
def test_batch_on_a_non_leading_axis_of_equal_size_raises(only_first):
    model = SeqFirstByMistake(positions=N, only_first=only_first).double()
    x = torch.randn(N, N, 3, dtype=F64, generator=_gen())
    y = torch.randn(N, 2, dtype=F64, generator=_gen(1))
    match = r"Linear at 'lin': row \d+ of its output .* depends on (even|odd) samples"
    with pytest.raises(ValueError, match=match):
        engine.backprop(model, nn.MSELoss(), x, y, [engine.DiagGGNExact()])
    with pytest.raises(ValueError, match=match):
        engine.ggn_matrix(model, nn.MSELoss(), x, y)


def test_batch_on_a_non_leading_axis_of_other_size_raises():
    model = SeqFirstByMistake(positions=3).double()
    x = torch.randn(N, 3, 3, dtype=F64, generator=_gen())
    y = torch.randn(N, 2, dtype=F64, generator=_gen(1))
    with pytest.raises(ValueError, match=r"Linear at 'lin' produced an output of"):
        engine.backprop(model, nn.MSELoss(), x, y, [engine.BatchGrad()])


def test_models_that_mix_samples_raise_naming_the_layer():
    model = Centered().double()
    x = torch.randn(N, 3, dtype=F64, generator=_gen())
    y = torch.randint(0, 2, (N,))
    exts = [engine.BatchGrad(), engine.DiagGGNExact(), engine.KFLR()]
    with pytest.raises(ValueError, match=r"Linear at 'lin'.*mixes samples"):
        engine.backprop(model, nn.CrossEntropyLoss(), x, y, exts)


def test_check_samples_false_skips_the_probe_for_callers_that_probed():
    """The caller vouches for separability: no probe, the same numbers otherwise."""
    model = Centered().double()
    x = torch.randn(N, 3, dtype=F64, generator=_gen())
    y = torch.randint(0, 2, (N,))
    loss = nn.CrossEntropyLoss()
    for ext in (engine.BatchGrad(), engine.DiagGGNExact()):
        with pytest.raises(ValueError, match="mixes samples"):
            engine.backprop(model, loss, x, y, [ext])
        res = engine.backprop(model, loss, x, y, [ext], check_samples=False)
        assert ext.savefield in res
    chain = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    exts = [engine.BatchGrad(), engine.DiagGGNExact(), engine.KFLR()]
    probed = engine.backprop(chain, loss, x, y, exts)
    skipped = engine.backprop(chain, loss, x, y, exts, check_samples=False)
    assert_same_results(probed, skipped, exts)


def test_gradient_alone_and_products_need_no_separable_samples():
    """.grad and the matrix-free products are exact for any model: no probe."""
    model = Centered().double()
    x = torch.randn(N, 3, dtype=F64, generator=_gen())
    y = torch.randint(0, 2, (N,))
    loss = nn.CrossEntropyLoss()
    engine.backprop(model, loss, x, y, [])
    grads = torch.autograd.grad(loss(model(x), y), list(model.parameters()))
    for p, g in zip(model.parameters(), grads, strict=True):
        assert_close(p.grad, g, "gradient")
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=F64)
    gv = engine.ggn_vector_product(model, loss, x, y, v)
    assert_close(gv, reference.ggn(model, loss, x, y) @ v, "GGN product")


class Pairs(nn.Module):
    """Reward modeling: ``[N, 2, d]`` pairs folded into a ``[2N, d]`` batch."""

    def __init__(self, interleaved: bool = False) -> None:
        super().__init__()
        self.l1 = nn.Linear(3, 4)
        self.l2 = nn.Linear(4, 1)
        self.interleaved = interleaved

    def forward(self, x):  # x: [N, 2, 3]
        n = x.shape[0]
        h = x.transpose(0, 1) if self.interleaved else x
        r = self.l2(torch.tanh(self.l1(h.reshape(-1, 3))))  # [2N, 1]
        r = r.reshape(2, n).T if self.interleaved else r.reshape(n, 2)
        return r[:, :1] - r[:, 1:]


class PairsUnfolded(Pairs):
    """The same function with the layers on ``[N, 2, d]`` (positions, no folding)."""

    def forward(self, x):
        r = self.l2(torch.tanh(self.l1(x)))  # [N, 2, 1]
        return r[:, 0] - r[:, 1]


class FoldedConv(nn.Module):
    """Two images per sample through one convolution, ``[N, 2, C, H, W]``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.norm = nn.LayerNorm(3)
        self.head = nn.Linear(2 * 3 * 2 * 2, 3)

    def forward(self, x):
        n = x.shape[0]
        h = self.conv(x.reshape(-1, *x.shape[2:]))  # [2N, 3, 2, 2]
        h = self.norm(h.movedim(1, -1)).movedim(-1, 1)
        return self.head(torch.relu(h).reshape(n, -1))


def _pairs_data(n: int = N):
    x = torch.randn(n, 2, 3, dtype=F64, generator=_gen())
    return x, torch.rand(n, 1, dtype=F64, generator=_gen(1))


@pytest.mark.parametrize("n", [1, N])
def test_folded_pairs_match_the_dense_references(n):
    torch.manual_seed(0)
    model = Pairs().double()
    x, y = _pairs_data(n)
    loss = nn.BCEWithLogitsLoss()
    check_exact_extensions(model, loss, x, y)
    assert_close(
        engine.ggn_matrix(model, loss, x, y), reference.ggn(model, loss, x, y), "GGN"
    )
    jac = engine.backprop(model, None, x, None, [engine.Jacobian(factored=True)])
    full = reference.jacobian(model, x)  # [N, C, P]
    flat = torch.cat(
        [j.reshape(1, n, -1) for j in jac["jacobian"].values()], dim=-1
    )  # C = 1: no factored Linear on folded rows, every entry explicit
    assert_close(flat.movedim(0, 1), full, "Jacobian")


def test_folded_convolution_matches_the_dense_references():
    torch.manual_seed(0)
    model = FoldedConv().double()
    x = torch.randn(N, 2, 2, 4, 4, dtype=F64, generator=_gen())
    y = torch.randint(0, 3, (N,))
    loss = nn.CrossEntropyLoss()
    check_exact_extensions(model, loss, x, y)
    assert_close(
        engine.ggn_matrix(model, loss, x, y), reference.ggn(model, loss, x, y), "GGN"
    )


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_folded_kronecker_factors_treat_rows_as_positions(approx):
    """Folded rows give the factors of the same layers applied to ``[N, 2, d]``."""
    torch.manual_seed(0)
    folded = Pairs().double()
    unfolded = PairsUnfolded().double()
    unfolded.load_state_dict(folded.state_dict())
    x, y = _pairs_data()
    loss = nn.BCEWithLogitsLoss()
    exts = [engine.KFLR(kfac_approx=approx)]
    actual = engine.backprop(folded, loss, x, y, exts)["kflr"]
    expected = engine.backprop(unfolded, loss, x, y, exts)["kflr"]
    for name, factors in expected.items():
        for got, want in zip(actual[name], factors, strict=True):
            assert_close(got, want, f"{approx} {name}")


def test_interleaved_folds_raise():
    model = Pairs(interleaved=True).double()
    x, y = _pairs_data()
    match = r"Linear at 'l1' has 8 output rows for a batch of 4.*folded.*sample-major"
    with pytest.raises(ValueError, match=match):
        engine.backprop(model, nn.BCEWithLogitsLoss(), x, y, [engine.BatchGrad()])
    with pytest.raises(ValueError, match=match):
        engine.ggn_matrix(model, nn.BCEWithLogitsLoss(), x, y)


@pytest.mark.parametrize(
    "ext", [engine.DiagHessian(), engine.BatchDiagHessian(), engine.KFRA()]
)
def test_extensions_needing_one_row_per_sample_refuse_folds(ext):
    model = Pairs().double()
    x, y = _pairs_data()
    with pytest.raises(
        NotImplementedError, match=r"one row per sample.*'l1' sees 2 rows"
    ):
        engine.backprop(model, nn.BCEWithLogitsLoss(), x, y, [ext])


@pytest.mark.parametrize("n", [1, N])
def test_first_order_extensions_alone_split_the_gradient_pass(n):
    """The probe's two halves of the gradient add up to the gradient's pull-back."""
    model = Pairs().double()
    x, y = _pairs_data(n)
    loss = nn.BCEWithLogitsLoss(reduction="sum")
    exts = [engine.BatchGrad(), engine.BatchL2Grad(), engine.SumGradSquared()]
    res = engine.backprop(model, loss, x, y, exts)
    grads = reference.per_sample_gradients(model, loss, x, y)
    for name, g in grads.items():
        assert_close(res["grad_batch"][name], g, f"grad_batch {name}")
        assert_close(res["sum_grad_squared"][name], g.square().sum(0), f"sgs {name}")
        assert_close(model.get_parameter(name).grad, g.sum(0), f".grad {name}")


@pytest.mark.parametrize(
    "model",
    [Centered(), SeqFirstByMistake(positions=N), Pairs(interleaved=True)],
    ids=["mixing", "transposed", "interleaved"],
)
def test_first_order_extensions_alone_detect_mistakes(model):
    model = model.double()
    if isinstance(model, Pairs):
        x, y, loss = *_pairs_data(), nn.BCEWithLogitsLoss()
    else:
        x = torch.randn(N, N, 3, dtype=F64, generator=_gen())
        if isinstance(model, Centered):
            x = x[:, 0]
        y, loss = torch.randn(N, 2, dtype=F64, generator=_gen(1)), nn.MSELoss()
    with pytest.raises(ValueError, match=r"at '.*(rows|row \d+ of its output)"):
        engine.backprop(model, loss, x, y, [engine.BatchGrad()])


class _Counting:
    """Counts calls of ``check_separable`` (the probe) while patched in."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        backprop_module = __import__("bayescurv.engine.backprop", fromlist=["x"])
        real = backprop_module.check_separable

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(backprop_module, "check_separable", counted)


def _chain() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(1, 2, 3),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Sequential(nn.Flatten(), nn.Linear(8, 3)),
        nn.Tanh(),
        nn.Linear(3, 2),
    ).double()


@pytest.mark.parametrize(
    ("model", "probed"),
    [
        (_chain(), False),
        (
            nn.Sequential(nn.Flatten(0), nn.Unflatten(0, (N, 10)), nn.Linear(10, 2)),
            True,
        ),
        (nn.Sequential(nn.ZeroPad1d(1), nn.Flatten(), nn.Linear(12, 2)), True),
        (nn.Sequential(Centered(), nn.Linear(2, 2)), True),
    ],
    ids=["per-sample chain", "flatten-batch", "padding", "custom module"],
)
def test_chains_of_per_sample_modules_skip_the_probe(monkeypatch, model, probed):
    """NOTE [Chains that need no probe]: only whitelisted chains skip it."""
    counter = _Counting(monkeypatch)
    x = torch.randn(N, 1, 10, dtype=F64, generator=_gen())
    if isinstance(model[0], Centered):
        x = x[:, 0, :3]
    model = model.double()
    y = torch.randn(N, 2, dtype=F64, generator=_gen(1))
    if isinstance(model[0], Centered):
        with pytest.raises(ValueError, match="depends on"):
            engine.backprop(model, nn.MSELoss(), x, y, [engine.DiagGGNExact()])
    else:
        engine.backprop(model, nn.MSELoss(), x, y, [engine.DiagGGNExact()])
    assert counter.calls == int(probed)


def test_a_chain_without_the_probe_matches_the_dense_references():
    model = _chain()
    x = torch.randn(N, 1, 10, dtype=F64, generator=_gen())
    y = torch.randint(0, 2, (N,), generator=_gen(1))
    check_exact_extensions(model, nn.CrossEntropyLoss(), x, y)
