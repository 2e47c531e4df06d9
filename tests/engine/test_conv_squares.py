"""Squared convolution reductions from location pairs, against dense references.

NOTE [Convolution sums and norms without per-sample vectors] and
``bayescurv/engine/rules/conv_squares.py``: ``SUM_SQUARED`` / ``BATCH_SQUARED`` of a
convolution on a small output map are summed over columns and location pairs instead
of materializing per-sample vectors. The pair form is forced (or forbidden) by
patching the cost model, and the tests check that it actually ran.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from bayescurv import engine
from bayescurv.engine import reference
from bayescurv.engine.extensions import Reduction
from bayescurv.engine.rules import ConvRule, LayerCall, conv_squares
from bayescurv.engine.rules import conv as conv_rule
from tests.conftest import assert_close

N = 5
C = 3

# conv, input spatial size: output maps of 1, 2x2, 3x3, 2, 2x1x2 locations
CONVS = {
    "2d-1x1-bias": (lambda: nn.Conv2d(3, 4, 3), (3, 3)),
    "2d-2x2-stride-padding": (
        lambda: nn.Conv2d(2, 5, 3, stride=2, padding=1, bias=False),
        (4, 3),
    ),
    "2d-3x3-dilation-reflect": (
        lambda: nn.Conv2d(2, 3, 2, dilation=2, padding=1, padding_mode="reflect"),
        (3, 3),
    ),
    "2d-2x2-groups": (lambda: nn.Conv2d(4, 6, 2, groups=2), (3, 3)),
    "1d-same-no-bias": (lambda: nn.Conv1d(3, 4, 3, padding="same", bias=False), (2,)),
    "3d-stride": (lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1)), (3, 3, 3)),
}


def _headed(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The conv, tanh and a linear head; a float64 batch and class targets."""
    torch.manual_seed(0)
    make, spatial = CONVS[name]
    conv = make()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, conv.in_channels, *spatial, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        numel = conv.double()(x)[0].numel()
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(numel, C)).double()
    return model, x, torch.randint(0, C, (N,), generator=gen)


@pytest.fixture
def pair_calls(monkeypatch: pytest.MonkeyPatch) -> Callable[[bool], list[int]]:
    """Force (True) or forbid (False) the pair form; the list counts its chunks."""

    def force(pairs: bool) -> list[int]:
        chunks: list[int] = []
        real = conv_squares._patch_pairs
        monkeypatch.setattr(conv_rule, "pairs_cheaper", lambda *args: pairs)
        monkeypatch.setattr(
            conv_squares,
            "_patch_pairs",
            lambda patches, *rest: (
                chunks.append(patches.shape[0]) or real(patches, *rest)
            ),
        )
        return chunks

    return force


def _check_ggn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs) -> None:
    loss = nn.CrossEntropyLoss(reduction="sum")
    exts = [engine.DiagGGNExact(), engine.BatchDiagGGNExact(), engine.SumGradSquared()]
    res = engine.backprop(model, loss, x, y, exts, **kwargs)
    blocks = reference.per_sample_ggn(model, loss, x, y)
    diag = reference.split_vector(model, torch.diagonal(blocks, dim1=1, dim2=2))
    grads = reference.per_sample_gradients(model, loss, x, y)
    for name, expected in diag.items():
        assert_close(res["diag_ggn_exact"][name], expected.sum(0), f"diag {name}")
        assert_close(res["diag_ggn_exact_batch"][name], expected, f"batch {name}")
        sgs = grads[name].square().sum(0)
        assert_close(res["sum_grad_squared"][name], sgs, f"sgs {name}")


@pytest.mark.parametrize("name", CONVS)
@pytest.mark.parametrize("pairs", [True, False], ids=["pairs", "vectors"])
def test_ggn_diagonals_and_sum_grad_squared(name, pairs, pair_calls):
    """Both reductions, C - 1 = 2 exact columns and the gradient column; both forms."""
    chunks = pair_calls(pairs)
    _check_ggn(*_headed(name))
    # one call each for the exact columns and the gradient column, or none
    assert chunks == ([N, N] if pairs else [])


@pytest.mark.parametrize("name", ["2d-2x2-stride-padding", "2d-2x2-groups"])
def test_chunks_over_samples_under_a_tiny_budget(name, pair_calls):
    """``memory_budget=1``: the pair form runs one sample at a time, same results.

    The engine also pulls back one column at a time: the C - 1 columns of the
    cross-entropy Hessian's fewest factor (NOTE [Fewest columns]) and the gradient.
    """
    chunks = pair_calls(True)
    _check_ggn(*_headed(name), memory_budget=1)
    assert chunks == [1] * (C * N)


@pytest.mark.parametrize("batched", [False, True], ids=["sum", "batch"])
def test_each_reduction_alone(batched, pair_calls):
    """DiagGGNExact and BatchDiagGGNExact requested on their own."""
    chunks = pair_calls(True)
    model, x, y = _headed("3d-stride")
    loss = nn.CrossEntropyLoss()
    ext = engine.BatchDiagGGNExact() if batched else engine.DiagGGNExact()
    res = engine.backprop(model, loss, x, y, [ext])
    blocks = reference.per_sample_ggn(model, loss, x, y)
    diag = reference.split_vector(model, torch.diagonal(blocks, dim1=1, dim2=2))
    for name, expected in diag.items():
        wanted = expected if batched else expected.sum(0)
        assert_close(res[ext.savefield][name], wanted, name)
    assert chunks == [N]


class SmallResidual(nn.Module):
    """A residual convolution on a 2x2 map (DiagHessian takes the graph path)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(2 * 2 * 2, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x) + x).flatten(1))


@pytest.mark.parametrize(
    ("make", "shape"),
    [(SmallResidual, (2, 2, 2)), (lambda: _headed("2d-2x2-groups")[0], (4, 3, 3))],
    ids=["graph", "chain"],
)
def test_hessian_diagonals(make, shape, pair_calls):
    """Signed Hessian columns (chain and graph walkers) through the pair form."""
    chunks = pair_calls(True)
    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(N, *shape, dtype=torch.float64)
    y = torch.randint(0, C, (N,))
    loss = nn.CrossEntropyLoss()
    exts = [engine.DiagHessian(), engine.BatchDiagHessian()]
    res = engine.backprop(model, loss, x, y, exts)
    args = (model, loss, x, y)
    diag = reference.split_vector(model, torch.diagonal(reference.param_hessian(*args)))
    per_sample = reference.per_sample_hessian_diagonals(*args)
    for name, expected in diag.items():
        assert_close(res["diag_h"][name], expected, f"diag_h {name}")
        assert_close(res["diag_h_batch"][name], per_sample[name], f"batch {name}")
    assert chunks


def test_monte_carlo_columns_agree_between_forms(pair_calls):
    """Same sampled columns (same generator seed): both forms give the same values."""
    model, x, y = _headed("2d-3x3-dilation-reflect")
    loss = nn.CrossEntropyLoss()
    exts = [engine.DiagGGNMC(mc_samples=3), engine.BatchDiagGGNMC(mc_samples=3)]
    results = []
    for pairs in (True, False):
        chunks = pair_calls(pairs)
        gen = torch.Generator().manual_seed(2)
        results.append(engine.backprop(model, loss, x, y, exts, generator=gen))
        assert bool(chunks) == pairs
    for ext in exts:
        for name, value in results[1][ext.savefield].items():
            assert_close(results[0][ext.savefield][name], value, name)


def _call(conv: nn.Module, side: int) -> LayerCall:
    x = torch.zeros(2, conv.in_channels, side, side)
    call = LayerCall((x,))
    with torch.no_grad():
        call.output_shapes = (conv(x)[0].shape,)
    return call


@pytest.mark.parametrize(
    ("conv", "side", "expected"),
    [
        (nn.Conv2d(512, 512, 3, padding=1, bias=False), 1, False),  # ResNet-18 layer4
        (nn.Conv2d(256, 256, 3, padding=1, bias=False), 2, False),  # layer3
        (nn.Conv2d(3, 64, 5), 32, True),  # 3C3D's first conv: 28 x 28 outputs
    ],
    ids=["1x1-map", "2x2-map", "28x28-map"],
)
def test_small_maps_do_not_materialize(conv, side, expected):
    """The engine hands small-map layers all columns at once (no per-sample chunks)."""
    rule = ConvRule()
    for reductions in ({Reduction.SUM_SQUARED}, {Reduction.BATCH_SQUARED}):
        assert rule.materializes(conv, _call(conv, side), reductions) == expected
    # the dot product of per-sample vectors has no closed form
    assert rule.materializes(conv, _call(conv, side), {Reduction.DOT})


@pytest.mark.parametrize(
    ("columns", "length", "expected"),
    [(1, 1, True), (1, 4, True), (10, 16, True), (1, 16, False), (10, 64, False)],
)
def test_cost_model_on_resnet18_shapes(columns, length, expected):
    """The crossovers measured by experiments/conv_squares.py (C_out 128, 3x3x128)."""
    assert conv_squares.pairs_cheaper(columns, 128, 128 * 9, length, 1) == expected


def test_differentiable_path_materializes(pair_calls):
    """create_graph=True keeps the per-sample path, with the same values."""
    chunks = pair_calls(True)
    model, x, y = _headed("2d-1x1-bias")
    loss = nn.CrossEntropyLoss()
    ext = [engine.DiagGGNExact()]
    graph = engine.backprop(model, loss, x, y, ext, create_graph=True)
    assert len(chunks) == 0
    plain = engine.backprop(model, loss, x, y, ext)
    assert chunks == [N]
    for name, value in plain["diag_ggn_exact"].items():
        assert graph["diag_ggn_exact"][name].requires_grad
        assert_close(graph["diag_ggn_exact"][name].detach(), value, name)


@pytest.mark.parametrize("selected", ["0.weight", "0.bias"])
def test_one_parameter_of_the_layer(selected, pair_calls):
    """``params=``: the pair form serves the weight alone; the bias needs no pairs."""
    chunks = pair_calls(True)
    model, x, y = _headed("2d-1x1-bias")
    loss = nn.CrossEntropyLoss()
    ext = engine.BatchDiagGGNExact()
    res = engine.backprop(model, loss, x, y, [ext], params=[selected])
    blocks = reference.per_sample_ggn(model, loss, x, y)
    diag = reference.split_vector(model, torch.diagonal(blocks, dim1=1, dim2=2))
    assert list(res[ext.savefield]) == [selected]
    assert_close(res[ext.savefield][selected], diag[selected], selected)
    assert chunks == ([N] if selected == "0.weight" else [])


def test_with_norms_and_sums_of_the_gradient_column(pair_calls):
    """SUM, L2 and SUM_SQUARED of one column together, each in closed form."""
    chunks = pair_calls(True)
    model, x, y = _headed("2d-1x1-bias")
    loss = nn.CrossEntropyLoss()
    exts = [engine.BatchL2Grad(), engine.SumGradSquared(), engine.Variance()]
    res = engine.backprop(model, loss, x, y, exts)
    grads = reference.per_sample_gradients(model, loss, x, y)
    for name, g in grads.items():
        assert_close(res["batch_l2"][name], g.flatten(1).square().sum(1), name)
        assert_close(res["sum_grad_squared"][name], g.square().sum(0), name)
        var = g.square().mean(0) - g.mean(0).square()
        assert_close(res["variance"][name], var, name)
        assert_close(model.get_parameter(name).grad, g.sum(0), f".grad {name}")
    assert chunks == [N]
