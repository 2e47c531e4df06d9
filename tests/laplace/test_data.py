"""Batch helpers: the first example of a batch, and naming the last layer with it."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bayescurv.laplace.data import first_example
from bayescurv.laplace.sources.last_layer import find_last_layer


def test_first_example_of_tensors_tuples_and_dicts():
    x, mask = torch.randn(4, 3), torch.ones(4, 3)
    assert torch.equal(first_example(x), x[:1])
    pair = first_example((x, mask))
    assert isinstance(pair, tuple)
    assert torch.equal(pair[0], x[:1])
    assert torch.equal(pair[1], mask[:1])
    table = torch.randn(7, 2)  # not batched: another leading size
    batch = first_example({"input_ids": x, "table": table, "flag": True})
    assert torch.equal(batch["input_ids"], x[:1])
    assert batch["table"] is table
    assert batch["flag"] is True


def test_the_last_layer_is_found_on_one_example():
    sizes: list[int] = []

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, batch: dict[str, Tensor]) -> Tensor:
            sizes.append(len(batch["input_ids"]))
            return self.head(torch.tanh(self.body(batch["input_ids"])))

    name = find_last_layer(Model(), {"input_ids": torch.randn(16, 3)})
    assert name == "head"
    assert sizes == [1]
