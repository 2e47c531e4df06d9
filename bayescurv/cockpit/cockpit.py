"""The Cockpit: instruments computed from one engine sweep per training step."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from bayescurv import engine
from bayescurv.cockpit.instrument import Instrument, StepData, Track, plan_extensions
from bayescurv.cockpit.presets import Preset, preset_instruments
from bayescurv.cockpit.schedules import Schedule

DEFAULT_MEMORY_BUDGET = 2**30


class Cockpit:
    """Training diagnostics: every step, one engine sweep feeds all instruments.

    A step replaces ``optimizer.zero_grad()`` and ``loss.backward()``: it resets the
    trainable parameters' ``.grad``, runs :func:`bayescurv.engine.backprop` once
    with the union of the extensions the instruments scheduled at this step need
    (loss, ``.grad`` and, e.g., individual gradients or a GGN diagonal), lets the
    instruments read the results, and hands control to the block, where the
    parameters are updated. After the block, instruments that need the update
    (update size, alpha) read it. Hessian instruments add Hessian-vector products
    (one more forward and differentiable backward pass, shared within the step).

    Training loop:

        cockpit = Cockpit(model, loss_func, preset="full", optimizer=optimizer)
        for x, y in loader:
            with cockpit.step(x, y) as info:   # loss, .grad and the instruments
                optimizer.step()               # the update, inside the block
            print(info.step, info.loss.item())
        cockpit.plot("dashboard.png")

    As with the engine, samples must not interact (BatchNorm in eval mode).

    Args:
        model: The model being trained.
        loss_func: An engine-supported loss (``reduction`` ``"mean"`` or ``"sum"``).
        instruments: Instrument instances (names must be unique).
        preset: ``"economy"``, ``"business"`` or ``"full"``; its instruments come
            before ``instruments``.
        schedule: One schedule for all preset instruments (default: see
            :mod:`bayescurv.cockpit.presets`).
        optimizer: Lets instruments read the learning rate (CABS).
        generator: Random generator for sampling instruments (Hutchinson, power
            iteration start, Monte Carlo GGN).
        memory_budget: Passed to :func:`bayescurv.engine.backprop`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv.cockpit import Cockpit
        >>> model = nn.Linear(3, 1)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> cockpit = Cockpit(model, nn.MSELoss(), preset="economy")
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> for _ in range(3):
        ...     with cockpit.step(x, y):
        ...         optimizer.step()
        >>> sorted(cockpit.history["loss"].values)
        [0, 1, 2]
        >>> # gradient descent on a fixed batch: the loss decreases
        >>> losses = cockpit.history["loss"].values
        >>> losses[2] < losses[1] < losses[0]
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_func: nn.Module,
        instruments: Sequence[Instrument] = (),
        preset: Preset | str | None = None,
        *,
        schedule: Schedule | None = None,
        optimizer: Optimizer | None = None,
        generator: torch.Generator | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ) -> None:
        chosen = [] if preset is None else preset_instruments(preset, schedule)
        chosen += list(instruments)
        _check_instruments(chosen, optimizer)
        self.model, self.loss_func = model, loss_func
        self.instruments = chosen
        self.optimizer, self.generator = optimizer, generator
        self.memory_budget = memory_budget
        self.steps_taken = 0
        self._open = False

    @contextmanager
    def step(
        self, inputs: Tensor | Sequence[Tensor], targets: Tensor
    ) -> Iterator[StepData]:
        """One training step on a batch; update the parameters inside the block.

        Args:
            inputs: Model input ``[N, ...]`` (a tuple is unpacked into the model).
            targets: Targets ``[N, ...]``.

        Yields:
            The step's :class:`StepData` (``.loss``, ``.output``, ``.step``, ...).

        Raises:
            RuntimeError: If a step's block is still open.
        """
        if self._open:
            raise RuntimeError(
                "Cockpit.step: the previous step's block is still open; steps "
                "cannot be nested."
            )
        step = self.steps_taken
        args = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
        requested = plan_extensions(
            [ext for ins in self.instruments for ext in ins.extensions(step)]
        )
        for p in self.model.parameters():
            if p.requires_grad:
                p.grad = None
        self._open = True
        try:
            result = engine.backprop(
                self.model,
                self.loss_func,
                args,
                targets,
                requested,
                generator=self.generator,
                memory_budget=self.memory_budget,
            )
        except BaseException:
            self._open = False  # nothing happened: the step number is not used up
            raise
        data = StepData(
            step,
            self.model,
            self.loss_func,
            args,
            targets,
            result,
            generator=self.generator,
            learning_rate=self._learning_rate(),
        )
        try:
            for ins in self.instruments:
                ins.on_backward(data)
            yield data
            for ins in self.instruments:
                ins.on_update(data)
        except BaseException:
            for ins in self.instruments:
                ins.on_abort()
            raise
        finally:
            self._open = False
            self.steps_taken += 1

    def __repr__(self) -> str:
        # one line per instrument: its name, class and schedule (no recorded values)
        lines = [
            f"Cockpit(model={type(self.model).__name__}, "
            f"loss_func={self.loss_func!r}, steps_taken={self.steps_taken}, "
            "instruments=["
        ]
        lines += [
            f"  {ins.name!r}: {type(ins).__name__}(schedule={ins.schedule!r}),"
            for ins in self.instruments
        ]
        return "\n".join([*lines, "])"])

    @property
    def history(self) -> dict[str, Track]:
        """Every instrument's recorded values, by instrument name."""
        return {ins.name: ins.to_track() for ins in self.instruments}

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Draw the dashboard of all instruments and save it (PNG) to ``path``.

        Needs matplotlib (``pip install 'bayescurv[plot]'``).
        """
        from bayescurv.cockpit.dashboard import dashboard  # noqa: PLC0415 (optional)

        return dashboard(self.history, path, title=title)

    def _learning_rate(self) -> float | None:
        if self.optimizer is None:
            return None
        return float(self.optimizer.param_groups[0]["lr"])


def _check_instruments(
    instruments: list[Instrument], optimizer: Optimizer | None
) -> None:
    if not instruments:
        raise ValueError("Cockpit needs instruments or a preset.")
    for ins in instruments:
        if not isinstance(ins, Instrument):
            raise TypeError(
                f"instruments must be Instrument instances, got {ins!r} "
                "(did you pass the class instead of an instance?)."
            )
    names = [ins.name for ins in instruments]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"Instruments with the same name: {duplicates}; each may appear once "
            "(a preset already contains its instruments)."
        )
    for ins in instruments:
        if getattr(ins, "needs_learning_rate", False) and optimizer is None:
            raise ValueError(
                f"{type(ins).__name__} needs the learning rate: pass "
                f"{type(ins).__name__}(lr=...) or Cockpit(..., optimizer=...)."
            )
