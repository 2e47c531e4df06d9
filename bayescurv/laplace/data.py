"""Batches from data loaders: tuple or dict batches, moved to the model's device."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor


class MissingKeyError(KeyError, ValueError):
    """A dict batch lacks ``dict_key_x`` or ``dict_key_y``.

    A ``KeyError`` as in laplace-torch, and a ``ValueError`` like every other bad
    batch.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class BatchReader:
    """Reads ``(inputs, targets)`` from tuple or dict batches.

    Args:
        dict_key_x: Key of the inputs in dict batches (e.g. Hugging Face style).
        dict_key_y: Key of the targets in dict batches.
        device: Where batches are moved.
    """

    def __init__(self, dict_key_x: str, dict_key_y: str, device: torch.device) -> None:
        self.dict_key_x = dict_key_x
        self.dict_key_y = dict_key_y
        self.device = device

    def inputs(self, batch: Any) -> Tensor | tuple[Tensor, ...] | Mapping:
        """The inputs of a batch, or a bare input (tensor, dict), on the device."""
        if isinstance(batch, Mapping):
            return {k: _to(v, self.device) for k, v in batch.items()}
        return _to(batch, self.device)

    def split(self, batch: Any) -> tuple[Any, Tensor]:
        """``(inputs, targets)`` of one batch, on the device.

        Raises:
            MissingKeyError: If a dict batch lacks ``dict_key_x`` or ``dict_key_y``.
            ValueError: If the batch is neither an ``(x, y)`` pair nor a dict.
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
            return self.inputs(batch), _to(batch[self.dict_key_y], self.device)
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(
                "each batch must be an (inputs, targets) pair or a dict, got "
                f"{type(batch).__name__}."
            )
        inputs, targets = batch
        return self.inputs(inputs), _to(targets, self.device)

    def batches(self, loader: Iterable) -> Iterator[tuple[Any, Tensor]]:
        """``(inputs, targets)`` of every batch of a loader."""
        for batch in loader:
            yield self.split(batch)


def call_model(model: torch.nn.Module, inputs: Any) -> Tensor:
    """``model(inputs)`` for a tensor or dict, ``model(*inputs)`` for a tuple.

    Dict inputs are passed whole (``model(batch_dict)``), as laplace-torch does.
    """
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def batch_size(inputs: Any, dict_key_x: str) -> int:
    """Number of samples of an input (tensor, tuple of tensors, or dict)."""
    if isinstance(inputs, Mapping):
        return len(inputs[dict_key_x])
    if isinstance(inputs, (tuple, list)):
        return len(inputs[0])
    return len(inputs)


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
            output = self.model(*tensors)
        else:
            named = dict(zip(self.keys, tensors, strict=True))
            output = self.model({**self.constants, **named})
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
