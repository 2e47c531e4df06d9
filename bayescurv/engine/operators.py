r"""Curvature matrices of a whole data set as matrix-free linear operators.

:class:`GGNOperator`, :class:`HessianOperator` and :class:`EFOperator` represent the
curvature of the loss of **all** batches of a data loader taken together, i.e. of
``loss_func(model(X), y)`` for the concatenated data set ``(X, y)``:

.. math::
    A = \frac{1}{Z^q} \sum_{b} A_b^{\text{sum}},

where :math:`A_b^{\text{sum}}` is the curvature of batch ``b`` under the same loss with
``reduction="sum"``, :math:`q = 1` (GGN, Hessian, MC GGN) or :math:`q = 2` (empirical
Fisher, which is quadratic in the individual gradients), and
:math:`Z = \sum_b Z_b` the normalizer of ``reduction="mean"`` over the whole data set
(:math:`Z = 1` for ``reduction="sum"``).

# NOTE [Exact mean over a loader]
# Averaging the per-batch curvatures of a mean-reduced loss is wrong when batches have
# different sizes (the last batch of a loader usually does) and, for cross-entropy
# with class weights, even for equal sizes (the mean divides by the summed target
# weights). Every batch is therefore evaluated with reduction="sum" and the total is
# divided once by the data set's normalizer Z (the number of output entries for
# MSELoss and BCEWithLogitsLoss, the summed target class weights for CrossEntropyLoss)
# accumulated over the same pass, which reproduces the whole-data-set loss exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from bayescurv.engine.boundary import check_parameters
from bayescurv.engine.dense import ggn_matrix
from bayescurv.engine.dtypes import accumulation_dtype
from bayescurv.engine.losses import loss_rule
from bayescurv.engine.memory import Estimate, check_estimates
from bayescurv.engine.products import Curvature, _check_mc, batch_product
from bayescurv.engine.selection import ParamSelection, select_parameters
from bayescurv.engine.vectors import Vector, as_block


class CurvatureOperator:
    r"""A curvature matrix summed over a data loader, applied matrix-free.

    Subclasses fix the curvature; use :class:`GGNOperator`, :class:`HessianOperator`
    or :class:`EFOperator`. ``A @ v`` accepts the vector layouts of
    :mod:`bayescurv.engine.vectors` (dict, list or flat tensor, each with an optional
    leading block axis ``K``) and returns the same layout.

    Args:
        model: Any module; the operator acts on the selected parameters (in
            ``named_parameters()`` order for flat vectors).
        loss_func: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``
            with reduction ``"mean"`` (exact mean over the whole data set) or
            ``"sum"``.
        data: A re-iterable source of ``(inputs, targets)`` batches (a
            ``DataLoader`` or a list); ``inputs`` may be a tuple of tensors. Batches
            are moved to the parameters' device.
        params: Which parameters the curvature is over: names and/or parameter
            tensors of ``model`` (default: every trainable one), as for
            :func:`~bayescurv.engine.backprop`. Products never write ``.grad``.

    Attributes:
        shape: ``(P, P)`` with ``P`` the number of selected parameter entries.
    """

    curvature: ClassVar[Curvature]

    def __init__(
        self,
        model: nn.Module,
        loss_func: nn.Module,
        data: Iterable,
        *,
        params: ParamSelection = None,
    ) -> None:
        self.model = model
        self.loss_func = loss_func
        self.data = data
        self._params = select_parameters(model, params)
        check_parameters(self._params)
        rule = loss_rule(loss_func)
        del rule  # looked up for its error on unsupported losses
        if loss_func.reduction not in ("mean", "sum"):
            raise ValueError(
                f"{type(loss_func).__name__}(reduction={loss_func.reduction!r}) is "
                "not supported: use reduction='mean' or 'sum'."
            )
        if iter(data) is data:
            raise TypeError(
                f"data must be re-iterable (a DataLoader or a list of batches), got "
                f"the one-shot iterator {type(data).__name__}: every product makes "
                "one pass over it."
            )
        self._sum_loss = copy.deepcopy(loss_func)
        self._sum_loss.reduction = "sum"
        size = sum(p.numel() for p in self._params.values())
        self.shape = (size, size)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the (first) trainable parameter."""
        return next(iter(self._params.values())).dtype

    @property
    def device(self) -> torch.device:
        """The device of the (first) trainable parameter."""
        return next(iter(self._params.values())).device

    def __matmul__(self, vector: Vector) -> Vector:
        return self.matmul(vector)

    def matmul(self, vector: Vector) -> Vector:
        """Multiply with a vector or a block of vectors (one pass over the data).

        Raises:
            ValueError: If the data yields no batches or the vector does not fit.
        """
        block = as_block(self._params, vector)
        rule = loss_rule(self.loss_func)
        total: list[Tensor] | None = None
        normalizer = torch.zeros((), dtype=torch.float64)
        for batch in self.data:
            inputs, targets = self._unpack(batch)
            part, output = self._batch(inputs, targets, block.columns)
            total = (
                part
                if total is None
                else [t + p for t, p in zip(total, part, strict=True)]
            )
            if self.loss_func.reduction == "mean":
                batch_norm = rule.normalizer(self.loss_func, output, targets)
                normalizer += batch_norm.detach().double().cpu()
        if total is None:
            raise ValueError(f"{type(self).__name__}: data yielded no batches.")
        divisor = self._divisor(normalizer.item())
        return block.wrap([t / divisor for t in total])

    def _divisor(self, normalizer: float) -> float:
        """What the summed curvature is divided by (NOTE [Exact mean over a loader])."""
        if self.loss_func.reduction != "mean":
            return 1.0
        if normalizer <= 0:
            raise ValueError(
                f"{type(self).__name__}: the mean normalizer of the data set is "
                f"{normalizer} (every target ignored or zero weight)."
            )
        return normalizer ** (2 if self.curvature == Curvature.EF else 1)

    def _batch(
        self, inputs: Any, targets: Tensor, columns: list[Tensor]
    ) -> tuple[list[Tensor], Tensor]:
        return batch_product(
            self.curvature,
            self.model,
            self._sum_loss,
            inputs,
            targets,
            columns,
            list(self._params.values()),
            *self._sampling(),
        )

    def _sampling(self) -> tuple[int | None, torch.Generator | None]:
        """``(mc_samples, generator)`` of a Monte Carlo curvature (none here)."""
        return None, None

    def _unpack(self, batch: Any) -> tuple[Any, Tensor]:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(
                "each batch must be an (inputs, targets) pair, got "
                f"{type(batch).__name__}"
                + (
                    f" of length {len(batch)}"
                    if isinstance(batch, (tuple, list))
                    else ""
                )
                + "."
            )
        inputs, targets = batch
        device = self.device
        if isinstance(inputs, (tuple, list)):
            inputs = tuple(_to(t, device) for t in inputs)
        return _to(inputs, device), _to(targets, device)

    def to_dense(
        self,
        chunk_size: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        max_memory: int | None = None,
    ) -> Tensor:
        """The matrix ``[P, P]`` (``P`` products; small models only).

        Args:
            chunk_size: Identity columns per pass over the data (default: all).
            dtype: dtype of the result (default: the parameters'). The exact GGN
                (:class:`GGNOperator` without ``mc_samples``) is then accumulated as
                a Gram matrix in ``dtype`` (:func:`~bayescurv.engine.ggn_matrix`
                per batch), so its rank and null space are exact from a float32
                model; the other curvatures are products in the parameters' dtype,
                cast.
            max_memory: Bytes the matrix may take, checked before allocating;
                ``None``: 80% of the available memory (see
                :mod:`bayescurv.engine.memory`).

        Raises:
            MemoryBudgetError: If the estimate exceeds ``max_memory``.
        """
        dtype = accumulation_dtype(dtype, f"{type(self).__name__}.to_dense")
        gram = dtype is not None and self._gram_exact()
        size = self.shape[0]
        dtypes = [dtype or self.dtype] + ([self.dtype] if dtype and not gram else [])
        estimate = Estimate(
            f"{type(self).__name__}.to_dense: [P, P] with P={size}",
            size * size * sum(torch.empty((), dtype=d).element_size() for d in dtypes),
            "Multiply matrix-free instead (A @ v, A.to_scipy() with eigsh or cg), or "
            "select fewer parameters with params=.",
        )
        check_estimates([estimate], max_memory, self.device)
        if gram:
            return self._dense_gram(dtype)
        chunk = chunk_size or size
        eye = torch.eye(size, dtype=self.dtype, device=self.device)
        rows = [
            self.matmul(eye[start : start + chunk]) for start in range(0, size, chunk)
        ]
        dense = torch.cat(rows)
        return dense if dtype is None else dense.to(dtype)

    def _gram_exact(self) -> bool:
        """Whether the curvature is the exact GGN (a Gram matrix per batch)."""
        return False

    def _dense_gram(self, dtype: torch.dtype) -> Tensor:
        """The exact GGN as a sum of per-batch ``ggn_matrix`` results in ``dtype``."""
        rule = loss_rule(self.loss_func)
        total = torch.zeros(self.shape, dtype=dtype, device=self.device)
        normalizer = torch.zeros((), dtype=torch.float64)
        batches = 0
        for batch in self.data:
            inputs, targets = self._unpack(batch)
            _, output = ggn_matrix(
                self.model,
                self._sum_loss,
                inputs,
                targets,
                params=list(self._params.values()),
                return_output=True,
                out=total,
            )
            batches += 1
            if self.loss_func.reduction == "mean":
                batch_norm = rule.normalizer(self.loss_func, output, targets)
                normalizer += batch_norm.detach().double().cpu()
        if not batches:
            raise ValueError(f"{type(self).__name__}: data yielded no batches.")
        return total.div_(self._divisor(normalizer.item()))

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` view (NumPy in, NumPy out).

        Products run in the parameters' dtype and device; the operator is symmetric,
        so ``rmatvec`` is ``matvec``. Use it with ``eigsh``, ``cg``, ``lobpcg``, ...
        """
        # NOTE [Lazy scipy]: only this view needs scipy; importing it with the
        # engine cost every `import bayescurv` about 0.3 s.
        from scipy.sparse.linalg import LinearOperator  # noqa: PLC0415

        np_dtype = torch.empty(0, dtype=self.dtype).numpy().dtype

        def matvec(x: Any) -> Any:
            vec = torch.as_tensor(np.ascontiguousarray(x).reshape(-1))
            result = self.matmul(vec.to(dtype=self.dtype, device=self.device))
            return result.detach().cpu().numpy()

        def matmat(x: Any) -> Any:
            block = torch.as_tensor(np.ascontiguousarray(np.asarray(x).T))
            result = self.matmul(block.to(dtype=self.dtype, device=self.device))
            return result.detach().cpu().numpy().T

        return LinearOperator(
            self.shape,
            matvec=matvec,
            rmatvec=matvec,
            matmat=matmat,
            rmatmat=matmat,
            dtype=np_dtype,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, model="
            f"{type(self.model).__name__}, loss={type(self.loss_func).__name__}"
            f"(reduction={self.loss_func.reduction!r}))"
        )


def _to(value: Any, device: torch.device) -> Any:
    """A tensor moved to ``device``; anything else (and meta tensors) unchanged.

    What is left is for the engine's boundary checks to name.
    """
    if isinstance(value, Tensor) and not value.is_meta:
        return value.to(device)
    return value


class GGNOperator(CurvatureOperator):
    r"""The GGN :math:`\sum_n J_n^\top (\nabla^2_{f_n}\ell) J_n` over a data loader.

    With ``mc_samples`` the loss Hessian of every sample is replaced by
    ``mc_samples`` sampled columns (the Monte Carlo GGN / Fisher). The draws are fixed
    when the operator is built: every product re-seeds a private generator with a
    seed drawn once from ``generator`` (default: torch's global generator), so the
    operator is one fixed symmetric PSD matrix as long as the data yields the same
    batches in the same order (``shuffle=False``); ``eigsh`` and ``cg`` need that.

    Args:
        model: See :class:`CurvatureOperator`.
        loss_func: See :class:`CurvatureOperator`.
        data: See :class:`CurvatureOperator`.
        params: See :class:`CurvatureOperator`.
        mc_samples: Monte Carlo columns per sample (``None``: the exact GGN).
        generator: Source of the operator's seed for the Monte Carlo draws.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import engine
        >>> model = nn.Linear(3, 1, bias=False)
        >>> x, y = torch.randn(7, 3), torch.randn(7, 1)
        >>> batches = [(x[:4], y[:4]), (x[4:], y[4:])]  # uneven batches
        >>> G = engine.GGNOperator(model, nn.MSELoss(), batches)
        >>> # mean over all 7 samples: 2/7 X^T X, whatever the batching
        >>> torch.allclose(G.to_dense(), 2 / 7 * x.T @ x, atol=1e-6)
        True
    """

    curvature = Curvature.GGN

    def __init__(
        self,
        model: nn.Module,
        loss_func: nn.Module,
        data: Iterable,
        *,
        params: ParamSelection = None,
        mc_samples: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(model, loss_func, data, params=params)
        _check_mc(mc_samples, generator)
        self.mc_samples = mc_samples
        self._seed: int | None = None
        self._generator: torch.Generator | None = None
        if mc_samples is not None:
            draw = torch.randint(2**62, (1,), generator=generator)
            self._seed = int(draw.item())

    def _sampling(self) -> tuple[int | None, torch.Generator | None]:
        return self.mc_samples, self._generator

    def _gram_exact(self) -> bool:
        return self.mc_samples is None

    def matmul(self, vector: Vector) -> Vector:  # noqa: D102
        if self._seed is not None:
            self._generator = torch.Generator(device=self.device)
            self._generator.manual_seed(self._seed)
        return super().matmul(vector)


class HessianOperator(CurvatureOperator):
    r"""The Hessian of the whole-data-set loss w.r.t. the parameters.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import engine
        >>> model = nn.Linear(2, 1, bias=False)
        >>> x, y = torch.randn(5, 2), torch.randn(5, 1)
        >>> H = engine.HessianOperator(model, nn.MSELoss(reduction="sum"), [(x, y)])
        >>> torch.allclose(H @ torch.ones(2), 2 * x.T @ x.sum(1), atol=1e-6)
        True
    """

    curvature = Curvature.HESSIAN


class EFOperator(CurvatureOperator):
    r"""The empirical Fisher :math:`\sum_n g_n g_n^\top` over a data loader.

    :math:`g_n` is sample ``n``'s gradient of the whole-data-set loss (for
    ``reduction="mean"`` scaled by :math:`1/Z`, so the operator carries
    :math:`1/Z^2`). Samples must not interact (BatchNorm in eval mode).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import engine
        >>> model = nn.Linear(2, 1, bias=False)
        >>> x, y = torch.randn(6, 2), torch.randn(6, 1)
        >>> F = engine.EFOperator(model, nn.MSELoss(reduction="sum"), [(x, y)])
        >>> g = 2 * (model(x) - y) * x  # individual gradients
        >>> torch.allclose(F.to_dense(), g.T @ g, atol=1e-6)
        True
    """

    curvature = Curvature.EF
