"""``fit``: one pass over the data at the MAP, producing a new :class:`FittedState`.

Nothing outside this function changes while it runs: the builder accumulates the new
data into private sums (the previous state's sums are added to a copy afterwards for
``override=False``), and the new state is returned only when everything succeeded.
An exception or a ``KeyboardInterrupt`` in the middle leaves the caller's previous
state as it was. Under ``torch.distributed`` the new sums are reduced over the ranks
before anything else (:mod:`bayescurv.laplace.distributed`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from bayescurv.engine.memory import check_estimates
from bayescurv.engine.pool import release_pool
from bayescurv.laplace import hyper
from bayescurv.laplace.data import BatchReader, batch_size
from bayescurv.laplace.distributed import Communicator
from bayescurv.laplace.enums import HessianStructure, Likelihood
from bayescurv.laplace.likelihoods import LikelihoodModel
from bayescurv.laplace.sources import CurvatureSource, StructureBuilder, make_builder
from bayescurv.laplace.sources.builders import structure_estimate
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
        max_memory: Bytes the structure may take (``None``: the engine's default,
            a share of the available memory); checked before allocating.
    """

    likelihood: Likelihood
    structure: HessianStructure
    make_source: SourceFactory
    reader: BatchReader
    dict_key_x: str
    rank: int
    generator: torch.Generator | None = None
    max_memory: int | None = None


class _Batches:
    """A re-iterable view of a loader as ``(inputs, targets)`` on the device."""

    def __init__(self, loader: Iterable, reader: BatchReader) -> None:
        self.loader, self.reader = loader, reader

    def __iter__(self) -> Iterator[tuple[Any, Tensor]]:
        return self.reader.batches(self.loader)


# NOTE [The fit hands back the engine's pooled memory]
# The engine keeps the memory of large results and temporaries for its next calls
# (NOTE [Reusing result memory] in bayescurv.engine.pool). A fit's data pass leaves
# buffers the size of its per-batch curvature (three 170 MB zero-padded Kronecker
# factors for a ResNet-18) that no prediction reuses: they are released when the
# pass ends, before the decompositions and the evidence allocate theirs.
def fit_state(
    plan: FitPlan,
    loader: Iterable,
    sigma_noise: Tensor,
    previous: FittedState | None = None,
    progress_bar: bool = False,
    comm: Communicator | None = None,
) -> FittedState:
    """Accumulate the curvature and the loss over ``loader`` (see the module doc).

    Args:
        plan: The posterior's configuration.
        loader: Batches ``(x, y)`` or dicts (re-iterable for ``lowrank``); with
            ``comm``, this rank's shard.
        sigma_noise: The current noise (its per-output ratios enter the curvature).
        previous: A state to add to (``fit(override=False)``), else ``None``.
        progress_bar: Show a tqdm progress bar.
        comm: Reduce the sums over these processes (:mod:`.distributed`).

    Returns:
        The new state (the same on every rank with ``comm``).

    Raises:
        ValueError: For an empty loader, a one-shot iterator with ``lowrank``,
            ``override=False`` with a structure that cannot add, inputs or targets
            that fail the checks of :mod:`.boundary`, or NaN/inf curvature.
        TypeError: For inputs or targets that are not tensors.
        DistributedFitError: If the ranks disagree (see :mod:`.distributed`).
        MemoryBudgetError: If the structure would not fit in ``max_memory`` (before
            anything is allocated).
    """
    _check_loader(plan, loader, previous)
    generator = plan.generator
    if comm is not None and generator is None:  # the same random start everywhere
        generator = torch.Generator().manual_seed(0)
    source = None if previous is None else previous.source
    likelihood = _likelihood(plan, previous, sigma_noise)
    builder, loss, output_shape, count = None, None, (), 0
    # batches without samples are skipped (NOTE on ignore_index in boundary), and so
    # are a padding DistributedSampler's repeats (NOTE in .data)
    bar = functools.partial(tqdm, disable=not progress_bar, desc="Laplace.fit")
    for index, (inputs, targets) in plan.reader.indexed(loader, wrap=bar):
        if builder is None:
            source = source or plan.make_source(likelihood, inputs)
            estimate = structure_estimate(plan.structure, source, plan.rank)
            check_estimates(
                [estimate], plan.max_memory, source.parameter_vector().device
            )
            builder = make_builder(plan.structure, source, plan.rank, generator)
        n = batch_size(inputs, plan.dict_key_x)
        output = builder.step(inputs, targets, n, index)
        terms = likelihood.loss_terms(output, targets)
        loss = terms if loss is None else loss + terms
        output_shape = tuple(output.shape[1:])
        count += 1
    release_pool()  # see NOTE [The fit hands back the engine's pooled memory]
    if comm is not None:
        total = comm.handshake(count, builder.n_data if builder else 0, _numel(builder))
        comm.all_reduce([*builder.accumulators(), loss])
        builder.n_data = total
    elif count == 0:
        raise ValueError(
            "Laplace.fit: train_loader yielded no batches with samples (empty "
            "batches and samples whose class target is -100 are skipped)."
        )
    if previous is not None:  # after the reduction: the previous sums are global
        builder.absorb(previous.sums)
        loss = loss + previous.loss
    n_outputs = math.prod(output_shape)
    hyper.sigma_noise(sigma_noise, loss, n_outputs)  # per-output size check
    reduce = None if comm is None else comm.reduced_products
    curvature = builder.finish(_Batches(loader, plan.reader), reduce)
    return FittedState(
        source=source,
        curvature=curvature,
        sums=builder.sums() if builder.supports_accumulation else None,
        mean=source.parameter_vector(),
        loss=loss,
        n_data=builder.n_data,
        n_outputs=n_outputs,
        output_shape=output_shape,
        likelihood=likelihood,
        sigma_fit=sigma_noise if previous is None else previous.sigma_fit,
    )


def _numel(builder: StructureBuilder | None) -> int:
    if builder is None:
        return 0
    return sum(t.numel() for t in builder.accumulators())


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


def _likelihood(
    plan: FitPlan, previous: FittedState | None, sigma_noise: Tensor
) -> LikelihoodModel:
    """The likelihood of a fit: the previous one, or with the noise's ratios."""
    if previous is not None:
        return previous.likelihood
    weights = None
    if sigma_noise.ndim == 1:  # see likelihoods: per-output weights
        weights = (sigma_noise[0] / sigma_noise).square().detach()
    return LikelihoodModel(plan.likelihood, weights)
