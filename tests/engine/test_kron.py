"""KFLR and KFAC on the case table: definitions, exact cases, shapes, sharing, errors.

Grouped convolutions (in the ``cnn`` and ``conv1d_norm`` models) get one Kronecker
block per group: factors ``[G, d, d]``, checked against the groups' diagonal blocks.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from bayescurv import engine
from bayescurv.engine import pool, reference
from bayescurv.engine.rules import kron_stats
from tests.cases import (
    KRON_CASE_IDS,
    KRON_CASES,
    KRON_MODELS,
    MODELS,
    ModelCase,
    Problem,
    make_problem,
)
from tests.conftest import assert_close
from tests.engine.checks import assert_same_results
from tests.engine.kron_helpers import (
    APPROXES,
    CONVS,
    ggn_blocks,
    hand_factors,
    layer_inputs,
)

INPUT_FACTOR_LAYERS = (nn.Linear, *CONVS, nn.Embedding)


@pytest.fixture(scope="module", params=KRON_CASES, ids=KRON_CASE_IDS)
def kron_problem(request: pytest.FixtureRequest) -> Problem:
    """The case-table problems whose layers all have Kronecker factors."""
    return make_problem(*request.param)


@pytest.fixture(scope="module")
def kflr(kron_problem: Problem) -> dict[str, engine.BackpropResult]:
    """KFLR of both approximations, one engine call each."""
    p = kron_problem
    return {
        approx: engine.backprop(
            p.model, p.loss_func, p.inputs, p.targets, [engine.KFLR(kfac_approx=approx)]
        )
        for approx in APPROXES
    }


def _owners(model: nn.Module) -> dict[str, nn.Module]:
    """Parameter name -> the module owning it."""
    return {
        f"{mod_name}.{local}" if mod_name else local: module
        for mod_name, module in model.named_modules()
        for local, _ in module.named_parameters(recurse=False)
    }


def _expected_shapes(module: nn.Module, local: str, approx: str) -> list[tuple]:
    p = getattr(module, local)
    if isinstance(module, nn.Embedding):
        vocab, dim = p.shape
        a = (vocab,) if approx == "expand" else (vocab, vocab)
        return [a, (dim, dim)]
    if local == "weight" and isinstance(module, INPUT_FACTOR_LAYERS):
        out, rest = p.shape[0], p[0].numel()
        groups = getattr(module, "groups", 1)
        if groups > 1:
            return [(groups, out // groups, out // groups), (groups, rest, rest)]
        return [(out, out), (rest, rest)]
    return [(p.numel(), p.numel())]


def test_keys_shapes_symmetry(kron_problem: Problem, kflr: dict):
    owners = _owners(kron_problem.model)
    for approx, res in kflr.items():
        assert set(res["kflr"]) == set(owners)
        for name, factors in res["kflr"].items():
            module, local = owners[name], name.rsplit(".", 1)[-1]
            shapes = [tuple(f.shape) for f in factors]
            assert shapes == _expected_shapes(module, local, approx), name
            for f in factors:
                if f.dim() >= 2:
                    assert_close(f, f.mT, f"symmetry of {approx} {name}")
                    assert torch.linalg.eigvalsh(f).min() > -1e-10, name
                else:
                    assert (f >= 0).all(), name


def test_factors_match_their_definitions(kron_problem: Problem, kflr: dict):
    """Weights: the expand and reduce formulas written out from per-position blocks."""
    p = kron_problem
    owners = _owners(p.model)
    checked = 0
    for name, module in owners.items():
        if not (name.endswith("weight") and isinstance(module, INPUT_FACTOR_LAYERS)):
            continue
        hand = hand_factors(p.model, p.loss_func, p.inputs, p.targets, module)
        for approx in APPROXES:
            b, a = hand[approx]
            if isinstance(module, nn.Embedding):
                expected = [a.diagonal() if approx == "expand" else a, b]
            else:
                expected = [b, a]
            got = kflr[approx]["kflr"][name]
            for i, (g, want) in enumerate(zip(got, expected, strict=True)):
                assert_close(g, want, f"{approx} factor {i} of {name}")
        checked += 1
    assert checked > 0


def test_full_blocks_are_exact_ggn_blocks(kron_problem: Problem, kflr: dict):
    """Biases and normalization parameters get the exact GGN block ``[B]``."""
    p = kron_problem
    blocks = ggn_blocks(p.model, p.loss_func, p.inputs, p.targets)
    for approx, res in kflr.items():
        for name, factors in res["kflr"].items():
            if len(factors) == 1:
                assert_close(factors[0], blocks[name], f"{approx} block of {name}")


def _single_location_convs() -> list[ModelCase]:
    def head(conv: nn.Module, channels: int) -> nn.Module:
        return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(channels, 3))

    def rand(*shape: int):
        return lambda gen: torch.randn(*shape, generator=gen, dtype=torch.float64)

    return [
        ModelCase("conv1d_L1", lambda: head(nn.Conv1d(2, 3, 5), 3), rand(4, 2, 5)),
        ModelCase(
            "conv2d_L1",
            lambda: head(nn.Conv2d(2, 3, 3, stride=2, padding=1), 3),
            rand(4, 2, 1, 2),
        ),
        ModelCase(
            "conv3d_L1",
            lambda: head(nn.Conv3d(1, 2, (2, 1, 2), dilation=(1, 1, 2)), 2),
            rand(4, 1, 2, 1, 3),
        ),
        # grouped and depthwise: the groups' diagonal blocks are exact
        ModelCase(
            "conv1d_groups2_L1",
            lambda: head(nn.Conv1d(4, 6, 3, groups=2), 6),
            rand(4, 4, 3),
        ),
        ModelCase(
            "conv2d_depthwise_L1",
            lambda: head(nn.Conv2d(4, 4, 3, groups=4, padding=1, stride=3), 4),
            rand(4, 4, 2, 2),
        ),
    ]


SINGLE_DATUM = [*KRON_MODELS, *_single_location_convs()]


@pytest.mark.parametrize("model_case", SINGLE_DATUM, ids=[m.name for m in SINGLE_DATUM])
@pytest.mark.parametrize("approx", APPROXES)
def test_kflr_is_exact_for_one_datum_at_one_position(model_case: ModelCase, approx):
    """``kron(B, A)`` is the GGN block for layers called once at a single position.

    Exact cases: one datum (N=1), every Linear (2-D input, or ``[1, 1, in]``),
    Embedding and convolution with a single output location, called once. Layers at
    several positions (convolutions with ``L > 1``, calls of a shared layer) are not.
    """
    p = make_problem(model_case, "ce", "sum")
    model = p.model
    x = p.inputs[:1, :1] if model_case.name == "tokens" else p.inputs[:1]
    y = p.targets[:1, :1] if model_case.name == "tokens" else p.targets[:1]
    res = engine.backprop(model, p.loss_func, x, y, [engine.KFLR(kfac_approx=approx)])
    blocks = ggn_blocks(model, p.loss_func, x, y)
    owners = _owners(model)
    checked = 0
    for name, factors in res["kflr"].items():
        module = owners[name]
        calls = reference.layer_calls(model, x, module)
        single = len(calls) == 1 and (
            not isinstance(module, INPUT_FACTOR_LAYERS)
            or layer_inputs(module, calls[0][0]).shape[1] == 1
        )
        if single:
            dense = engine.kron_dense(factors)
            assert_close(dense, _group_blocks(blocks[name], factors), f"block {name}")
            checked += blocks[name].any()
    assert checked > 0


def _group_blocks(block: Tensor, factors: list[Tensor]) -> Tensor:
    """The exact block, or for factors ``[G, d, d]`` its groups' diagonal blocks.

    Kronecker factors are block-diagonal over groups: they keep each group's own
    block (exact for one datum at one position) and drop those between groups.
    """
    if factors[0].dim() < 3:
        return block
    size = block.shape[0] // factors[0].shape[0]
    return torch.block_diag(
        *(b.split(size, 1)[i] for i, b in enumerate(block.split(size)))
    )


def test_weight_shared_layer_calls_are_positions():
    """A layer called twice: its two calls enter like two positions of one call.

    expand: ``B = sum_{n,k} J_nk^T H_n J_nk`` and ``A = mean_{n,k} x_nk x_nk^T``;
    reduce: ``B = sum_n (sum_k J_nk)^T H_n (sum_k J_nk)``, ``A`` of the call means.
    """
    p = make_problem(next(m for m in MODELS if m.name == "weight_shared"), "mse", "sum")
    shared = p.model.shared
    args = (p.model, p.loss_func, p.inputs, p.targets)
    ggn = reference.output_ggn(*args, shared)  # [N, 2, 5, 2, 5]
    (x1,), _ = reference.layer_calls(p.model, p.inputs, shared)[0]
    (x2,), _ = reference.layer_calls(p.model, p.inputs, shared)[1]
    n = x1.shape[0]
    expected = {
        "expand": [
            ggn[:, 0, :, 0].sum(0) + ggn[:, 1, :, 1].sum(0),
            (x1.T @ x1 + x2.T @ x2) / (2 * n),
        ],
        "reduce": [ggn.sum((0, 1, 3)), (x1 + x2).T @ (x1 + x2) / (4 * n)],
    }
    for approx, (b, a) in expected.items():
        res = engine.backprop(*args, [engine.KFLR(kfac_approx=approx)])
        got_b, got_a = res["kflr"]["shared.weight"]
        assert_close(got_b, b, f"{approx} B")
        assert_close(got_a, a, f"{approx} A")


def test_extensions_share_columns_and_match_separate_calls():
    """KFLR/KFAC requested with the diagonal extensions give the same results."""
    p = make_problem(MODELS[0], "ce", "mean")
    args = (p.model, p.loss_func, p.inputs, p.targets)
    exts = [
        engine.KFLR(),
        engine.DiagGGNExact(),
        engine.KFAC(mc_samples=3),
        engine.DiagGGNMC(mc_samples=3),
    ]
    together = engine.backprop(*args, exts, generator=torch.Generator().manual_seed(5))
    for ext in exts:
        gen = torch.Generator().manual_seed(5)
        alone = engine.backprop(*args, [ext], generator=gen)
        assert_same_results(alone, together, [ext])


@pytest.mark.parametrize("approx", APPROXES)
def test_chunked_columns_give_the_same_factors(approx):
    p = make_problem(MODELS[-1], "ce", "mean")
    args = (p.model, p.loss_func, p.inputs, p.targets)
    ext = engine.KFLR(kfac_approx=approx)
    full, chunked = (engine.backprop(*args, [ext], chunk_size=c) for c in (None, 2))
    for name, factors in full["kflr"].items():
        for i, (f, g) in enumerate(zip(factors, chunked["kflr"][name], strict=True)):
            assert_close(g, f, f"factor {i} of {name}")


def test_unused_layer_gets_zero_factors():
    class WithUnused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(5, 3), nn.Linear(5, 3)
            self.embed = nn.Embedding(4, 2)

        def forward(self, x):
            return self.used(x)

    model = WithUnused().double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    for approx in APPROXES:
        res = engine.backprop(
            model, nn.CrossEntropyLoss(), x, y, [engine.KFLR(kfac_approx=approx)]
        )["kflr"]
        assert [f.shape for f in res["unused.weight"]] == [(3, 3), (5, 5)]
        assert [f.shape for f in res["unused.bias"]] == [(3, 3)]
        embed_a = (4,) if approx == "expand" else (4, 4)
        assert [f.shape for f in res["embed.weight"]] == [embed_a, (2, 2)]
        for name in ("unused.weight", "unused.bias", "embed.weight"):
            assert not any(f.any() for f in res[name])
        assert res["used.weight"][0].any()


@pytest.mark.parametrize(
    "shape", [(3, 4, 5, 2), (3, 4, 2, 5), (3, 4, 1, 5)], ids=["R>d", "R<d", "R=1"]
)
@pytest.mark.parametrize("layout", ["contiguous", "channel_major"])
def test_sum_outer_paths(monkeypatch, shape, layout):
    """Every strategy of the Gram sum equals the einsum (chunks of one product)."""
    monkeypatch.setattr(kron_stats, "_GRAM_CHUNK", 1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if layout == "channel_major":
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    expected = torch.einsum("abrd,abre->de", x, x)
    assert_close(kron_stats.sum_outer(x), expected, f"{layout} {shape}")


@pytest.mark.parametrize(
    ("rows", "dim"), [(300, 259), (130, 259), (100, 259), (40, 16)]
)
@pytest.mark.parametrize("upcast", [False, True])
def test_gram_from_the_upper_block_triangle(monkeypatch, rows, dim, upcast):
    """Blocked (2 rows >= d >= 256) and plain Gram matrices, chunked or not."""
    monkeypatch.setattr(kron_stats, "_GRAM_CHUNK", 150 * dim)  # upcast in chunks
    gen = torch.Generator().manual_seed(0)
    dtype = torch.float32 if upcast else torch.float64
    x = torch.randn(rows, dim, generator=gen, dtype=dtype)
    expected = x.double().T @ x.double()
    got = kron_stats._gram(x, torch.float64 if upcast else None)
    assert got.dtype == torch.float64
    assert_close(got, expected, f"Gram {rows} x {dim}")
    assert_close(got, got.T, "symmetric")


@pytest.mark.parametrize("kept", [0, 3, 150, 151])
@pytest.mark.parametrize("upcast", [False, True])
def test_gram_of_inputs_with_zero_columns(kept, upcast):
    """Columns that are zero in every row: the Gram of the rest, scattered."""
    gen = torch.Generator().manual_seed(0)
    dtype = torch.float32 if upcast else torch.float64
    x = torch.zeros(20, 300, dtype=dtype)
    columns = torch.randperm(300, generator=gen)[:kept]
    x[:, columns] = torch.randn(20, kept, generator=gen, dtype=dtype)
    expected = x.double().T @ x.double()
    got = kron_stats._gram(x, torch.float64 if upcast else None)
    assert got.dtype == torch.float64
    assert_close(got, expected, f"{kept} nonzero columns")


def test_gram_with_zero_columns_in_reused_memory():
    """A pooled buffer of an earlier Gram is zeroed again, not read stale."""
    gen = torch.Generator().manual_seed(1)
    for start in (0, 200):  # other kept columns in the same (reused) buffer
        x = torch.zeros(20, 400, dtype=torch.float64)  # 400^2 float64: 1.2 MB
        x[:, start : start + 100] = torch.randn(20, 100, generator=gen).double()
        with pool.sweep():
            got = kron_stats._gram(x, None)
        assert_close(got, x.T @ x, f"kept columns from {start}")
        del got  # free: the next Gram may take its memory


@pytest.mark.parametrize("approx", APPROXES)
def test_embedding_factors_from_int32_tokens(approx):
    torch.manual_seed(0)
    embed = nn.Embedding(6, 3, padding_idx=2)
    model = nn.Sequential(embed, nn.Flatten(), nn.Linear(12, 3))
    tokens = torch.randint(0, 6, (5, 4))
    y = torch.randint(0, 3, (5,))
    ext = engine.KFLR(kfac_approx=approx)
    results = [
        engine.backprop(model.double(), nn.CrossEntropyLoss(), t, y, [ext])["kflr"]
        for t in (tokens, tokens.int())
    ]
    for f, g in zip(results[0]["0.weight"], results[1]["0.weight"], strict=True):
        assert_close(g, f, "embedding factor")
    counts = torch.bincount(tokens[tokens != 2].flatten(), minlength=6) / 20
    if approx == "expand":
        assert_close(results[0]["0.weight"][0], counts.double(), "token frequencies")
