r"""A Laplace recipe whose every choice is made by data: :func:`calibrated`.

One call turns a trained network into a tuned Laplace posterior::

    post = recipes.calibrated(model, train_loader, val_loader)
    probs = post(x)  # [N, C] probabilities (regression: mean, variance [N, K])
    post             # the repr lists every choice and the data that made it

Every choice comes from the data the call is given, never from a constant fitted
to a benchmark:

* **Weights**: all of them (``subset="all"``). The subset is what the posterior is
  *over*, not a knob the data can judge: the Laplace evidence of a subset treats the
  other weights as fitted hyperparameters (an Occam factor over fewer weights), so it
  does not compare with the all-weights evidence, and an in-distribution validation
  split cannot see the shift a last-layer posterior misses (at its validation optimum
  it predicts like MAP). ``subset=`` overrides it.
* **Structure**: the largest Laplace evidence at temperature 1 among ``structures``
  (default KFAC and diagonal; Immer et al., 2021, compare structures this way).
* **Prior precision** (scalar: the isotropic prior that weight decay trains under)
  and, for regression, the noise ``sigma_noise``: maximized evidence (``marglik``),
  at every candidate temperature.
* **Posterior temperature and link approximation**: the validation negative log
  likelihood (NLL) over a log grid of temperatures (quarter decades from 1 down to
  ``1e-3``, extended until the best is inside the grid) and every link in ``links``.
  The chosen candidate is the warmest one whose validation NLL exceeds the best by at
  most one standard error of the paired per-sample differences, see
  ``NOTE [warmest within one standard error]``.
* **Sample count**: none; both default links are deterministic.

Without validation data (``val_loader=None``) the call relies on the evidence alone:
temperature 1 (the Bayesian posterior) and the probit approximation of its predictive
(MacKay, 1992). It does *not* carve a validation split out of the training data: the
model was trained on those samples, so their NLL is a training NLL that favours an
over-confident (too cold) posterior.

# NOTE [warmest within one standard error]
# The validation split is in-distribution; it cannot see shift or OOD inputs, where a
# too-cold posterior fails. Its NLL is flat around the optimum (differences far below
# the sampling noise), so the argmin is a coin toss among temperatures that predict
# the validation data equally well. Among those the recipe takes the most uncertain
# one -- the largest temperature whose mean NLL is at most one standard error of the
# paired differences above the best (the one-standard-error rule of Hastie et al.,
# Elements of Statistical Learning, Sec. 7.10, with "simplest" read as "closest to the
# prior"). The paired standard error is the right noise scale: all candidates are
# scored on the same samples.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from bayescurv import recipes
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> post = recipes.calibrated(model, [(x[:48], y[:48])], [(x[48:], y[48:])])
    >>> post(x).shape, post.choices.chosen_by
    (torch.Size([64, 3]), 'validation')
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bayescurv.laplace import BaseLaplace, Laplace

__all__ = ["CalibratedLaplace", "Candidate", "Choices", "calibrated"]

LIKELIHOODS = ("classification", "regression")
"""The likelihoods :func:`calibrated` supports."""
STRUCTURES = ("kron", "diag")
"""Default structures, compared by their evidence."""
LINKS = ("probit", "bridge_norm")
"""Default link approximations (classification), compared on validation."""
GRID_STEP = 0.25
"""Temperature grid spacing in decades."""
GRID_START = (0.0, -3.0)
"""First grid: ``10 ** 0`` down to ``10 ** -3`` (then extended, see below)."""
GRID_LIMITS = (3.0, -6.0)
"""The grid is never extended beyond ``10 ** 3`` and ``10 ** -6``."""


@dataclass(frozen=True)
class Candidate:
    """One configuration scored on the validation split.

    Attributes:
        temperature: Posterior temperature.
        link: Link approximation (``None`` for regression).
        val_nll: Mean validation NLL.
        paired_se: Standard error of the per-sample NLL differences to the best
            candidate (0 for the best itself).
        prior_precision: Prior precision maximizing the evidence at this temperature.
        sigma_noise: Regression noise maximizing the evidence (``None`` otherwise).
    """

    temperature: float
    link: str | None
    val_nll: float
    paired_se: float
    prior_precision: float
    sigma_noise: float | None


@dataclass(frozen=True)
class Choices:
    """What :func:`calibrated` chose, and by which data.

    Attributes:
        likelihood: ``"classification"`` or ``"regression"``.
        subset: The weights of the posterior.
        structure: The chosen Hessian structure.
        evidence: Log evidence at temperature 1 per compared structure.
        prior_precision: The scalar prior precision (by the evidence).
        sigma_noise: Regression noise (by the evidence), ``None`` otherwise.
        temperature: The posterior temperature.
        link: The link approximation (``None`` for regression).
        chosen_by: ``"validation"`` or ``"evidence"`` (no validation data).
        n_val: Validation samples (0 without validation data).
        val_nll: Validation NLL of the choice (``None`` without validation data).
        candidates: Every scored candidate, warmest first.
    """

    likelihood: str
    subset: str
    structure: str
    evidence: dict[str, float]
    prior_precision: float
    sigma_noise: float | None
    temperature: float
    link: str | None
    chosen_by: str
    n_val: int = 0
    val_nll: float | None = None
    candidates: tuple[Candidate, ...] = field(default=(), repr=False)


def _predict(
    la: BaseLaplace, link: str | None, x: Any
) -> Tensor | tuple[Tensor, Tensor]:
    """Probabilities ``[N, C]``, or mean and variance ``[N, K]`` of the targets."""
    if link is None:
        return la(x, noise=True, diagonal_output=True)
    return la(x, link_approx=link)


class CalibratedLaplace:
    """A fitted, tuned Laplace posterior and the choices that made it.

    Call it like a Laplace approximation: ``post(x)`` returns ``[N, C]``
    probabilities (classification) or the predictive mean and variance of the
    targets, ``[N, K]`` each, observation noise included (regression).

    Attributes:
        la: The fitted Laplace approximation (``la(x, ...)`` for other predictives).
        choices: The :class:`Choices`.
    """

    def __init__(self, la: BaseLaplace, choices: Choices) -> None:
        self.la = la
        self.choices = choices

    def __call__(self, x: Any) -> Tensor | tuple[Tensor, Tensor]:
        """The predictive on inputs ``x`` ``[N, ...]`` (see the class doc)."""
        return _predict(self.la, self.choices.link, x)

    def __repr__(self) -> str:
        c = self.choices
        evidence = ", ".join(f"{k} {v:.1f}" for k, v in c.evidence.items())
        lines = [
            f"likelihood={c.likelihood!r}, subset={c.subset!r}, "
            f"P={self.la.num_params:,}",
            f"structure={c.structure!r}  <- evidence at T=1 ({evidence})",
            f"prior_precision={c.prior_precision:.4g}  <- evidence at T="
            f"{c.temperature:.3g}",
        ]
        if c.sigma_noise is not None:
            lines.append(f"sigma_noise={c.sigma_noise:.4g}  <- evidence")
        if c.chosen_by == "validation":
            why = (
                f"validation NLL {c.val_nll:.4f} on {c.n_val} samples: warmest of "
                f"{len(c.candidates)} candidates within one paired SE of the best"
            )
            link_why = "validation"
        else:
            why = "no validation data: the evidence alone (Bayesian posterior)"
            link_why = "no validation data: the standard approximation"
        lines.append(f"temperature={c.temperature:.3g}  <- {why}")
        if c.link is not None:
            lines.append(f"link={c.link!r}  <- {link_why}")
        body = "".join(f"\n  {line}" for line in lines)
        return f"CalibratedLaplace({body}\n)"


def _check_loader(loader: Any, name: str) -> None:
    if not isinstance(loader, Iterable):
        raise TypeError(
            f"{name} must be a re-iterable of (inputs, targets) batches (a "
            f"DataLoader or a list), got {type(loader).__name__}."
        )
    if iter(loader) is loader:
        raise ValueError(
            f"{name} is an iterator and would be exhausted after one pass; pass a "
            "DataLoader or a list of (inputs, targets) batches."
        )


def _check_options(
    model: Any,
    likelihood: str,
    structures: Sequence[str],
    links: Sequence[str],
    temperatures: Sequence[float] | None,
) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
    if likelihood not in LIKELIHOODS:
        raise ValueError(
            f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r} (for a "
            "binary problem use 'classification' with two outputs)."
        )
    if not structures:
        raise ValueError("structures must name at least one Hessian structure.")
    if likelihood == "classification" and not links:
        raise ValueError("links must name at least one link approximation.")
    if temperatures is not None and (
        not temperatures or any(not t > 0 for t in temperatures)
    ):
        raise ValueError(
            f"temperatures must be positive numbers, got {list(temperatures)}."
        )


def _fit(
    model: nn.Module,
    train_loader: Iterable,
    likelihood: str,
    subset: str,
    structure: str,
    temperature: float,
) -> BaseLaplace:
    """A Laplace approximation fit on the training data, evidence-tuned."""
    la = Laplace(
        model,
        likelihood,
        subset_of_weights=subset,
        hessian_structure=structure,
        temperature=temperature,
    )
    la.fit(train_loader)
    la.optimize_prior_precision(
        method="marglik", tune_sigma_noise=likelihood == "regression"
    )
    return la


def _choose_structure(
    model: nn.Module,
    train_loader: Iterable,
    likelihood: str,
    subset: str,
    structures: Sequence[str],
) -> tuple[BaseLaplace, dict[str, float]]:
    """The structure with the largest evidence at ``T=1``, fitted, and all evidences."""
    fitted, evidence = {}, {}
    for structure in structures:
        la = _fit(model, train_loader, likelihood, subset, structure, 1.0)
        fitted[structure] = la
        evidence[structure] = la.log_marginal_likelihood().item()
    best = max(evidence, key=evidence.__getitem__)
    return fitted[best], evidence


def _validation_batches(val_loader: Iterable) -> list[tuple[Any, Tensor]]:
    """The validation ``(inputs, targets)`` pairs, checked once."""
    batches = []
    for batch in val_loader:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(
                "val_loader must yield (inputs, targets) pairs, got a "
                f"{type(batch).__name__}."
            )
        batches.append((batch[0], batch[1]))
    if not batches or sum(len(y) for _, y in batches) < 2:
        raise ValueError(
            "val_loader yielded fewer than 2 samples; the recipe needs a validation "
            "split to score temperatures (or pass val_loader=None)."
        )
    return batches


def _sample_nll(
    la: BaseLaplace, link: str | None, batches: list[tuple[Any, Tensor]]
) -> Tensor:
    """Per-sample validation NLL ``[N_val]`` (float64) of a predictive."""
    parts = []
    for x, y in batches:
        prediction = _predict(la, link, x)
        if link is None:
            parts.append(_gaussian_nll(*prediction, y))
        else:
            parts.append(_class_nll(prediction, y))
    return torch.cat(parts).double()


def _gaussian_nll(mean: Tensor, var: Tensor, y: Tensor) -> Tensor:
    if y.numel() != mean.numel():
        raise ValueError(
            f"regression validation targets must have the model's output shape "
            f"{tuple(mean.shape)}, got {tuple(y.shape)}."
        )
    target = y.reshape(mean.shape).to(mean)
    log_2pi = math.log(2 * math.pi)
    return 0.5 * ((target - mean).square() / var + var.log() + log_2pi).sum(-1)


def _class_nll(probs: Tensor, y: Tensor) -> Tensor:
    classes = probs.shape[-1]
    y = y.to(probs.device)
    if y.dtype.is_floating_point or y.ndim != 1 or len(y) != len(probs):
        raise ValueError(
            f"classification validation targets must be [N] class indices, got "
            f"dtype {y.dtype} and shape {tuple(y.shape)} for {len(probs)} inputs."
        )
    if bool(((y < 0) | (y >= classes)).any()):
        raise ValueError(
            f"validation targets must lie in [0, {classes}) for a model with "
            f"{classes} outputs, got values {y.min().item()} to {y.max().item()}."
        )
    return -probs.gather(1, y[:, None]).squeeze(1).clamp_min(1e-12).log()


class _TemperatureSearch:
    """Scores ``(temperature, link)`` candidates on the validation batches.

    Args:
        fit_at: Fits the evidence-tuned Laplace approximation at a temperature.
        batches: The validation ``(inputs, targets)`` pairs.
        links: Links to score (``(None,)`` for regression).
    """

    def __init__(self, fit_at, batches, links) -> None:
        self.fit_at = fit_at
        self.batches = batches
        self.links = links
        self.fitted: dict[float, BaseLaplace] = {}
        self.nll: dict[tuple[float, str | None], Tensor] = {}

    def add(self, temperature: float, la: BaseLaplace | None = None) -> None:
        """Fit at ``temperature`` (unless ``la`` is given) and score every link."""
        la = self.fit_at(temperature) if la is None else la
        self.fitted[temperature] = la
        for link in self.links:
            self.nll[temperature, link] = _sample_nll(la, link, self.batches)

    def best(self) -> tuple[float, str | None]:
        """The candidate with the smallest mean validation NLL."""
        return min(self.nll, key=lambda key: self.nll[key].mean().item())

    def paired_se(self, key: tuple[float, str | None]) -> tuple[float, float]:
        """Mean and standard error of the NLL differences of ``key`` to the best."""
        diff = self.nll[key] - self.nll[self.best()]
        return diff.mean().item(), diff.std().item() / math.sqrt(len(diff))

    def chosen(self) -> tuple[float, str | None]:
        """The warmest candidate within one paired standard error of the best."""
        admissible = []
        for key in self.nll:
            mean, se = self.paired_se(key)
            if mean <= se:
                admissible.append(key)
        return max(admissible, key=lambda k: (k[0], -self.nll[k].mean().item()))

    def candidates(self) -> tuple[Candidate, ...]:
        """Every scored candidate, warmest first."""
        rows = []
        for key in sorted(self.nll, key=lambda k: (-k[0], str(k[1]))):
            la = self.fitted[key[0]]
            rows.append(
                Candidate(
                    temperature=key[0],
                    link=key[1],
                    val_nll=self.nll[key].mean().item(),
                    paired_se=self.paired_se(key)[1],
                    prior_precision=la.prior_precision.item(),
                    sigma_noise=_sigma(la),
                )
            )
        return tuple(rows)


def _sigma(la: BaseLaplace) -> float | None:
    if la.likelihood.value != "regression":
        return None
    return la.sigma_noise.item()


def _grid_search(
    search: _TemperatureSearch, temperatures: Sequence[float] | None
) -> None:
    """Score the temperature grid, extended while the choice is at one of its ends.

    With explicit ``temperatures`` exactly those are scored. Otherwise the grid
    (:data:`GRID_STEP` decades apart, from :data:`GRID_START`) grows colder while the
    best candidate is the coldest, and warmer while the chosen one is the warmest,
    within :data:`GRID_LIMITS`.
    """
    if temperatures is not None:
        for t in temperatures:
            if float(t) not in search.fitted:
                search.add(float(t))
        return
    steps = round((GRID_START[0] - GRID_START[1]) / GRID_STEP)
    warm, cold = 0, steps
    for k in range(warm, cold + 1):
        if _temperature(k) not in search.fitted:
            search.add(_temperature(k))
    limits = [round(-lim / GRID_STEP) for lim in GRID_LIMITS]
    while True:
        if search.best()[0] == _temperature(cold) and cold < limits[1]:
            cold += 1
            search.add(_temperature(cold))
        elif search.chosen()[0] == _temperature(warm) and warm > limits[0]:
            warm -= 1
            search.add(_temperature(warm))
        else:
            return


def _temperature(k: int) -> float:
    """The ``k``-th grid temperature, ``10 ** (-k * GRID_STEP)``."""
    return 10.0 ** (-k * GRID_STEP)


def calibrated(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable | None = None,
    likelihood: str = "classification",
    *,
    subset: str = "all",
    structures: Sequence[str] = STRUCTURES,
    links: Sequence[str] = LINKS,
    temperatures: Sequence[float] | None = None,
) -> CalibratedLaplace:
    """A Laplace posterior of ``model`` with every choice made by the given data.

    See the module doc for what is chosen and how. The model is left unchanged
    (it is put in eval mode); nothing is random, so the same data give the same
    posterior.

    Args:
        model: A trained network (the MAP), outputs ``[N, C]`` logits or ``[N, K]``
            regression means.
        train_loader: Its training batches ``(x, y)`` (re-iterable): the curvature
            and the evidence.
        val_loader: Held-out batches ``(x, y)`` the model was *not* trained on:
            temperature and link. ``None``: the evidence alone (module doc).
        likelihood: ``"classification"`` or ``"regression"``.
        subset: ``subset_of_weights`` of the posterior (default ``"all"``).
        structures: Hessian structures compared by their evidence.
        links: Link approximations compared on validation (classification).
        temperatures: Score exactly these temperatures instead of the grid.

    Returns:
        The :class:`CalibratedLaplace`; ``post(x)`` predicts, ``repr(post)`` and
        ``post.choices`` tell what was chosen.

    Raises:
        TypeError: If ``model`` is not a module or a loader is not iterable.
        ValueError: For an unknown likelihood, empty ``structures`` or ``links``,
            non-positive temperatures, a one-pass iterator as a loader, an empty
            validation split or validation targets that do not fit the model.
    """
    _check_options(model, likelihood, structures, links, temperatures)
    _check_loader(train_loader, "train_loader")
    if val_loader is not None:
        _check_loader(val_loader, "val_loader")
    base, evidence = _choose_structure(
        model, train_loader, likelihood, subset, structures
    )
    structure = base.hessian_structure.value
    links = tuple(links) if likelihood == "classification" else (None,)
    common = {"likelihood": likelihood, "subset": subset, "structure": structure}
    if val_loader is None:
        link = "probit" if "probit" in links else links[0]
        choices = Choices(
            **common, evidence=evidence, prior_precision=base.prior_precision.item(),
            sigma_noise=_sigma(base), temperature=1.0, link=link, chosen_by="evidence",
        )  # fmt: skip
        return CalibratedLaplace(base, choices)
    batches = _validation_batches(val_loader)
    search = _TemperatureSearch(
        lambda t: _fit(model, train_loader, likelihood, subset, structure, t),
        batches,
        links,
    )
    if temperatures is None or 1.0 in [float(t) for t in temperatures]:
        search.add(1.0, base)
    _grid_search(search, temperatures)
    temperature, link = search.chosen()
    la = search.fitted[temperature]
    choices = Choices(
        **common, evidence=evidence, prior_precision=la.prior_precision.item(),
        sigma_noise=_sigma(la), temperature=temperature, link=link,
        chosen_by="validation", n_val=len(search.nll[temperature, link]),
        val_nll=search.nll[temperature, link].mean().item(),
        candidates=search.candidates(),
    )  # fmt: skip
    return CalibratedLaplace(la, choices)
