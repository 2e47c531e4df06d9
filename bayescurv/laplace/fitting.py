"""The fit loop: one pass over the data at the MAP, kept atomic on errors."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from torch import Tensor
from tqdm.auto import tqdm

from bayescurv.laplace import hyper
from bayescurv.laplace.data import BatchReader, batch_size
from bayescurv.laplace.enums import HessianStructure
from bayescurv.laplace.likelihoods import LikelihoodModel
from bayescurv.laplace.structures import StructureBuilder, make_builder

if TYPE_CHECKING:
    from bayescurv.laplace.posterior import BaseLaplace


class Data:
    """A re-iterable view of a loader as ``(inputs, targets)`` on the device."""

    def __init__(self, loader: Iterable, reader: BatchReader) -> None:
        self.loader, self.reader = loader, reader

    def __iter__(self) -> Iterator[tuple[Any, Tensor]]:
        return self.reader.batches(self.loader)


def fit(la: BaseLaplace, loader: Iterable, override: bool, progress_bar: bool) -> None:
    """See :meth:`BaseLaplace.fit`; on an error the earlier state is restored."""
    la.model.eval()
    builder, snapshot = None, None
    if not override and la._builder is not None:
        if not la._builder.supports_accumulation:
            raise ValueError(
                f"hessian_structure='{la.hessian_structure.value}' cannot add to an "
                "earlier fit (override=False): its eigenpairs need all data at once."
            )
        builder = la._builder
        snapshot = copy.deepcopy(builder.state_dict())  # totals grow in place
    saved = (la.loss, la.n_data, la.n_outputs, la._lik, la._sigma_fit)
    try:
        if builder is None:
            _start(la)
        builder = _accumulate(la, loader, builder, progress_bar)
        curvature = builder.finish(Data(loader, la._reader))
    except Exception:
        la.loss, la.n_data, la.n_outputs, la._lik, la._sigma_fit = saved
        la.source.likelihood = la._lik
        if snapshot is not None:
            la._builder.load_state_dict(snapshot)
        raise
    la._builder, la._H = builder, curvature
    la.mean = la.source.parameter_vector()
    la._posterior = None
    la.prior_precision = la.prior_precision  # validated against the fitted sizes
    la.prior_mean = la.prior_mean


def _start(la: BaseLaplace) -> None:
    """Reset the accumulated loss and bake a per-output noise into the likelihood."""
    la.loss, la.n_data, la.n_outputs = la._like.new_zeros(()), 0, 0
    sigma = la.sigma_noise
    weights = None if sigma.ndim == 0 else (sigma[0] / sigma).square()
    la._lik = LikelihoodModel(la.likelihood, weights)
    la.source.likelihood = la._lik
    la._sigma_fit = None


def _accumulate(
    la: BaseLaplace,
    loader: Iterable,
    builder: StructureBuilder | None,
    progress_bar: bool,
) -> StructureBuilder:
    if builder is None and la.hessian_structure is HessianStructure.LOWRANK:
        if iter(loader) is loader:
            raise ValueError(
                "hessian_structure='lowrank' needs a re-iterable train_loader (a "
                "DataLoader or a list), not a one-shot iterator."
            )
    reader, count = la._reader, 0
    for index, batch in enumerate(
        tqdm(loader, disable=not progress_bar, desc="Laplace.fit")
    ):
        inputs, targets = reader.split(batch)
        if builder is None:
            la._prepare(inputs)
            builder = make_builder(la.hessian_structure, la.source, la.rank)
        n = batch_size(inputs, la.dict_key_x)
        output = builder.step(inputs, targets, n, index)
        la.loss = la.loss + la._lik.loss_terms(output, targets)
        la.n_outputs = output[0].numel()
        count += 1
    if count == 0:
        raise ValueError(f"{type(la).__name__}.fit: train_loader yielded no batches.")
    la.n_data = builder.n_data
    hyper.sigma_noise(la.sigma_noise, la._like, la.n_outputs)
    la._sigma_fit = la.sigma_noise
    return builder
