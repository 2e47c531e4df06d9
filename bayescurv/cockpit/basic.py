"""Basic instruments: loss, gradient norm, distance from the start, update size."""

from __future__ import annotations

from torch import Tensor

from bayescurv.cockpit.instrument import Instrument, StepData, distance, norm
from bayescurv.cockpit.schedules import Schedule


class Loss(Instrument):
    """The mini-batch loss :math:`L` as reduced by the loss function.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv.cockpit import Cockpit, Loss
        >>> model, loss_func = nn.Linear(2, 1), nn.MSELoss()
        >>> cockpit = Cockpit(model, loss_func, [Loss()])
        >>> x, y = torch.randn(4, 2), torch.randn(4, 1)
        >>> with cockpit.step(x, y) as info:
        ...     pass
        >>> torch.isclose(torch.tensor(cockpit.history["loss"].values[0]),
        ...               loss_func(model(x), y))
        tensor(True)
    """

    name = "loss"
    title = "Mini-batch loss"
    unit = r"loss $L$"

    def compute(self, data: StepData) -> float:
        """The batch loss."""
        return data.loss.item()


class GradNorm(Instrument):
    r"""The mini-batch gradient's norm :math:`\|\nabla L\|_2`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import cockpit as ck
        >>> model = nn.Linear(1, 1, bias=False)
        >>> _ = model.weight.data.zero_()
        >>> pit = ck.Cockpit(model, nn.MSELoss(reduction="sum"), [ck.GradNorm()])
        >>> with pit.step(torch.ones(2, 1), torch.tensor([[1.0], [3.0]])):
        ...     pass
        >>> # individual gradients 2 (w x - y) x: -2 and -6, mean -4
        >>> pit.history["grad_norm"].values[0]  # |-2 - 6|
        8.0
    """

    name = "grad_norm"
    title = "Gradient norm"
    unit = r"$\|\nabla L\|_2$"

    def compute(self, data: StepData) -> float:
        """The gradient norm."""
        return norm(data.grad).item()


class Distance(Instrument):
    r"""Distance from the start, :math:`\|\theta_t - \theta_0\|_2`.

    :math:`\theta_0` are the parameters at the Cockpit's first step (taken whatever
    the schedule); the distance is measured before the step's update.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import cockpit as ck
        >>> model = nn.Linear(1, 1, bias=False)
        >>> _ = model.weight.data.zero_()
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.25)
        >>> pit = ck.Cockpit(model, nn.MSELoss(reduction="sum"), [ck.Distance()])
        >>> for _ in range(2):  # w: 0 -> 0.25 * 8 = 2, the minimum (no move)
        ...     with pit.step(torch.ones(2, 1), torch.tensor([[1.0], [3.0]])):
        ...         optimizer.step()
        >>> pit.history["distance"].values
        {0: 0.0, 1: 2.0}
    """

    name = "distance"
    title = "Distance from initialization"
    unit = r"$\|\theta_t - \theta_0\|_2$"

    def __init__(self, schedule: Schedule | None = None) -> None:
        super().__init__(schedule)
        self._initial: dict[str, Tensor] | None = None

    def on_backward(self, data: StepData) -> None:
        """Remember the first parameters, then measure if scheduled."""
        if self._initial is None:
            self._initial = {n: p.detach().clone() for n, p in data.params.items()}
        super().on_backward(data)

    def compute(self, data: StepData) -> float:
        """The distance of the current parameters from the first ones."""
        assert self._initial is not None
        current = {n: p.detach() for n, p in data.params.items()}
        return distance(current, self._initial)


class UpdateSize(Instrument):
    r"""The size of the step's update, :math:`\|\theta_{t+1} - \theta_t\|_2`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import cockpit as ck
        >>> model = nn.Linear(1, 1, bias=False)
        >>> _ = model.weight.data.zero_()
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.25)
        >>> pit = ck.Cockpit(model, nn.MSELoss(reduction="sum"), [ck.UpdateSize()])
        >>> with pit.step(torch.ones(2, 1), torch.tensor([[1.0], [3.0]])):
        ...     optimizer.step()
        >>> pit.history["update_size"].values[0]  # 0.25 * |gradient| = 0.25 * 8
        2.0
    """

    name = "update_size"
    title = "Update size"
    unit = r"$\|\theta_{t+1} - \theta_t\|_2$"

    def on_backward(self, data: StepData) -> None:
        """Snapshot the parameters before the update if scheduled."""
        if self.schedule(data.step):
            data.snapshot()

    def on_update(self, data: StepData) -> None:
        """Measure the update."""
        if self.schedule(data.step):
            current = {n: p.detach() for n, p in data.params.items()}
            self.values[data.step] = distance(current, data.snapshot())
