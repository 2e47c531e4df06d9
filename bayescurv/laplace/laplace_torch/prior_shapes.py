"""Prior precision shapes over a model's parameters (laplace-torch's helpers).

A prior precision is one value (``[1]``, "scalar"), one per parameter tensor
(``[B]``, "layerwise") or one per parameter entry (``[P]``, "diag"); see
:mod:`bayescurv.curvature.prior`. These helpers build and expand such tensors for a
model, in the order of ``model.parameters()`` restricted to trainable tensors.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(2, 1)  # weight: 2 entries, bias: 1
    >>> expand_prior_precision(torch.tensor([3.0, 5.0]), model)
    tensor([3., 3., 5.])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bayescurv.curvature.prior import as_precision, per_parameter
from bayescurv.laplace.enums import PriorStructure, parse

__all__ = [
    "expand_prior_precision",
    "fix_prior_prec_structure",
    "parameters_per_layer",
]


def parameters_per_layer(model: nn.Module) -> list[int]:
    """The number of entries of every parameter tensor, in ``parameters()`` order.

    As laplace-torch, frozen tensors are counted too.
    """
    return [p.numel() for p in model.parameters()]


def expand_prior_precision(prior_prec: Tensor, model: nn.Module) -> Tensor:
    """A scalar, per-tensor or per-entry prior precision as one value per entry.

    Args:
        prior_prec: ``[1]`` (or 0-d), ``[B]`` (one per trainable parameter tensor) or
            ``[P]`` (one per trainable entry); non-negative.
        model: The model; its trainable parameters define ``B`` and ``P``.

    Returns:
        ``[P]`` on the parameters' device and dtype (differentiable).

    Raises:
        ValueError: For another shape or a negative, NaN or infinite entry.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("expand_prior_precision: the model has no trainable weights.")
    sizes = [p.numel() for p in trainable]
    value = prior_prec.reshape(()) if prior_prec.shape == (1,) else prior_prec
    precision = as_precision(
        value, sizes, like=trainable[0], owner="expand_prior_precision"
    )
    return per_parameter(precision, sizes).clone()


def fix_prior_prec_structure(
    prior_prec_init: float | Tensor,
    prior_structure: PriorStructure | str,
    n_layers: int,
    n_params: int,
    device: torch.device | str | None,
    dtype: torch.dtype,
) -> Tensor:
    """A prior precision of one value repeated in the shape of a prior structure.

    Args:
        prior_prec_init: The value (a number, or a 0-d or ``[1]`` tensor).
        prior_structure: ``"scalar"`` -> ``[1]``, ``"layerwise"`` -> ``[n_layers]``,
            ``"diag"`` -> ``[n_params]``.
        n_layers: Number of parameter tensors ``B``.
        n_params: Number of parameter entries ``P``.
        device: Device of the result.
        dtype: Dtype of the result.

    Raises:
        ValueError: For an unknown structure or a value with several entries.
    """
    structure = parse(PriorStructure, prior_structure, "prior_structure")
    value = torch.as_tensor(prior_prec_init, dtype=dtype, device=device)
    if value.numel() != 1:
        raise ValueError(
            "fix_prior_prec_structure: prior_prec_init must be one value, got shape "
            f"{list(value.shape)}."
        )
    size = {
        PriorStructure.SCALAR: 1,
        PriorStructure.LAYERWISE: n_layers,
        PriorStructure.DIAG: n_params,
    }[structure]
    return value.reshape(1).repeat(size)
