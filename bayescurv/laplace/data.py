"""Batches from data loaders: tuple or dict batches, moved to the model's device."""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data.distributed import DistributedSampler

from bayescurv.laplace import boundary
from bayescurv.laplace.enums import Likelihood


class MissingKeyError(KeyError, ValueError):
    """A dict batch lacks ``dict_key_x`` or ``dict_key_y``.

    A ``KeyError`` as in laplace-torch, and a ``ValueError`` like every other bad
    batch.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class BatchReader:
    """Reads ``(inputs, targets)`` from tuple or dict batches, checked.

    Every batch and every predictive input passes the checks of
    :mod:`bayescurv.laplace.boundary` here, once, before any model call.

    Args:
        dict_key_x: Key of the inputs in dict batches (e.g. Hugging Face style).
        dict_key_y: Key of the targets in dict batches.
        device: Where batches are moved.
        likelihood: The likelihood whose targets :meth:`split` checks (``None``:
            targets are not checked, samples with target -100 are kept).
        dtype: The model's floating dtype; floating inputs must have it (``None``:
            not checked).
    """

    def __init__(
        self,
        dict_key_x: str,
        dict_key_y: str,
        device: torch.device,
        likelihood: Likelihood | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.dict_key_x = dict_key_x
        self.dict_key_y = dict_key_y
        self.device = device
        self.likelihood = likelihood
        self.dtype = dtype

    def inputs(
        self, batch: Any, name: str = "x"
    ) -> Tensor | tuple[Tensor, ...] | Mapping:
        """The inputs of a batch, or a bare input (tensor, dict), on the device.

        Raises:
            TypeError: For inputs that are not tensors (NumPy arrays, lists).
            ValueError: For meta tensors, no samples, NaN or inf.
        """
        boundary.check_inputs(batch, name, dtype=self.dtype)
        return self._moved(batch)

    def _moved(self, inputs: Any) -> Any:
        if isinstance(inputs, Mapping):
            return {k: _to(v, self.device) for k, v in inputs.items()}
        return _to(inputs, self.device)

    def split(self, batch: Any, name: str = "batch") -> tuple[Any, Tensor] | None:
        """``(inputs, targets)`` of one batch, on the device, checked.

        Args:
            batch: An ``(x, y)`` pair or a dict with ``dict_key_x`` and
                ``dict_key_y``.
            name: How errors name the batch (e.g. ``"train_loader batch 3"``).

        Returns:
            The pair, or ``None`` for a batch without samples (empty, or only
            targets equal to -100 under a classification likelihood; see the NOTE
            on ignore_index in :mod:`.boundary`).

        Raises:
            MissingKeyError: If a dict batch lacks ``dict_key_x`` or ``dict_key_y``.
            ValueError: If the batch is neither an ``(x, y)`` pair nor a dict, or
                its inputs or targets fail the checks of :mod:`.boundary`.
            TypeError: For inputs or targets that are not tensors.
        """
        if isinstance(batch, Mapping):
            missing = [k for k in (self.dict_key_x, self.dict_key_y) if k not in batch]
            if missing:
                raise MissingKeyError(
                    f"dict batch lacks the keys {missing} (dict_key_x="
                    f"{self.dict_key_x!r}, dict_key_y={self.dict_key_y!r}); got keys "
                    f"{sorted(batch)}."
                )
            # as laplace-torch: the whole dict goes to the model
            inputs, targets = batch, batch[self.dict_key_y]
        elif not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(
                f"{name}: each batch must be an (inputs, targets) pair or a dict, "
                f"got {type(batch).__name__}."
            )
        else:
            inputs, targets = batch
        return self._checked(inputs, targets, name)

    def _checked(
        self, inputs: Any, targets: Any, name: str
    ) -> tuple[Any, Tensor] | None:
        """The pair on the device after the checks (``None`` if no samples left)."""
        if self.likelihood is None:
            return self.inputs(inputs, f"{name}: inputs"), _to(targets, self.device)
        boundary.check_inputs(inputs, f"{name}: inputs", True, self.dtype)
        boundary.check_targets(targets, self.likelihood, f"{name}: targets")
        boundary.check_lengths(batch_size(inputs, self.dict_key_x), targets, name)
        if self.likelihood is Likelihood.CLASSIFICATION:
            inputs, targets = boundary.drop_ignored(inputs, targets)
        if len(targets) == 0:
            return None
        return self._moved(inputs), _to(targets, self.device)

    def batches(
        self,
        loader: Iterable,
        name: str = "train_loader",
        wrap: Callable[[Iterable], Iterable] | None = None,
    ) -> Iterator[tuple[Any, Tensor]]:
        """``(inputs, targets)`` of every batch of a loader with samples.

        A padding ``DistributedSampler``'s repeats are cut off (NOTE [A
        DistributedSampler's repeats]); ``wrap`` (e.g. a progress bar) wraps the
        loader's iteration.
        """
        for _, pair in self.indexed(loader, name, wrap):
            yield pair

    def indexed(
        self,
        loader: Iterable,
        name: str = "train_loader",
        wrap: Callable[[Iterable], Iterable] | None = None,
    ) -> Iterator[tuple[int, tuple[Any, Tensor]]]:
        """As :meth:`batches`, each pair with the index of its loader batch."""
        cut = _Distinct(loader, self.dict_key_x)
        for index, raw in enumerate(loader if wrap is None else wrap(loader)):
            batch = cut(raw)
            if batch is REPEATS_ONLY:
                continue
            pair = self.split(batch, f"{name} batch {index}")
            if pair is not None:
                yield index, pair


# NOTE [A DistributedSampler's repeats]
# With drop_last=False (its default) torch's DistributedSampler repeats the first
# total_size - len(dataset) indices of its (shuffled) order so that every rank draws
# the same number: rank r draws positions r, r + W, r + 2W, ... of the padded list,
# and those at len(dataset) or beyond are repeats, always the last ones a rank
# draws. Counted, they would enter the curvature, the loss and n_data twice. A
# DataLoader that batches this sampler in its order therefore stops after this
# rank's len(range(r, len(dataset), W)) distinct samples, so that the ranks
# together see every point once, as a single-process fit does.
def distinct_samples(loader: Iterable) -> int | None:
    """This rank's samples before a padding ``DistributedSampler``'s repeats.

    ``None`` unless ``loader`` is a ``DataLoader`` batching a ``DistributedSampler``
    (``drop_last=False``) whose dataset does not split evenly over the ranks.
    """
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return None
    batches = getattr(loader, "batch_sampler", None)
    if getattr(batches, "sampler", None) is not sampler:
        return None
    size = len(sampler.dataset)
    if sampler.total_size <= size:
        return None
    return len(range(sampler.rank, size, sampler.num_replicas))


REPEATS_ONLY = object()
"""What :class:`_Distinct` returns for a batch of repeats only (a loader's own
``None`` batch is passed on, for :meth:`BatchReader.split` to refuse)."""


class _Distinct:
    """Cuts a padding ``DistributedSampler``'s repeats off a loader's batches.

    See NOTE [A DistributedSampler's repeats]; a no-op for any other loader.
    """

    def __init__(self, loader: Iterable, dict_key_x: str) -> None:
        self.limit, self.seen, self.key = distinct_samples(loader), 0, dict_key_x

    def __call__(self, batch: Any) -> Any:
        """The loader's batch cut before the repeats, ``REPEATS_ONLY`` if none are left.

        Counts every sample the loader yields, before samples whose target is
        ignored are dropped; a batch that is neither a pair nor a dict with the
        inputs' key is passed on for :meth:`BatchReader.split` to name its problem.
        """
        if self.limit is None:
            return batch
        if isinstance(batch, Mapping) and self.key in batch:
            size = batch_size(batch, self.key)
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            size = batch_size(batch[0], self.key)
        else:
            return batch
        keep = min(size, self.limit - self.seen)
        self.seen += size
        if keep <= 0:
            return REPEATS_ONLY
        if keep == size:
            return batch
        if isinstance(batch, Mapping):
            return first_examples(batch, keep)
        return first_examples(batch[0], keep), batch[1][:keep]


class ModelCallError(ValueError):
    """The model raised on the inputs it was given (their shape, dtype or type).

    The model's own exception is chained (``__cause__``); the error is also an
    instance of its kind (``RuntimeError``, ``TypeError`` or ``IndexError``), so
    code that caught the model's error still catches it.
    """


class _ModelRuntimeError(ModelCallError, RuntimeError):
    pass


class _ModelTypeError(ModelCallError, TypeError):
    pass


class _ModelIndexError(ModelCallError, IndexError):
    pass


_KINDS = {
    RuntimeError: _ModelRuntimeError,
    TypeError: _ModelTypeError,
    IndexError: _ModelIndexError,
}


def call_model(model: torch.nn.Module, inputs: Any) -> Tensor:
    """``model(inputs)`` for a tensor or dict, ``model(*inputs)`` for a tuple.

    Dict inputs are passed whole (``model(batch_dict)``), as laplace-torch does.

    Raises:
        ModelCallError: If the model raises a torch error on ``inputs``.
    """
    with model_errors(inputs):
        if isinstance(inputs, (tuple, list)):
            return model(*inputs)
        return model(inputs)


# NOTE [Errors of the model call]
# A model called on inputs it cannot take (a wrong feature count, integer inputs to a
# float model, a dict for a tensor model, no batch axis) fails deep inside torch with
# "mat1 and mat2 shapes cannot be multiplied". Laplace cannot know the shapes a model
# takes, so it re-raises such errors, naming what the model was given and chaining the
# original; errors raised by bayescurv itself (e.g. from the engine's hooks) pass
# through unchanged.
@contextmanager
def model_errors(inputs: Any) -> Iterator[None]:
    """Re-raise torch's errors of a model call as :class:`ModelCallError`."""
    try:
        yield
    except (RuntimeError, TypeError, IndexError) as error:
        if _raised_by_bayescurv(error):
            raise
        kind = next(k for k in _KINDS if isinstance(error, k))
        text = str(error).rstrip()
        text += "" if text.endswith(".") else "."
        raise _KINDS[kind](
            f"the model raised {type(error).__name__} on inputs {describe(inputs)}: "
            f"{text} Pass inputs with the samples on the leading axis and the "
            "per-sample shape and dtype the model takes (those of the training "
            "inputs)."
        ) from error


def _raised_by_bayescurv(error: BaseException) -> bool:
    if type(error).__module__.startswith("bayescurv"):
        return True
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and frames[-1].filename.startswith(_PACKAGE)


_PACKAGE = str(Path(__file__).resolve().parents[1])


def describe(inputs: Any) -> str:
    """Shapes and dtypes of inputs, e.g. ``Tensor[4, 5] float64``."""
    if isinstance(inputs, Tensor):
        return f"Tensor{list(inputs.shape)} {str(inputs.dtype).removeprefix('torch.')}"
    if isinstance(inputs, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in inputs.items()) + "}"
    if isinstance(inputs, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in inputs) + ")"
    return type(inputs).__name__


def batch_size(inputs: Any, dict_key_x: str) -> int:
    """Number of samples of an input (tensor, tuple of tensors, or dict)."""
    if isinstance(inputs, Mapping):
        return len(inputs[dict_key_x])
    if isinstance(inputs, (tuple, list)):
        return len(inputs[0])
    return len(inputs)


def first_example(inputs: Any) -> Any:
    """The first example of a batch (tensor, tuple/list of tensors, or dict).

    Tensors whose leading size is the batch's are cut to length one; other values
    (non-tensors, tensors of another length) are kept as they are.
    """
    return first_examples(inputs, 1)


def first_examples(inputs: Any, count: int) -> Any:
    """The first ``count`` examples of a batch, cut as :func:`first_example` cuts."""
    if isinstance(inputs, Tensor):
        return inputs[:count]
    values = list(inputs.values()) if isinstance(inputs, Mapping) else list(inputs)
    size = next((len(v) for v in values if isinstance(v, Tensor) and v.dim()), None)

    def cut(value: Any) -> Any:
        batched = isinstance(value, Tensor) and value.dim() and len(value) == size
        return value[:count] if batched else value

    if isinstance(inputs, Mapping):
        return {key: cut(value) for key, value in inputs.items()}
    return type(inputs)(cut(value) for value in inputs)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    return value


class EngineModel(torch.nn.Module):
    """A parameter-free adapter that lets the engine call any model.

    The engine calls ``model(*tensors)``; this adapter rebuilds dict inputs from
    positional tensors and optionally scales the output (per-output regression
    weights, :meth:`LikelihoodModel.output_scale`).

    Args:
        model: The wrapped model (its layers are recorded by the engine as usual).
        keys: For dict inputs, the keys of the tensor entries in order.
        constants: Non-tensor dict entries passed through unchanged.
        output_scale: Multiplies the model output, broadcast over ``[N, K]``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        keys: list[str] | None = None,
        constants: dict[str, Any] | None = None,
        output_scale: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.keys = keys
        self.constants = constants or {}
        self.output_scale = output_scale

    def forward(self, *tensors: Tensor) -> Tensor:  # noqa: D102
        if self.keys is None:
            output = call_model(self.model, tensors)
        else:
            named = dict(zip(self.keys, tensors, strict=True))
            output = call_model(self.model, {**self.constants, **named})
        return output if self.output_scale is None else output * self.output_scale


class ProjectedOutput(torch.nn.Module):
    r"""A model's output projected on fixed vectors, :math:`\langle r_n, f_n \rangle`.

    The GGN of :math:`\sum_n h_n^2` for :math:`h_n = \langle r_n, f_n \rangle` is
    :math:`2 \sum_n J_n^\top r_n r_n^\top J_n`: with :math:`r_n` the loss gradient
    w.r.t. :math:`f_n`, twice the empirical Fisher, so the engine's GGN machinery
    (e.g. ``KFLR``) yields empirical-Fisher quantities without per-layer code.

    Args:
        model: The model as the engine calls it (e.g. an :class:`EngineModel`).
        vectors: :math:`r`, in the shape of the output ``[N, ...]`` (a constant).
    """

    def __init__(self, model: torch.nn.Module, vectors: Tensor) -> None:
        super().__init__()
        self.model = model
        self.vectors = vectors

    def forward(self, *tensors: Tensor) -> Tensor:
        """The projections ``[N, 1]``."""
        output = self.model(*tensors)
        projected = (output * self.vectors).reshape(len(output), -1)
        return projected.sum(1, keepdim=True)


def engine_call(
    model: torch.nn.Module, inputs: Any, output_scale: Tensor | None = None
) -> tuple[EngineModel, tuple[Tensor, ...]]:
    """An :class:`EngineModel` and the positional tensors it takes for ``inputs``."""
    if isinstance(inputs, Mapping):
        keys = [k for k, v in inputs.items() if isinstance(v, Tensor)]
        constants = {k: v for k, v in inputs.items() if not isinstance(v, Tensor)}
        args = tuple(inputs[k] for k in keys)
        return EngineModel(model, keys, constants, output_scale), args
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    return EngineModel(model, output_scale=output_scale), args
