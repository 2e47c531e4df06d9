r"""The instrument interface and the data one training step makes available to it.

Units. Instruments speak about the individual gradients :math:`\nabla \ell_n` and
losses :math:`\ell_n` of the ``N`` samples, defined so that the batch loss is
:math:`L = \rho \sum_n \ell_n` with :math:`\rho = 1/N` for ``reduction="mean"`` and 1
for ``"sum"``: the engine's ``grad_batch`` is :math:`\rho \nabla \ell_n`. For mean
reduction :math:`\ell_n` is the per-sample loss; with class weights or several output
positions per sample it is ``N`` times the sample's share of the batch loss.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bayescurv import engine
from bayescurv.cockpit.schedules import Schedule, every

# Engine quantities that are cheap reductions of ``grad_batch``; when ``grad_batch``
# is computed anyway they are derived from it instead of requested from the engine.
_DERIVABLE = ("batch_l2", "batch_dot", "sum_grad_squared", "variance")


def _derive(savefield: str, grad_batch: Tensor) -> Tensor:
    # NOTE [No temporaries of the size of grad_batch]: allocating N·P numbers costs
    # about as much as a plain training step's arithmetic, and reductions over the
    # sample axis are strided; so rows are reduced on the fly (vector norms, matrix
    # products) and sums over samples accumulate one sample at a time.
    flat = grad_batch.flatten(1)
    if savefield == "batch_l2":
        return torch.linalg.vector_norm(flat, dim=1).square()
    if savefield == "batch_dot":
        return flat @ flat.T
    squares = torch.zeros_like(grad_batch[0])
    total = torch.zeros_like(grad_batch[0])
    for row in grad_batch:
        squares.addcmul_(row, row)
        total.add_(row)
    if savefield == "sum_grad_squared":
        return squares
    n = grad_batch.shape[0]
    return squares / n - (total / n).square()  # variance


def plan_extensions(
    extensions: Sequence[engine.Extension],
) -> list[engine.Extension]:
    """The extensions to request: duplicates merged, derivable ones dropped.

    Raises:
        ValueError: If two different extensions share a savefield (e.g. two
            ``DiagGGNMC`` with different ``mc_samples``).
    """
    by_field: dict[str, engine.Extension] = {}
    for ext in extensions:
        known = by_field.setdefault(ext.savefield, ext)
        if known != ext:
            raise ValueError(
                f"Instruments request conflicting extensions {known} and {ext} for "
                f"'{ext.savefield}'; give them the same options."
            )
    if "grad_batch" in by_field:
        for savefield in _DERIVABLE:
            by_field.pop(savefield, None)
    return list(by_field.values())


def individual_losses(loss_func: nn.Module, output: Tensor, targets: Tensor) -> Tensor:
    r"""The individual losses :math:`\ell_n`, ``[N]``, with :math:`L = \rho\sum\ell_n`.

    # NOTE [Individual losses from the unreduced loss]
    # The unreduced loss s (per element, class weights applied) sums to Z·L for mean
    # reduction, with a normalizer Z that does not depend on n (element count or
    # weight sum). So sample n's share of L is L·s_n/Σs, whatever Z is, and
    # l_n = N·L·s_n/Σs. All supported losses are non-negative, so Σs = 0 means every
    # share is 0.
    """
    unreduced = copy.copy(loss_func)
    unreduced.reduction = "none"
    shares = unreduced(output, targets).reshape(output.shape[0], -1).sum(1)
    if loss_func.reduction == "sum":
        return shares
    total = shares.sum()
    if total == 0:
        return torch.zeros_like(shares)
    batch_loss = loss_func(output, targets)
    return output.shape[0] * batch_loss * shares / total


class StepData:
    r"""What one training step makes available to the instruments (lazy, cached).

    Built by :class:`~bayescurv.cockpit.Cockpit` after its engine sweep; instruments
    read it in :meth:`Instrument.on_backward` (parameters at the step's start, this
    batch's ``.grad``) and :meth:`Instrument.on_update` (parameters after the update).

    Attributes:
        step: The step number (from 0).
        model: The model.
        loss_func: The loss function.
        args: The model inputs (a tuple).
        targets: The targets.
        params: Trainable parameters by name.
        loss: The batch loss (detached).
        output: The model output (detached).
        batch_size: ``N``.
        rho: :math:`\rho`, 1/N for mean and 1 for sum reduction.
        generator: Random generator for sampling instruments (or ``None``).
        learning_rate: The optimizer's learning rate (first parameter group) if the
            Cockpit knows the optimizer, else ``None``.
    """

    def __init__(
        self,
        step: int,
        model: nn.Module,
        loss_func: nn.Module,
        args: tuple[Tensor, ...],
        targets: Tensor,
        result: engine.BackpropResult,
        generator: torch.Generator | None = None,
        learning_rate: float | None = None,
    ) -> None:
        self.step = step
        self.model, self.loss_func = model, loss_func
        self.args, self.targets = args, targets
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.loss, self.output = result.loss, result.output
        self.batch_size = result.output.shape[0]
        self.rho = 1.0 / self.batch_size if loss_func.reduction == "mean" else 1.0
        self.generator, self.learning_rate = generator, learning_rate
        self._result = result
        self._cache: dict[str, Any] = {}
        self._grad = {n: _grad_or_zeros(p) for n, p in self.params.items()}

    @property
    def grad(self) -> dict[str, Tensor]:
        r"""The batch gradient :math:`\nabla L`, ``.grad`` after the sweep."""
        return self._grad

    def quantity(self, savefield: str) -> dict[str, Tensor]:
        """An engine quantity (engine scaling), computed or derived from ``grad_batch``.

        Raises:
            KeyError: If no instrument requested it in this step.
        """
        if savefield in self._result:
            return self._result[savefield]
        if savefield in _DERIVABLE and "grad_batch" in self._result:
            return self._cached(
                savefield,
                lambda: {
                    n: _derive(savefield, g)
                    for n, g in self._result["grad_batch"].items()
                },
            )
        return self._result[savefield]  # raises a KeyError listing what exists

    def individual_gradients(self) -> dict[str, Tensor]:
        r""":math:`\nabla \ell_n` by parameter, ``[N, *p]`` (needs ``BatchGrad``).

        A rescaled copy of ``grad_batch`` (``N·P`` numbers); the built-in instruments
        work on ``quantity("grad_batch")`` and rescale their (small) results instead.
        """
        return self._cached(
            "individual_gradients",
            lambda: {n: g / self.rho for n, g in self.quantity("grad_batch").items()},
        )

    def project_individual_gradients(self, direction: dict[str, Tensor]) -> Tensor:
        r"""Individual gradients projected on a direction ``v`` (needs ``BatchGrad``).

        Returns:
            :math:`\langle \nabla \ell_n, v \rangle`, ``[N]``.
        """
        grad_batch = self.quantity("grad_batch")
        total = sum(
            grad_batch[n].flatten(1) @ v.flatten() for n, v in direction.items()
        )
        return total / self.rho  # type: ignore[return-value]

    def individual_l2(self) -> Tensor:
        r""":math:`\|\nabla \ell_n\|^2`, ``[N]``.

        Needs ``BatchL2Grad`` or ``BatchGrad`` (or else ``BatchDotGrad``).
        """

        def make() -> Tensor:
            if "batch_l2" in self._result or "grad_batch" in self._result:
                return _total(self.quantity("batch_l2")) / self.rho**2
            return self.individual_dot().diagonal()

        return self._cached("individual_l2", make)

    def gradient_projections(self) -> Tensor:
        r"""Individual gradients projected on their mean :math:`g`, ``[N]``.

        :math:`p_n = \langle \nabla \ell_n, g \rangle`, from ``BatchGrad`` (one
        matrix-vector product) or else ``BatchDotGrad``.
        """

        def make() -> Tensor:
            if "grad_batch" in self._result:
                return self.project_individual_gradients(self.gradient_mean())
            return self.individual_dot().mean(1)

        return self._cached("gradient_projections", make)

    def individual_dot(self) -> Tensor:
        r"""Individual gradients' inner products, ``[N, N]`` (needs ``BatchDotGrad``).

        .. math:: \langle\nabla \ell_n, \nabla \ell_m\rangle
        """
        return self._cached(
            "individual_dot",
            lambda: _total(self.quantity("batch_dot")) / self.rho**2,
        )

    def gradient_mean(self) -> dict[str, Tensor]:
        r""":math:`g = \frac1N \sum_n \nabla \ell_n` by parameter."""
        scale = self.rho * self.batch_size
        return self._cached(
            "gradient_mean", lambda: {n: g / scale for n, g in self.grad.items()}
        )

    def second_moment(self) -> dict[str, Tensor]:
        r"""Second moment of the individual gradients (needs ``SumGradSquared``).

        .. math:: \frac1N \sum_n (\nabla \ell_n)^{\odot 2}
        """
        scale = self.rho**2 * self.batch_size
        return self._cached(
            "second_moment",
            lambda: {
                n: s / scale for n, s in self.quantity("sum_grad_squared").items()
            },
        )

    def individual_losses(self) -> Tensor:
        r""":math:`\ell_n`, ``[N]``."""
        return self._cached(
            "individual_losses",
            lambda: individual_losses(self.loss_func, self.output, self.targets),
        )

    def hessian_vector_product(self, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        r"""Products of the batch loss Hessian :math:`\nabla^2 L` with ``K`` vectors.

        Args:
            vectors: Parameter name -> ``[K, *p]``.

        Returns:
            Parameter name -> ``[K, *p]``. Each call is one
            :func:`bayescurv.engine.hessian_vector_product`: a forward pass and a
            differentiable backward pass, then one batched backward pass for all
            ``K`` vectors.
        """
        return engine.hessian_vector_product(
            self.model, self.loss_func, self.args, self.targets, vectors
        )

    def snapshot(self) -> dict[str, Tensor]:
        """Copies of the parameters at the step's start (take in ``on_backward``)."""
        return self._cached(
            "snapshot", lambda: {n: p.detach().clone() for n, p in self.params.items()}
        )

    def update(self) -> dict[str, Tensor]:
        r"""The update :math:`\theta_{t+1} - \theta_t` (in ``on_update``).

        Needs a :meth:`snapshot` taken in ``on_backward``.
        """
        if "snapshot" not in self._cache:
            raise RuntimeError("update() needs snapshot() to be taken in on_backward.")
        start = self._cache["snapshot"]
        return self._cached(
            "update",
            lambda: {n: p.detach() - start[n] for n, p in self.params.items()},
        )

    def _cached(self, key: str, make: Any) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]


def _grad_or_zeros(p: nn.Parameter) -> Tensor:
    return torch.zeros_like(p) if p.grad is None else p.grad.detach()


def _total(per_param: dict[str, Tensor]) -> Tensor:
    """Sum a per-parameter quantity over the parameters."""
    return sum(per_param.values())  # type: ignore[return-value]


def dot(a: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
    """Inner product of two parameter-shaped dicts."""
    return sum((a[n] * b[n]).sum() for n in a)  # type: ignore[return-value]


def norm(a: dict[str, Tensor]) -> Tensor:
    """Euclidean norm of a parameter-shaped dict."""
    return dot(a, a).sqrt()


def distance(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """Euclidean distance of two parameter-shaped dicts (no difference tensors)."""
    return math.sqrt(sum(torch.dist(a[n], b[n]).item() ** 2 for n in a))


@dataclass
class Track:
    """The recorded values of one instrument, as the dashboard reads them.

    Attributes:
        title: Panel title.
        unit: What the values measure (y-axis label).
        values: Step -> value (a float, or a histogram for histogram instruments).
        threshold: For tests: a value above it is a failure (``None`` otherwise).
    """

    title: str
    unit: str
    values: dict[int, Any] = field(default_factory=dict)
    threshold: float | None = None

    def series(self) -> tuple[list[int], list[Any]]:
        """Steps and values, sorted by step."""
        steps = sorted(self.values)
        return steps, [self.values[s] for s in steps]


class Instrument:
    """One training diagnostic.

    Subclasses set ``name`` (the key in the history), ``title`` and ``unit``, list
    the engine extensions they need in :meth:`required`, and implement
    :meth:`compute` (a value from :class:`StepData`). Instruments that need the
    parameters after the update or span several steps override :meth:`extensions`,
    :meth:`on_backward`, :meth:`on_update` and :meth:`on_abort`. The Cockpit calls
    ``on_backward`` and ``on_update`` of every instrument at every step; the default
    implementations consult the schedule.

    Args:
        schedule: Steps at which the instrument runs (default: every step).

    Attributes:
        values: Step -> recorded value.
        threshold: Values above it are failures (tests only; else ``None``).
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    unit: ClassVar[str] = ""

    def __init__(self, schedule: Schedule | None = None) -> None:
        if schedule is not None and not callable(schedule):
            raise TypeError(
                f"{type(self).__name__}: schedule must be a callable step -> bool "
                f"(see bayescurv.cockpit.schedules), got {schedule!r}."
            )
        self.schedule: Schedule = every(1) if schedule is None else schedule
        self.values: dict[int, Any] = {}
        self.threshold: float | None = None

    def required(self) -> Sequence[engine.Extension]:
        """Engine extensions :meth:`compute` reads."""
        return ()

    def extensions(self, step: int) -> Sequence[engine.Extension]:
        """Engine extensions needed at ``step``."""
        return self.required() if self.schedule(step) else ()

    def on_backward(self, data: StepData) -> None:
        """After the engine sweep, before the update: record :meth:`compute`."""
        if self.schedule(data.step):
            self.values[data.step] = self.compute(data)

    def on_update(self, data: StepData) -> None:
        """After the update (default: nothing)."""

    def on_abort(self) -> None:
        """The step's block raised: drop state that spans steps (default: none)."""

    def compute(self, data: StepData) -> Any:
        """The instrument's value at this step."""
        raise NotImplementedError

    def to_track(self) -> Track:
        """The recorded values with their plot metadata."""
        return Track(self.title, self.unit, dict(self.values), self.threshold)
