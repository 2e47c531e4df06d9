"""Kronecker factors of recurrent layers (NOTE [Kronecker factors of recurrent layers]).

For one datum at one time step every factor product is the exact GGN block. Over
many steps the factors are checked against their definitions: ``B`` of ``reduce`` is
built from the summed pre-activation columns, which are the bias's per-sample vectors,
so it equals the bias's exact GGN block; ``A`` averages the step inputs ``x_t`` and
``h_{t-1}`` of the layer's own (PyTorch) forward.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from bayescurv import engine
from tests.conftest import assert_close
from tests.engine.kron_helpers import ggn_blocks

F64 = torch.float64
IN, HIDDEN, C = 3, 2, 3
CELLS = [nn.RNN, nn.GRU, nn.LSTM]


class Summed(nn.Module):
    """A recurrent layer (batch first, initial state given), summed outputs, a head."""

    def __init__(self, cls: type[nn.Module]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = cls(IN, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, C)
        self.lstm = cls is nn.LSTM

    def state(self, n: int, dtype: torch.dtype) -> Tensor | tuple[Tensor, Tensor]:
        h0 = torch.linspace(-0.5, 0.5, HIDDEN, dtype=dtype).expand(1, n, -1)
        return (h0, 0.5 * h0) if self.lstm else h0

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x, self.state(x.shape[0], x.dtype))
        return self.head(out.sum(1))


@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
def test_exact_for_one_datum_at_one_step(cls):
    model = Summed(cls).double()
    x = torch.randn(1, 1, IN, dtype=F64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([2])
    loss = nn.CrossEntropyLoss(reduction="sum")
    factors = engine.backprop(model, loss, x, y, [engine.KFLR()])["kflr"]
    blocks = ggn_blocks(model, loss, x, y)
    for name, fs in factors.items():
        assert_close(engine.kron_dense(fs), blocks[name], name)


@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
def test_factors_match_their_definitions_over_steps(cls):
    model = Summed(cls).double()
    gen = torch.Generator().manual_seed(2)
    n = 4
    x = torch.randn(n, 5, IN, dtype=F64, generator=gen)
    y = torch.randint(0, C, (n,), generator=gen)
    loss = nn.CrossEntropyLoss()
    res = {
        approx: engine.backprop(model, loss, x, y, [engine.KFLR(kfac_approx=approx)])
        for approx in ("expand", "reduce")
    }
    blocks = ggn_blocks(model, loss, x, y)
    with torch.no_grad():  # h_{t-1}: the initial state, then the outputs
        state = model.state(n, F64)
        out, _ = model.rnn(x, state)
    h0 = state[0] if isinstance(state, tuple) else state
    h_prev = torch.cat([h0[0][:, None], out[:, :-1]], dim=1)
    for suffix, inputs in (("ih", x), ("hh", h_prev)):
        name = f"rnn.weight_{suffix}_l0"
        b_reduce, a_reduce = res["reduce"]["kflr"][name]
        assert_close(b_reduce, blocks[f"rnn.bias_{suffix}_l0"], f"B reduce {name}")
        mean = inputs.mean(1)
        assert_close(a_reduce, mean.T @ mean / n, f"A reduce {name}")
        flat = inputs.reshape(-1, inputs.shape[-1])
        a_expand = res["expand"]["kflr"][name][1]
        assert_close(a_expand, flat.T @ flat / flat.shape[0], f"A expand {name}")
