"""``fit``: one pass over the data at the MAP, producing a new :class:`FittedState`.

Nothing outside this function changes while it runs: the builder accumulates into
private sums (copies of the previous state's for ``override=False``), and the new
state is returned only when everything succeeded. An exception or a
``KeyboardInterrupt`` in the middle leaves the caller's previous state as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from bayescurv.laplace import hyper
from bayescurv.laplace.data import BatchReader, batch_size
from bayescurv.laplace.enums import HessianStructure, Likelihood
from bayescurv.laplace.likelihoods import LikelihoodModel
from bayescurv.laplace.sources import CurvatureSource, StructureBuilder, make_builder
from bayescurv.laplace.state import FittedState

SourceFactory = Callable[[LikelihoodModel, Any], CurvatureSource]
"""``make_source(likelihood, first_inputs)``: the subset's source for a fit."""


@dataclass(frozen=True)
class FitPlan:
    """What a fit computes (the posterior's configuration, no data).

    Attributes:
        likelihood: The likelihood kind.
        structure: The Hessian structure.
        make_source: Builds the subset's source from the first batch's inputs.
        reader: Turns loader batches into ``(inputs, targets)`` on the device.
        dict_key_x: Input key of dict batches (counts the samples).
        rank: Eigenpairs of ``lowrank``.
        generator: Randomness of ``lowrank``'s subspace iteration.
    """

    likelihood: Likelihood
    structure: HessianStructure
    make_source: SourceFactory
    reader: BatchReader
    dict_key_x: str
    rank: int
    generator: torch.Generator | None = None


class _Batches:
    """A re-iterable view of a loader as ``(inputs, targets)`` on the device."""

    def __init__(self, loader: Iterable, reader: BatchReader) -> None:
        self.loader, self.reader = loader, reader

    def __iter__(self) -> Iterator[tuple[Any, Tensor]]:
        return self.reader.batches(self.loader)


def fit_state(
    plan: FitPlan,
    loader: Iterable,
    sigma_noise: Tensor,
    previous: FittedState | None = None,
    progress_bar: bool = False,
) -> FittedState:
    """Accumulate the curvature and the loss over ``loader`` (see the module doc).

    Args:
        plan: The posterior's configuration.
        loader: Batches ``(x, y)`` or dicts (re-iterable for ``lowrank``).
        sigma_noise: The current noise (its per-output ratios enter the curvature).
        previous: A state to add to (``fit(override=False)``), else ``None``.
        progress_bar: Show a tqdm progress bar.

    Returns:
        The new state.

    Raises:
        ValueError: For an empty loader, a one-shot iterator with ``lowrank``,
            ``override=False`` with a structure that cannot add, targets that do
            not fit the likelihood, or NaN/inf curvature.
    """
    _check_loader(plan, loader, previous)
    builder, source, likelihood = _start(plan, previous, sigma_noise)
    loss = None if previous is None else previous.loss.clone()
    n_outputs, count = 0, 0
    for index, batch in enumerate(
        tqdm(loader, disable=not progress_bar, desc="Laplace.fit")
    ):
        inputs, targets = plan.reader.split(batch)
        if builder is None:
            source = plan.make_source(likelihood, inputs)
            builder = make_builder(plan.structure, source, plan.rank, plan.generator)
        n = batch_size(inputs, plan.dict_key_x)
        output = builder.step(inputs, targets, n, index)
        terms = likelihood.loss_terms(output, targets)
        loss = terms if loss is None else loss + terms
        n_outputs = output[0].numel()
        count += 1
    if count == 0:
        raise ValueError("Laplace.fit: train_loader yielded no batches.")
    hyper.sigma_noise(sigma_noise, loss, n_outputs)  # per-output size check
    curvature = builder.finish(_Batches(loader, plan.reader))
    return FittedState(
        source=source,
        curvature=curvature,
        sums=builder.sums() if builder.supports_accumulation else None,
        mean=source.parameter_vector(),
        loss=loss,
        n_data=builder.n_data,
        n_outputs=n_outputs,
        likelihood=likelihood,
        sigma_fit=sigma_noise if previous is None else previous.sigma_fit,
    )


def _check_loader(
    plan: FitPlan, loader: Iterable, previous: FittedState | None
) -> None:
    if plan.structure is HessianStructure.LOWRANK and iter(loader) is loader:
        raise ValueError(
            "hessian_structure='lowrank' needs a re-iterable train_loader (a "
            "DataLoader or a list), not a one-shot iterator."
        )
    if previous is not None and previous.sums is None:
        raise ValueError(
            f"hessian_structure='{plan.structure.value}' cannot add to an earlier "
            "fit (override=False): its eigenpairs need all data at once."
        )


def _start(
    plan: FitPlan, previous: FittedState | None, sigma_noise: Tensor
) -> tuple[StructureBuilder | None, CurvatureSource | None, LikelihoodModel]:
    """The builder, source and likelihood a fit starts from."""
    if previous is None:
        weights = None
        if sigma_noise.ndim == 1:  # see likelihoods: per-output weights
            weights = (sigma_noise[0] / sigma_noise).square().detach()
        return None, None, LikelihoodModel(plan.likelihood, weights)
    builder = make_builder(plan.structure, previous.source, plan.rank, plan.generator)
    builder.resume(previous.sums)
    return builder, previous.source, previous.likelihood
