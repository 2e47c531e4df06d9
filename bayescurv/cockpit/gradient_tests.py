r"""Gradient tests: is the mini-batch gradient precise enough for its batch size?

With individual gradients :math:`\nabla\ell_n` (``n = 1..B``), their mean :math:`g`
and projections :math:`p_n = \langle \nabla \ell_n, g \rangle`, each test compares a
sample variance of the batch mean with a power of :math:`\|g\|`. Like the Cockpit
paper, every instrument reports the *smallest test parameter for which the test still
passes*; the test with parameter :math:`\theta` passes if the value is at most
:math:`\theta`, the instrument's ``threshold``.

* Norm test (Byrd et al., 2012, eq. 3.9):
  :math:`\theta^2 = \frac{1}{B(B-1)} \sum_n \|\nabla\ell_n - g\|^2 / \|g\|^2`.
* Inner-product test (Bollapragada et al., 2018, eq. 2.6):
  :math:`\theta^2 = \frac{1}{B(B-1)} \sum_n (p_n - \|g\|^2)^2 / \|g\|^4`.
* Orthogonality test (Bollapragada et al., 2018, eq. 3.3):
  :math:`\nu^2 = \frac{1}{B(B-1)} \sum_n \|\nabla\ell_n - \frac{p_n}{\|g\|^2} g\|^2
  / \|g\|^2`.

A failing test means the batch is too small for the gradient's direction (inner
product, orthogonality) or length (norm) to be trusted: the tests suggest growing the
batch by the factor :math:`(\text{value}/\text{threshold})^2`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from bayescurv import engine
from bayescurv.cockpit.instrument import Instrument, StepData, norm
from bayescurv.cockpit.schedules import Schedule


class _GradientTest(Instrument):
    """A gradient test with a pass threshold.

    Args:
        threshold: The test's parameter; values above it fail (default 1).
        schedule: Steps at which the test runs (default: every step).
    """

    unit = "smallest passing parameter"

    def __init__(
        self, threshold: float = 1.0, schedule: Schedule | None = None
    ) -> None:
        super().__init__(schedule)
        if not (isinstance(threshold, (int, float)) and threshold > 0):
            raise ValueError(
                f"{type(self).__name__}: threshold must be a positive number, "
                f"got {threshold!r}."
            )
        self.threshold = float(threshold)

    def compute(self, data: StepData) -> float:
        """The smallest passing parameter (NaN if B < 2, inf if the gradient is 0)."""
        b = data.batch_size
        if b < 2:
            return math.nan
        g2 = norm(data.gradient_mean()).square().item()
        if g2 == 0:
            return math.inf
        return math.sqrt(max(self._variance_sum(data, g2), 0.0) / (b * (b - 1)))

    def _variance_sum(self, data: StepData, g2: float) -> float:
        """The test's sum over samples, divided by its power of ``‖g‖``."""
        raise NotImplementedError


class NormTest(_GradientTest):
    r"""Norm test (Byrd et al., 2012): is the gradient's length precise enough?

    .. math:: \frac{1}{B(B-1)}\sum_n\|\nabla\ell_n - g\|^2 \le \theta^2 \|g\|^2

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv.cockpit import Cockpit, NormTest
        >>> model = nn.Linear(1, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.fill_(0.)
        >>> cockpit = Cockpit(model, nn.MSELoss(reduction="sum"), [NormTest()])
        >>> # individual gradients -2 x y: -2 and -6, mean -4, deviations ±2
        >>> with cockpit.step(torch.tensor([[1.], [1.]]), torch.tensor([[1.], [3.]])):
        ...     pass
        >>> cockpit.history["norm_test"].values[0]  # sqrt((4 + 4) / (2 * 1) / 16)
        0.5
    """

    name = "norm_test"
    title = "Norm test"

    def required(self) -> Sequence[engine.Extension]:
        """Individual gradient norms."""
        return (engine.BatchL2Grad(),)

    def _variance_sum(self, data: StepData, g2: float) -> float:
        total = data.individual_l2().sum().item() - data.batch_size * g2
        return total / g2


class InnerProductTest(_GradientTest):
    r"""Inner-product test (Bollapragada et al., 2018): is it a descent direction?

    .. math:: \frac{1}{B(B-1)}\sum_n (p_n - \|g\|^2)^2 \le \theta^2 \|g\|^4

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import cockpit as ck
        >>> model = nn.Linear(1, 1, bias=False)
        >>> _ = model.weight.data.zero_()
        >>> tests = [ck.InnerProductTest()]
        >>> pit = ck.Cockpit(model, nn.MSELoss(reduction="sum"), tests)
        >>> with pit.step(torch.ones(2, 1), torch.tensor([[1.0], [3.0]])):
        ...     pass
        >>> # individual gradients 2 (w x - y) x: -2 and -6, mean -4
        >>> # p_n = 8, 24 and |g|^2 = 16: sqrt((64 + 64) / (2 * 1) / 16^2)
        >>> pit.history["inner_product_test"].values[0]
        0.5
    """

    name = "inner_product_test"
    title = "Inner-product test"

    def required(self) -> Sequence[engine.Extension]:
        """Individual gradients' pairwise inner products."""
        return (engine.BatchDotGrad(),)

    def _variance_sum(self, data: StepData, g2: float) -> float:
        projections = data.gradient_projections()
        total = projections.square().sum().item() - data.batch_size * g2**2
        return total / g2**2


class OrthogonalityTest(_GradientTest):
    r"""Orthogonality test (Bollapragada et al., 2018): is the direction precise?

    .. math:: \frac{1}{B(B-1)}\sum_n \Big\|\nabla\ell_n
        - \frac{p_n}{\|g\|^2} g\Big\|^2 \le \nu^2 \|g\|^2

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import cockpit as ck
        >>> model = nn.Linear(1, 1, bias=False)
        >>> _ = model.weight.data.zero_()
        >>> tests = [ck.OrthogonalityTest()]
        >>> pit = ck.Cockpit(model, nn.MSELoss(reduction="sum"), tests)
        >>> with pit.step(torch.ones(2, 1), torch.tensor([[1.0], [3.0]])):
        ...     pass
        >>> # individual gradients 2 (w x - y) x: -2 and -6, mean -4
        >>> # in one dimension every individual gradient is parallel to g
        >>> pit.history["orthogonality_test"].values[0]
        0.0
    """

    name = "orthogonality_test"
    title = "Orthogonality test"

    def required(self) -> Sequence[engine.Extension]:
        """Individual gradients' pairwise inner products."""
        return (engine.BatchDotGrad(),)

    def _variance_sum(self, data: StepData, g2: float) -> float:
        l2 = data.individual_l2().sum().item()
        projections = data.gradient_projections()
        return (l2 - projections.square().sum().item() / g2) / g2
