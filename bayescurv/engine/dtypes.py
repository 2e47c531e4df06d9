r"""The engine's numerical policy: model dtypes and accumulation dtypes.

**Model dtypes.** The engine computes in the dtype of the model: float32 or float64.
float16 and bfloat16 models are refused at the boundary (:func:`check_model_dtype`):
curvature quantities are sums of squares whose range and precision half-precision
formats do not have (a squared gradient entry above 256 overflows float16), and
several CPU kernels the rules use have no half-precision implementation. Cast the
model and its inputs with ``model.float()`` (or ``.double()``) for curvature.

**Accumulation dtypes.** Quantities that are Gram matrices of per-sample vectors, the
dense GGN of :func:`~bayescurv.engine.ggn_matrix` and the Kronecker factors of
:class:`~bayescurv.engine.KFAC`, :class:`~bayescurv.engine.KFLR` and
:class:`~bayescurv.engine.KFRA`, take ``dtype=``: the vectors are computed in the
model dtype and upcast before their products are formed.

# NOTE [Gram matrices in the accumulation dtype]
# A GGN G = V^T V (or a factor a^T a, g^T g) with more rows P than vectors N C has an
# exact null space of dimension P - N C. Formed in float32, round-off puts eigenvalues
# of size ~1e-7 lambda_max of both signs into that null space (measured: -3e-4 for a
# 2,701-weight MLP with lambda_max 6.7e3), which biases log-determinants and
# predictive variances at small prior precisions. Formed in float64 from the same
# float32 vectors, the product is the exact Gram matrix of slightly perturbed vectors:
# its rank and null space are exact (eigenvalues ~1e-16 lambda_max) and only the
# vectors carry float32 error (~1e-7 relative). Upcasting happens chunk by chunk, so
# no float64 copy of all vectors exists at once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

MODEL_DTYPES = (torch.float32, torch.float64)
"""Floating dtypes the engine computes in."""
ACCUMULATION_DTYPES = (torch.float32, torch.float64)
"""Dtypes a Gram matrix may be accumulated in (``dtype=``)."""


def accumulation_dtype(dtype: object, owner: str) -> torch.dtype | None:
    """Validate a ``dtype=`` argument: ``None`` or float32/float64.

    Args:
        dtype: The value given.
        owner: Who received it (named in the error).

    Raises:
        TypeError: If ``dtype`` is not a ``torch.dtype`` (e.g. a NumPy dtype or str).
        ValueError: If it is not float32 or float64.
    """
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype):
        raise TypeError(
            f"{owner}: dtype must be a torch.dtype (torch.float64 or torch.float32) "
            f"or None, got {dtype!r} of type {type(dtype).__name__}."
        )
    if dtype not in ACCUMULATION_DTYPES:
        raise ValueError(
            f"{owner}: dtype={dtype} is not an accumulation dtype; use torch.float64 "
            "(exact rank from float32 models) or torch.float32."
        )
    return dtype


def check_model_dtype(named: Iterable[tuple[str, Tensor]]) -> None:
    """Refuse float16/bfloat16 (and non-floating) parameters with a clear message.

    Args:
        named: ``(name, tensor)`` pairs, e.g. the selected parameters.

    Raises:
        TypeError: Naming the first offending parameter and its dtype.
    """
    for name, p in named:
        if p.dtype not in MODEL_DTYPES:
            raise TypeError(
                f"Parameter '{name}' has dtype {p.dtype}; the engine computes "
                "curvature in float32 or float64 only (half-precision formats cannot "
                "hold sums of squared gradients). Cast the model and its inputs, "
                "e.g. model.float(), or leave the parameter out with params=."
            )
