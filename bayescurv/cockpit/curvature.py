r"""Curvature instruments: Hessian trace and top eigenvalue, Takeuchi criterion.

The Hessian is that of the mini-batch loss as reduced, :math:`\nabla^2_\theta L`:
its exact diagonal comes from the engine sweep (``DiagHessian``), products with it
from :func:`bayescurv.engine.hessian_vector_product` (per call: one forward pass, one
differentiable backward pass and one batched backward pass for a block of vectors).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum

import torch
from torch import Tensor

from bayescurv import engine
from bayescurv.cockpit.instrument import Instrument, StepData
from bayescurv.cockpit.schedules import Schedule


class TraceMethod(str, Enum):
    """How :class:`HessTrace` computes the trace."""

    EXACT = "exact"
    """Sum of the exact diagonal, the engine's ``DiagHessian`` (in the step's sweep)."""
    HUTCHINSON = "hutchinson"
    r"""Hutchinson's estimate :math:`\frac1S \sum_s v_s^\top H v_s`, Rademacher
    :math:`v_s` (unbiased, ``samples`` products)."""


class HessTrace(Instrument):
    r"""Trace of the mini-batch loss Hessian, :math:`\operatorname{tr} \nabla^2 L`.

    The sum of the curvatures along all parameter axes: large values mean a sharp
    region, where a fixed learning rate may be too large. ``"exact"`` sums the
    engine's ``DiagHessian`` (computed in the step's engine sweep, as in the Cockpit
    paper); ``"hutchinson"`` needs no engine quantity but ``samples`` Hessian-vector
    products.

    Args:
        method: ``"exact"`` or ``"hutchinson"`` (see :class:`TraceMethod`).
        samples: Random vectors of the Hutchinson estimate.
        schedule: Steps at which it runs (default: every step).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import cockpit as ck
        >>> model = nn.Linear(1, 1, bias=False)
        >>> _ = model.weight.data.zero_()
        >>> pit = ck.Cockpit(model, nn.MSELoss(reduction="sum"), [ck.HessTrace()])
        >>> with pit.step(torch.ones(2, 1), torch.tensor([[1.0], [3.0]])):
        ...     pass
        >>> round(pit.history["hess_trace"].values[0], 4)  # 2 * sum_n x_n^2
        4.0
    """

    name = "hess_trace"
    title = "Hessian trace"
    unit = r"tr$\,\nabla^2 L$"

    def __init__(
        self,
        method: TraceMethod | str = TraceMethod.EXACT,
        samples: int = 8,
        schedule: Schedule | None = None,
    ) -> None:
        super().__init__(schedule)
        self.method = _option(TraceMethod, method, "HessTrace", "method")
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise ValueError(
                f"HessTrace: samples must be a positive integer, got {samples!r}."
            )
        self.samples = samples

    def required(self) -> Sequence[engine.Extension]:
        """The Hessian diagonal for the exact trace."""
        return (engine.DiagHessian(),) if self.method == TraceMethod.EXACT else ()

    def compute(self, data: StepData) -> float:
        """The (estimated) trace."""
        if self.method == TraceMethod.EXACT:
            diagonal = data.quantity("diag_h").values()
            return sum(d.sum() for d in diagonal).item()  # type: ignore[union-attr]
        vectors = {
            name: torch.randint(
                0, 2, (self.samples, *p.shape), generator=data.generator
            ).to(p)
            * 2
            - 1
            for name, p in data.params.items()
        }
        products = data.hessian_vector_product(vectors)
        quadratic = sum((v * products[name]).sum() for name, v in vectors.items())
        return quadratic.item() / self.samples  # type: ignore[union-attr]


class HessMaxEV(Instrument):
    r"""Largest Hessian eigenvalue :math:`\lambda_\max(\nabla^2 L)` by power iteration.

    Power iteration finds the eigenvalue of largest *magnitude*; during training
    that is the largest positive one unless negative curvature dominates (then the
    result is negative). Each step starts from the previous step's eigenvector
    (a random vector the first time), so a few iterations usually suffice.
    Gradient descent with learning rate :math:`\eta` is unstable along the top
    eigenvector when :math:`\eta\lambda_\max > 2`.

    Args:
        max_iter: At most this many Hessian-vector products per step.
        rtol: Stop when the eigenvalue estimate changes by at most this fraction.
        schedule: Steps at which it runs (default: every step).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import cockpit as ck
        >>> model = nn.Linear(1, 1, bias=False)
        >>> _ = model.weight.data.zero_()
        >>> pit = ck.Cockpit(model, nn.MSELoss(reduction="sum"), [ck.HessMaxEV()])
        >>> with pit.step(torch.ones(2, 1), torch.tensor([[1.0], [3.0]])):
        ...     pass
        >>> pit.history["hess_max_ev"].values[0]  # the 1 x 1 Hessian 2 * sum_n x_n^2
        4.0
    """

    name = "hess_max_ev"
    title = "Largest Hessian eigenvalue"
    unit = r"$\lambda_\max(\nabla^2 L)$"

    def __init__(
        self, max_iter: int = 20, rtol: float = 1e-3, schedule: Schedule | None = None
    ) -> None:
        super().__init__(schedule)
        if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
            raise ValueError(
                f"HessMaxEV: max_iter must be a positive integer, got {max_iter!r}."
            )
        if not (isinstance(rtol, (int, float)) and rtol >= 0):
            raise ValueError(f"HessMaxEV: rtol must be non-negative, got {rtol!r}.")
        self.max_iter, self.rtol = max_iter, float(rtol)
        self._vector: dict[str, Tensor] | None = None

    def compute(self, data: StepData) -> float:
        """The eigenvalue estimate after convergence or ``max_iter`` products."""
        vector = self._vector
        shapes = {name: p.shape for name, p in data.params.items()}
        if vector is None or {n: v.shape for n, v in vector.items()} != shapes:
            vector = {
                name: torch.randn(p.shape, generator=data.generator).to(p)
                for name, p in data.params.items()
            }
        vector = _scaled(vector, 1 / _norm(vector))
        estimate = math.nan
        for _ in range(self.max_iter):
            block = {name: v.unsqueeze(0) for name, v in vector.items()}
            product = {
                name: hv[0] for name, hv in data.hessian_vector_product(block).items()
            }
            previous = estimate
            estimate = sum((vector[n] * hv).sum() for n, hv in product.items()).item()  # type: ignore[union-attr]
            length = _norm(product)
            if length == 0:
                return 0.0
            vector = _scaled(product, 1 / length)
            if abs(estimate - previous) <= self.rtol * abs(estimate):
                break
        self._vector = vector
        return estimate


def _norm(vector: dict[str, Tensor]) -> float:
    return math.sqrt(sum(v.square().sum().item() for v in vector.values()))


def _scaled(vector: dict[str, Tensor], factor: float) -> dict[str, Tensor]:
    return {name: factor * v for name, v in vector.items()}


class TICCurvature(str, Enum):
    """Which GGN diagonal :class:`TIC` divides by."""

    GGN_EXACT = "diag_ggn_exact"
    """The exact GGN diagonal (``C`` backpropagated columns per sample)."""
    GGN_MC = "diag_ggn_mc"
    """A Monte Carlo estimate (``mc_samples`` columns per sample; cheaper)."""


class TICApproximation(str, Enum):
    r"""How :class:`TIC` approximates :math:`\operatorname{tr}(G^{-1} C)`."""

    DIAG = "diag"
    r""":math:`\sum_j C_{jj} / (G_{jj} + \epsilon)`."""
    TRACE = "trace"
    r""":math:`\sum_j C_{jj} / (\sum_j G_{jj} + \epsilon)`."""


class TIC(Instrument):
    r"""Takeuchi information criterion (Thomas et al., AISTATS 2020).

    .. math:: \mathrm{TIC} \approx \operatorname{tr}(G^{-1} C), \qquad
        C = \frac1N \sum_n \nabla\ell_n \nabla\ell_n^\top, \quad
        G = \frac1N \sum_n G_n,

    with the curvature replaced by the GGN and both matrices by their diagonals (as
    in the Cockpit paper). It relates gradient noise to curvature; large values
    indicate a generalization gap.

    Args:
        curvature: ``"diag_ggn_exact"`` or ``"diag_ggn_mc"`` (:class:`TICCurvature`).
        approximation: ``"diag"`` or ``"trace"`` (:class:`TICApproximation`).
        mc_samples: Monte Carlo columns for ``"diag_ggn_mc"``.
        epsilon: Added to the curvature before dividing.
        schedule: Steps at which it runs (default: every step).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import cockpit as ck
        >>> model = nn.Linear(1, 1, bias=False)
        >>> _ = model.weight.data.zero_()
        >>> pit = ck.Cockpit(model, nn.MSELoss(reduction="sum"), [ck.TIC()])
        >>> with pit.step(torch.ones(2, 1), torch.tensor([[1.0], [3.0]])):
        ...     pass
        >>> # individual gradients 2 (w x - y) x: -2 and -6, mean -4
        >>> # C = (4 + 36) / 2 = 20, per-sample GGN 2 x^2 = 2
        >>> round(pit.history["tic"].values[0], 4)
        10.0
    """

    name = "tic"
    title = "Takeuchi information criterion"
    unit = r"tr$(G^{-1} C)$"

    def __init__(
        self,
        curvature: TICCurvature | str = TICCurvature.GGN_EXACT,
        approximation: TICApproximation | str = TICApproximation.DIAG,
        mc_samples: int = 1,
        epsilon: float = 1e-7,
        schedule: Schedule | None = None,
    ) -> None:
        super().__init__(schedule)
        self.curvature = _option(TICCurvature, curvature, "TIC", "curvature")
        self.approximation = _option(
            TICApproximation, approximation, "TIC", "approximation"
        )
        if not (isinstance(epsilon, (int, float)) and epsilon >= 0):
            raise ValueError(f"TIC: epsilon must be non-negative, got {epsilon!r}.")
        self.epsilon = float(epsilon)
        self._curvature_ext: engine.Extension = (
            engine.DiagGGNExact()
            if self.curvature == TICCurvature.GGN_EXACT
            else engine.DiagGGNMC(mc_samples)
        )

    def required(self) -> Sequence[engine.Extension]:
        """Second moments of the individual gradients and a GGN diagonal."""
        return (engine.SumGradSquared(), self._curvature_ext)

    def compute(self, data: StepData) -> float:
        """The criterion."""
        names = list(data.params)
        moment = torch.cat([data.second_moment()[n].flatten() for n in names])
        diag = data.quantity(self._curvature_ext.savefield)
        scale = data.rho * data.batch_size  # GGN of the mean individual loss
        curvature = torch.cat([diag[n].flatten() for n in names]) / scale
        if self.approximation == TICApproximation.TRACE:
            return (moment.sum() / (curvature.sum() + self.epsilon)).item()
        return (moment / (curvature + self.epsilon)).sum().item()


def _option(enum: type[Enum], value: object, owner: str, name: str) -> Enum:
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in enum)  # type: ignore[attr-defined]
        raise ValueError(
            f"{owner}: {name} must be one of {choices}, got {value!r}."
        ) from None
