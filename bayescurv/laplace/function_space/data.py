"""One forward pass over the training data: the loss, the counts and a subset.

The evidence needs the log likelihood of *all* training data at the MAP, while the
function-space posteriors are built on a subset of the points (the exact GP on
``n_subset`` points, Nyström landmarks, inducing points). :func:`scan` does both in
one pass without Jacobians: it sums the loss and keeps a uniformly random subset
of ``M`` points by reservoir sampling (Vitter's algorithm R, seeded), so any
re-iterable or one-shot loader works and at most ``M`` points are kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bayescurv.laplace.data import BatchReader, batch_size, call_model
from bayescurv.laplace.enums import Likelihood
from bayescurv.laplace.function_space.inputs import concat, take
from bayescurv.laplace.likelihoods import LikelihoodModel


@dataclass(frozen=True)
class Scan:
    """What one pass over the training data found.

    Attributes:
        loss: The summed unit loss at the MAP (regression: per output ``[K]``).
        n_data: ``N``.
        output_shape: The model output's shape per point.
        inputs: The kept points' inputs (every point if no subset was asked for).
        targets: Their targets.
    """

    loss: Tensor
    n_data: int
    output_shape: tuple[int, ...]
    inputs: Any
    targets: Tensor

    @property
    def n_kept(self) -> int:
        """``M``, the number of kept points."""
        return len(self.targets)


class Reservoir:
    """A uniform random subset of ``size`` points of a stream (algorithm R).

    Args:
        size: Points to keep (``None``: all).
        seed: Seed of the choices.
    """

    def __init__(self, size: int | None, seed: int) -> None:
        self.size = size
        self.generator = torch.Generator().manual_seed(seed)
        self.seen = 0
        self._next = 0
        self.slots: list[tuple[int, int]] = []  # (batch, position)
        self.batches: dict[int, tuple[Any, Tensor]] = {}

    def offer(self, inputs: Any, targets: Tensor) -> None:
        """Consider every point of a batch."""
        count, key = len(targets), self._next
        self._next += 1
        self.batches[key] = (inputs, targets)
        index = torch.arange(self.seen, self.seen + count)
        fill = index if self.size is None else index[index < self.size]
        self.slots.extend((key, int(i) - self.seen) for i in fill)
        if self.size is not None and count > len(fill):
            rest = index[len(fill) :]
            draws = torch.rand(len(rest), generator=self.generator, dtype=torch.float64)
            slots = (draws * (rest + 1)).long()  # uniform on 0..index
            accepted = slots < self.size  # in stream order: later draws win
            positions = (rest - self.seen)[accepted].tolist()
            for position, slot in zip(positions, slots[accepted].tolist(), strict=True):
                self.slots[slot] = (key, position)
        self.seen += count
        used = {batch for batch, _ in self.slots}
        self.batches = {k: v for k, v in self.batches.items() if k in used}

    def kept(self) -> tuple[Any, Tensor]:
        """The kept points' inputs and targets (in slot order)."""
        keys = sorted({batch for batch, _ in self.slots})
        parts, order = [], []
        for key in keys:
            positions = [
                (slot, p) for slot, (b, p) in enumerate(self.slots) if b == key
            ]
            index = torch.tensor([p for _, p in positions])
            inputs, targets = self.batches[key]
            parts.append((take(inputs, index), targets[index.to(targets.device)]))
            order.extend(slot for slot, _ in positions)
        inputs = concat([p[0] for p in parts])
        targets = torch.cat([p[1] for p in parts])
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return take(inputs, inverse), targets[inverse.to(targets.device)]


def scan(
    model: nn.Module,
    loader: Iterable,
    reader: BatchReader,
    likelihood: LikelihoodModel,
    dict_key_x: str,
    n_subset: int | None,
    seed: int,
    progress_bar: bool = False,
) -> Scan:
    """Loss, counts and a random subset of ``n_subset`` points (module doc).

    Raises:
        ValueError: For an empty loader, targets that do not fit the likelihood, a
            classification per position (outputs ``[N, C, *T]``), or ``n_subset``
            larger than the data set.
    """
    reservoir = Reservoir(n_subset, seed)
    loss, output_shape = None, ()
    for batch in tqdm(loader, disable=not progress_bar, desc="Laplace.fit (data)"):
        inputs, targets = reader.split(batch)
        with torch.no_grad():
            output = call_model(model, inputs)
        likelihood.check(output, targets)
        if likelihood.kind is Likelihood.CLASSIFICATION and output.ndim > 2:
            raise ValueError(
                "hessian_structure='gp' needs model outputs [N, C]; for a "
                f"classification per position (outputs {list(output.shape)}) use a "
                "weight-space structure."
            )
        terms = likelihood.loss_terms(output, targets)
        loss = terms if loss is None else loss + terms
        output_shape = tuple(output.shape[1:])
        if batch_size(inputs, dict_key_x) != len(targets):
            raise ValueError("every batch needs one target per input.")
        reservoir.offer(inputs, targets)
    if loss is None:
        raise ValueError("Laplace.fit: train_loader yielded no batches.")
    if n_subset is not None and n_subset > reservoir.seen:
        raise ValueError(
            f"n_subset={n_subset} exceeds the {reservoir.seen} training points; pass "
            "n_subset=None (all points) or a smaller number."
        )
    inputs, targets = reservoir.kept()
    return Scan(loss, reservoir.seen, output_shape, inputs, targets)
