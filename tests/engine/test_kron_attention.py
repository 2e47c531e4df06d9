"""Kronecker factors of attention (NOTE [Kronecker factors of attention]).

Every projection is a linear layer over positions, so the factors must equal those of
the same attention written with ``nn.Linear`` projections (whose factors are tested
against the dense references in ``test_kron.py``); for one datum at one position they
are the exact GGN blocks (for grouped ``in_proj_weight``: the q, k, v diagonal blocks).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayescurv import engine
from tests.conftest import assert_close
from tests.engine.kron_helpers import APPROXES, ggn_blocks

E, H, C = 4, 2, 3


class Attend(nn.Module):
    """``MultiheadAttention`` (batch first) on ``x`` and (cross) ``context``, pooled."""

    def __init__(self, cross: bool, kdim: int | None = None) -> None:
        super().__init__()
        self.cross = cross
        self.attn = nn.MultiheadAttention(E, H, batch_first=True, kdim=kdim, vdim=kdim)
        self.context = nn.Linear(E, kdim or E)
        self.head = nn.Linear(E, C)

    def forward(self, x: Tensor) -> Tensor:
        context = self.context(x) if self.cross else x
        return self.head(self.attn(x, context, context, need_weights=False)[0].mean(1))


class Unfused(nn.Module):
    """The same function with ``nn.Linear`` projections and ``F.sdpa``."""

    def __init__(self, model: Attend) -> None:
        super().__init__()
        attn = model.attn
        self.cross, self.context, self.head = model.cross, model.context, model.head
        self.q, self.k, self.v = (nn.Linear(E, E) for _ in range(3))
        for lin, w, b in zip(
            (self.q, self.k, self.v),
            attn.in_proj_weight.detach().chunk(3),
            attn.in_proj_bias.detach().chunk(3),
            strict=True,
        ):
            lin.weight.data, lin.bias.data = w.clone(), b.clone()
        self.out = nn.Linear(E, E).double()
        self.out.load_state_dict(attn.out_proj.state_dict())

    def forward(self, x: Tensor) -> Tensor:
        context = self.context(x) if self.cross else x

        def heads(t: Tensor) -> Tensor:
            return t.reshape(*t.shape[:2], H, E // H).transpose(1, 2)

        o = F.scaled_dot_product_attention(
            heads(self.q(x)), heads(self.k(context)), heads(self.v(context))
        )
        return self.head(self.out(o.transpose(1, 2).reshape(x.shape)).mean(1))


def _problem(cross: bool, positions: int, batch: int = 5):
    torch.manual_seed(0)
    model = Attend(cross).double().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, positions, E, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (batch,), generator=gen)
    return model, x, y


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("approx", APPROXES)
def test_factors_equal_those_of_linear_projections(cross: bool, approx: str):
    model, x, y = _problem(cross, positions=3)
    loss = nn.CrossEntropyLoss()
    ext = [engine.KFLR(kfac_approx=approx)]
    ours = engine.backprop(model, loss, x, y, ext)["kflr"]
    linear = engine.backprop(Unfused(model).double(), loss, x, y, ext)["kflr"]
    assert_close(ours["attn.out_proj.weight"][0], linear["out.weight"][0], "out B")
    assert_close(ours["attn.out_proj.weight"][1], linear["out.weight"][1], "out A")
    assert_close(ours["attn.out_proj.bias"][0], linear["out.bias"][0], "out bias")
    b, a = ours["attn.in_proj_weight"]
    if cross:  # three blocks: [3, E, E] each
        for i, name in enumerate("qkv"):
            assert_close(b[i], linear[f"{name}.weight"][0], f"{name} B")
            assert_close(a[i], linear[f"{name}.weight"][1], f"{name} A")
    else:  # one product over [q, k, v]: A of any of them, B's diagonal blocks
        assert b.shape == (3 * E, 3 * E)
        for i, name in enumerate("qkv"):
            rows = slice(i * E, (i + 1) * E)
            assert_close(b[rows, rows], linear[f"{name}.weight"][0], f"{name} B")
            assert_close(a, linear[f"{name}.weight"][1], f"{name} A")


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_exact_for_one_datum_at_one_position(cross: bool):
    model, x, y = _problem(cross, positions=1, batch=1)
    loss = nn.CrossEntropyLoss(reduction="sum")
    factors = engine.backprop(model, loss, x, y, [engine.KFLR()])["kflr"]
    blocks = ggn_blocks(model, loss, x, y)
    for name in ("attn.in_proj_weight", "attn.out_proj.weight", "attn.in_proj_bias"):
        dense, exact = engine.kron_dense(factors[name]), blocks[name]
        if factors[name][0].dim() == 3:  # q, k, v blocks only
            size = exact.shape[0] // 3
            exact = torch.block_diag(
                *(
                    exact[i * size : (i + 1) * size, i * size : (i + 1) * size]
                    for i in range(3)
                )
            )
        assert_close(dense, exact, name)


def test_separate_projections_and_bias_kv():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(E, H, kdim=3, vdim=5, add_bias_kv=True).double()
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 1, E, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 1, 3, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 1, 5, generator=gen, dtype=torch.float64)

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = attn

        def forward(self, x: Tensor) -> Tensor:
            return self.attn(x, k, v, need_weights=False)[0][0]

    loss = nn.MSELoss(reduction="sum")
    y = torch.randn(1, E, generator=gen, dtype=torch.float64)
    factors = engine.backprop(Wrap(), loss, q, y, [engine.KFLR()])["kflr"]
    blocks = ggn_blocks(Wrap(), loss, q, y)
    assert factors["attn.bias_k"][0].shape == (E, E)
    for name, fs in factors.items():  # one datum, one position: all exact
        assert_close(engine.kron_dense(fs), blocks[name], name)


def test_cross_attention_of_different_lengths_raises():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(E, H, batch_first=True).double()
    memory = torch.randn(4, 6, E, dtype=torch.float64)

    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = attn

        def forward(self, x: Tensor) -> Tensor:
            return self.attn(x, memory, memory, need_weights=False)[0].mean(1)

    x, y = (
        torch.randn(4, 2, E, dtype=torch.float64),
        torch.randn(4, E, dtype=torch.float64),
    )
    with pytest.raises(NotImplementedError, match="2 query and 6 key/value positions"):
        engine.backprop(Cross(), nn.MSELoss(), x, y, [engine.KFLR()])
    res = engine.backprop(
        Cross(), nn.MSELoss(), x, y, [engine.KFLR()], params=["attn.out_proj.weight"]
    )
    assert res["kflr"]["attn.out_proj.weight"][0].shape == (E, E)
