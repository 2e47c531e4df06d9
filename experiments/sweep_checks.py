r"""Problems, fits and dense float64 references for the adversarial sweep.

A posterior is judged against the dense ``torch.func`` GGN of a float64 copy of the
model (:mod:`bayescurv.engine.reference`): ``full`` must match
:math:`s G + \operatorname{diag}(\pi)`, ``diag`` its diagonal, and the GLM variance
:math:`J \Lambda^{-1} J^\top`; ``kron`` and ``lowrank`` (approximations) must give
finite, positive variances and a finite evidence.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bayescurv import Laplace
from bayescurv.engine import reference

F64 = torch.float64
OUTPUTS = {"classification": 3, "regression": 2, "binary": 2}


class SilentWrong(AssertionError):
    """A result that should have been an error, or is off the dense reference."""


@dataclass
class Case:
    """One adversarial case.

    Attributes:
        family: The group in the report.
        name: What the case does.
        run: Runs it; returns a note, raises :class:`SilentWrong` for a wrong
            result (any other exception is classified by the sweep).
        expect: ``"ok"`` (a result), ``"error"`` (a refusal) or ``"either"`` (a
            result that matches the reference, or a clear refusal).
        match: A regular expression the refusal's message must match.
        warns: A regular expression a warning must match.
    """

    family: str
    name: str
    run: Callable[[], str | None]
    expect: str = "ok"
    match: str | None = None
    warns: str | None = None
    tags: dict[str, Any] = field(default_factory=dict)


def mlp(likelihood: str, dtype: torch.dtype = F64, seed: int = 0) -> nn.Module:
    """A tanh MLP ``3 -> 5 -> C``."""
    torch.manual_seed(seed)
    out = OUTPUTS[likelihood]
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, out)).to(dtype)


def data(
    likelihood: str, n: int = 12, dtype: torch.dtype = F64, seed: int = 0, d: int = 3
) -> tuple[Tensor, Tensor]:
    """Random inputs ``[n, d]`` and targets that fit the likelihood."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    out = OUTPUTS[likelihood]
    if likelihood == "classification":
        return x, torch.randint(0, out, (n,), generator=gen)
    if likelihood == "binary":
        return x, torch.randint(0, 2, (n, out), generator=gen).to(dtype)
    return x, torch.randn(n, out, generator=gen, dtype=dtype)


def fitted(
    model: nn.Module,
    likelihood: str,
    subset: str,
    structure: str,
    loader: Any,
    **kwargs: Any,
) -> Laplace:
    """A fitted posterior."""
    la = Laplace(model, likelihood, subset, structure, **kwargs)
    la.fit(loader)
    return la


def _unit_loss(likelihood: str) -> tuple[nn.Module, float]:
    if likelihood == "classification":
        return nn.CrossEntropyLoss(reduction="sum"), 1.0
    if likelihood == "binary":
        return nn.BCEWithLogitsLoss(reduction="sum"), 1.0
    return nn.MSELoss(reduction="sum"), 0.5


def _double(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.double() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_double(v) for v in value)
    return value


def reference_precision(la: Laplace, model: nn.Module, x: Any, y: Tensor) -> Tensor:
    r""":math:`s G + \operatorname{diag}(\pi)` of the subset from ``torch.func``."""
    copy64 = copy.deepcopy(model).double()
    loss, factor = _unit_loss(la.likelihood.value)
    ggn = factor * reference.ggn(copy64, loss, _double(x), _double(y))
    index = reference.positions(copy64, list(la.state.source.parameters))
    ggn = ggn[index][:, index]
    sigma = la.sigma_noise.double()
    sigma = sigma if sigma.ndim == 0 else sigma[0]
    scale = 1.0 / (la.temperature * sigma.square())
    if la.likelihood.value != "regression":
        scale = 1.0 / la.temperature
    return scale * ggn + torch.diag(la.prior_precision_diag.double())


def reference_variance(
    la: Laplace, model: nn.Module, x: Any, precision: Tensor
) -> Tensor:
    r""":math:`J \Lambda^{-1} J^\top` per sample, ``[N, C, C]``."""
    copy64 = copy.deepcopy(model).double()
    jac = reference.jacobian(copy64, _double(x))
    index = reference.positions(copy64, list(la.state.source.parameters))
    jac = jac[..., index]
    return jac @ torch.linalg.solve(precision, jac.mT)


def rel_error(actual: Tensor, expected: Tensor) -> float:
    """Frobenius norm of the difference over that of ``expected``."""
    diff = (actual.double() - expected.double()).norm()
    return float(diff / expected.double().norm().clamp_min(1e-300))


def check_posterior(
    la: Laplace, model: nn.Module, x: Any, y: Tensor, tol: float = 1e-6
) -> str:
    """Compare a fitted posterior with the dense reference (see the module doc).

    Raises:
        SilentWrong: If a result is off or not finite.
    """
    evidence = la.log_marginal_likelihood()
    if not bool(torch.isfinite(evidence)):
        raise SilentWrong(f"evidence is {float(evidence)}")
    variance = la.posterior_variance
    if not bool(torch.isfinite(variance).all()) or not bool((variance > 0).all()):
        raise SilentWrong("posterior variance not finite and positive")
    structure = la.hessian_structure.value
    if structure not in ("full", "diag"):
        return f"{structure}: finite evidence and variances"
    expected = reference_precision(la, model, x, y)
    if structure == "diag":
        err = rel_error(la.posterior_precision, expected.diagonal())
        _check(err, tol, "diag precision")
        return f"diag precision rel. err {err:.1e}"
    err = rel_error(la.posterior_precision, expected)
    _check(err, tol, "precision")
    with torch.no_grad():
        output = model(*x) if isinstance(x, tuple) else model(x)
    if output.ndim != 2:
        return f"precision rel. err {err:.1e}"
    glm = la.glm_moments(x)[1]
    err_var = rel_error(glm, reference_variance(la, model, x, expected))
    _check(err_var, tol, "GLM variance")
    return f"precision rel. err {err:.1e}, GLM variance {err_var:.1e}"


def _check(err: float, tol: float, what: str) -> None:
    if not err <= tol:
        raise SilentWrong(f"{what} off the dense float64 reference: rel. err {err:.2e}")
