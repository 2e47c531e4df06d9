r"""The Laplace posterior over a weight subset, with any curvature structure.

:class:`BaseLaplace` holds everything that does not depend on the subset: the fit
loop, the hyperparameters, the evidence and the state. A subclass per subset (all
weights, last layer, subnetwork; :mod:`bayescurv.laplace.subsets`) only supplies its
:class:`~bayescurv.laplace.sources.CurvatureSource`; the structure is a builder
(:mod:`bayescurv.laplace.structures`) producing a :mod:`bayescurv.curvature` object.

With the data term :math:`H` (the GGN of the unit loss, see
:mod:`bayescurv.laplace.likelihoods`), temperature :math:`T` and prior
:math:`\mathcal{N}(\mu_0, \operatorname{diag}(\pi)^{-1})` the posterior is
:math:`\mathcal{N}(\theta_*, \Lambda^{-1})` with

.. math::
    \Lambda = \frac{1}{T \sigma^2} H + \operatorname{diag}(\pi)

(:math:`\sigma = 1` unless regression), and the Laplace evidence is

.. math::
    \log p(\mathcal{D}) \approx \log p(\mathcal{D} \mid \theta_*)
    - \tfrac12 \big( \log\det\Lambda - \textstyle\sum_i \log \pi_i \big)
    - \tfrac12 (\theta_* - \mu_0)^\top \operatorname{diag}(\pi) (\theta_* - \mu_0).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bayescurv.curvature import CurvatureMatrix
from bayescurv.laplace import evidence, fitting, hyper, state
from bayescurv.laplace.data import BatchReader
from bayescurv.laplace.enums import (
    HessianStructure,
    Likelihood,
    LinkApprox,
    PredType,
    PriorStructure,
    SubsetOfWeights,
    TuningMethod,
    parse,
)
from bayescurv.laplace.likelihoods import LikelihoodModel
from bayescurv.laplace.prediction import Predictive
from bayescurv.laplace.sources import CurvatureSource, SourceOptions
from bayescurv.laplace.structures import StructureBuilder

DEFAULT_RANK = 10
"""Default number of eigenpairs of ``hessian_structure="lowrank"``."""


class NotFittedError(RuntimeError):
    """A quantity that needs ``fit()`` was requested before it."""


class BaseLaplace(Predictive):
    r"""Laplace approximation over one weight subset; see the module doc.

    Args:
        model: A trained ``nn.Module`` (at the MAP); left unchanged except that
            ``fit`` puts it in eval mode.
        likelihood: ``"classification"``, ``"regression"`` or ``"binary"``.
        hessian_structure: ``"full"``, ``"kron"``, ``"diag"`` or ``"lowrank"``.
        sigma_noise: Regression noise :math:`\sigma`, a scalar or ``[K]``.
        prior_precision: :math:`\pi`, a scalar, ``[B]`` (per parameter tensor) or
            ``[P]``.
        prior_mean: :math:`\mu_0`, a scalar or ``[P]``.
        temperature: :math:`T` (``< 1`` sharpens the posterior).
        enable_backprop: Predictions differentiable w.r.t. the inputs.
        dict_key_x: Input key of dict batches.
        dict_key_y: Target key of dict batches.
        stochastic: Monte Carlo GGN (``DiagGGNMC``, ``KFAC``, ``SqrtGGNMC``) instead
            of the exact one (laplace-torch's backend option of that name).
        mc_samples: Monte Carlo columns per sample when ``stochastic``.
        rank: Eigenpairs of ``"lowrank"``.
        generator: Random generator of Monte Carlo draws and ``lowrank``'s start.
        memory_budget: Bytes per chunk of square-root columns and Jacobians.
        backend_kwargs: laplace-torch compatibility: ``{"stochastic": bool}``.

    Raises:
        ValueError: For an unknown option (the message lists the valid values) or
            invalid hyperparameters.
    """

    subset: ClassVar[SubsetOfWeights]

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        hessian_structure: HessianStructure | str = HessianStructure.KRON,
        sigma_noise: hyper.Number = 1.0,
        prior_precision: hyper.Number = 1.0,
        prior_mean: hyper.Number = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        *,
        stochastic: bool = False,
        mc_samples: int = 1,
        rank: int = DEFAULT_RANK,
        generator: torch.Generator | None = None,
        memory_budget: int = 2**28,
        backend_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
        self.model = model
        self.likelihood = parse(Likelihood, likelihood, "likelihood")
        self.hessian_structure = parse(
            HessianStructure, hessian_structure, "hessian_structure"
        )
        if self.hessian_structure is HessianStructure.GP:
            raise ValueError(
                "hessian_structure='gp' is not available yet; use 'full', 'kron', "
                "'diag' or 'lowrank'."
            )
        stochastic = bool((backend_kwargs or {}).get("stochastic", stochastic))
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}.")
        self.rank = rank
        self.options = SourceOptions(stochastic, mc_samples, generator, memory_budget)
        self.temperature = hyper.temperature(temperature)
        self.enable_backprop = enable_backprop
        self.dict_key_x, self.dict_key_y = dict_key_x, dict_key_y
        self._lik = LikelihoodModel(self.likelihood)
        self.source: CurvatureSource = self._make_source()
        self._builder: StructureBuilder | None = None
        self._H: CurvatureMatrix | None = None
        self._posterior: CurvatureMatrix | None = None
        self.mean: Tensor | None = None
        self.loss: Tensor = self._like.new_zeros(())
        self.n_data, self.n_outputs = 0, 0
        self._sigma_fit: Tensor | None = None
        self.sigma_noise = sigma_noise
        self.prior_precision = prior_precision
        self.prior_mean = prior_mean

    # -------------------------------------------------------- subset-specific
    def _make_source(self) -> CurvatureSource:
        raise NotImplementedError

    def _prepare(self, inputs: Any) -> None:
        """Called with the first batch of a fit (e.g. to find the last layer)."""

    # ------------------------------------------------------------- helpers
    @property
    def _like(self) -> Tensor:
        """A tensor with the model's dtype and device."""
        if self.mean is not None:
            return self.mean
        param = next(self.model.parameters(), None)
        return torch.empty(0) if param is None else param.detach()

    @property
    def _device(self) -> torch.device:
        return self._like.device

    @property
    def _reader(self) -> BatchReader:
        return BatchReader(self.dict_key_x, self.dict_key_y, self._device)

    @property
    def is_fitted(self) -> bool:
        """Whether ``fit`` (or ``load_state_dict``) has run."""
        return self._H is not None

    def _check_fitted(self, what: str) -> None:
        if not self.is_fitted:
            raise NotFittedError(
                f"{type(self).__name__}.{what} needs a fitted Laplace approximation; "
                "call fit(train_loader) first."
            )

    def _block_sizes(self) -> list[int] | None:
        if self.is_fitted:
            return list(self._H.block_sizes)
        try:
            return self.source.block_sizes
        except RuntimeError:  # last layer not found yet
            return None

    # ------------------------------------------------------- hyperparameters
    @property
    def prior_precision(self) -> Tensor:
        r"""The prior precision :math:`\pi`: 0-d, ``[B]`` or ``[P]``."""
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value: hyper.Number) -> None:
        self._prior_precision = hyper.prior_precision(
            value, self._like, self._block_sizes()
        ).detach()
        self._posterior = None

    @property
    def prior_mean(self) -> Tensor:
        r"""The prior mean :math:`\mu_0`: 0-d or ``[P]``."""
        return self._prior_mean

    @prior_mean.setter
    def prior_mean(self, value: hyper.Number) -> None:
        sizes = self._block_sizes()
        num = None if sizes is None else sum(sizes)
        self._prior_mean = hyper.prior_mean(value, self._like, num).detach()

    @property
    def sigma_noise(self) -> Tensor:
        r"""The regression noise :math:`\sigma`: 0-d or ``[K]`` (1 otherwise)."""
        return self._sigma_noise

    @sigma_noise.setter
    def sigma_noise(self, value: hyper.Number) -> None:
        tensor = hyper.sigma_noise(value, self._like, self.n_outputs or None)
        if self.likelihood is not Likelihood.REGRESSION and not bool(
            (tensor.detach() == 1).all()
        ):
            raise ValueError(
                f"sigma_noise is a regression parameter; likelihood="
                f"'{self.likelihood.value}' needs sigma_noise=1."
            )
        if self._sigma_fit is not None:
            self._check_noise(tensor)
        self._sigma_noise = tensor.detach()
        self._posterior = None

    def _check_noise(self, sigma: Tensor) -> None:
        """A per-output noise may change after ``fit`` by a common factor only."""
        fit, new = self._sigma_fit, sigma.detach()
        if fit.ndim == 0 and new.ndim == 0:
            return
        ratio = new.expand(self.n_outputs) / fit.expand(self.n_outputs)
        if not torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-5):
            raise ValueError(
                "a per-output sigma_noise enters the curvature at fit(); after it, "
                "sigma_noise may only change by a common factor (refit for other "
                "noise ratios)."
            )

    def _scale(self, sigma: Tensor) -> Tensor:
        r"""Data-term scale :math:`1 / (T \sigma_1^2)` (see the likelihoods doc)."""
        if self.likelihood is not Likelihood.REGRESSION:
            return self._like.new_tensor(1.0 / self.temperature)
        self._check_noise(sigma)
        first = sigma if sigma.ndim == 0 else sigma[0]
        return 1.0 / (self.temperature * first.square())

    # ------------------------------------------------------------------ fit
    def fit(
        self, train_loader: Iterable, override: bool = True, progress_bar: bool = False
    ) -> None:
        """Accumulate the curvature and the loss over ``train_loader`` at the MAP.

        The model is put in eval mode; its parameters, ``requires_grad`` flags and
        ``.grad`` are left unchanged. On an error the previous fit is kept.

        Args:
            train_loader: Batches ``(x, y)`` or dicts with ``dict_key_x``,
                ``dict_key_y`` (a ``DataLoader`` or a list); moved to the model's
                device.
            override: Start afresh (``True``) or add to the earlier fit.
            progress_bar: Show a tqdm progress bar.

        Raises:
            ValueError: For an empty loader, targets that do not fit the
                likelihood, NaN or inf curvature, or ``override=False`` with
                ``lowrank``.
        """
        fitting.fit(self, train_loader, override, progress_bar)

    # ------------------------------------------------------------ posterior
    def _precision(
        self, prior: Tensor | None = None, sigma: Tensor | None = None
    ) -> CurvatureMatrix:
        self._check_fitted("posterior_precision")
        if prior is None and sigma is None and self._posterior is not None:
            return self._posterior
        prior = self._prior_precision if prior is None else prior
        sigma = self._sigma_noise if sigma is None else sigma
        posterior = self._H.scaled(self._scale(sigma)).add_prior(prior)
        if not (prior.requires_grad or sigma.requires_grad):
            self._posterior = posterior
        return posterior

    @property
    def posterior_precision(self) -> CurvatureMatrix:
        r""":math:`\Lambda` as a :mod:`bayescurv.curvature` object (``.dense()``)."""
        return self._precision()

    @property
    def posterior_covariance(self) -> Tensor:
        r""":math:`\Lambda^{-1}`, dense ``[P, P]``."""
        return self._precision().inverse()

    @property
    def posterior_variance(self) -> Tensor:
        r"""Marginal variances :math:`\operatorname{diag}(\Lambda^{-1})`, ``[P]``."""
        return self._precision().inverse_diagonal()

    @property
    def num_params(self) -> int:
        """``P``, the number of weights with a posterior."""
        self._check_fitted("num_params")
        return self._H.num_params

    def sample(
        self, n_samples: int = 100, generator: torch.Generator | None = None
    ) -> Tensor:
        r"""Draws from :math:`\mathcal{N}(\theta_*, \Lambda^{-1})`, ``[n, P]``."""
        return self.mean + self._precision().sample(n_samples, generator)

    def functional_variance(self, Js: Tensor) -> Tensor:
        r""":math:`J_n \Lambda^{-1} J_n^\top` for Jacobians ``[N, C, P]``, per sample.

        The GLM predictive's covariance per sample (laplace-torch's name).
        """
        return self._precision().inv_quad_form_batch(Js)

    def functional_covariance(self, Js: Tensor) -> Tensor:
        r"""Joint :math:`J \Lambda^{-1} J^\top` over all outputs, ``[NC, NC]``."""
        flat = Js.reshape(1, -1, Js.shape[-1])
        return self._precision().inv_quad_form_batch(flat)[0]

    # -------------------------------------------------------------- evidence
    @property
    def log_det_ratio(self) -> Tensor:
        r""":math:`\log\det\Lambda - \sum_i \log \pi_i`."""
        prior = self._prior_precision
        return self._precision().logdet() - evidence.log_prior_det(self, prior)

    @property
    def scatter(self) -> Tensor:
        r"""The prior scatter of the MAP.

        .. math:: (\theta_* - \mu_0)^\top \operatorname{diag}(\pi)(\theta_* - \mu_0)
        """
        self._check_fitted("scatter")
        return evidence.scatter(self, self._prior_precision)

    @property
    def log_likelihood(self) -> Tensor:
        r""":math:`\log p(\mathcal{D} \mid \theta_*)`, tempered (see likelihoods)."""
        self._check_fitted("log_likelihood")
        return self._lik.log_likelihood(
            self.loss, self.n_data, self.n_outputs, self._sigma_noise, self.temperature
        )

    def log_marginal_likelihood(
        self,
        prior_precision: hyper.Number | None = None,
        sigma_noise: hyper.Number | None = None,
    ) -> Tensor:
        r"""The Laplace evidence (module doc), differentiable in both arguments.

        As in laplace-torch, given values become the current ``prior_precision``
        and ``sigma_noise`` (stored detached). Costs :math:`O(P)` per new value
        once the structure is decomposed (scalar priors for ``full``; any prior
        for ``kron`` and ``diag``).

        Args:
            prior_precision: :math:`\pi` (default: the current one).
            sigma_noise: :math:`\sigma` (regression; default: the current one).

        Returns:
            A 0-d tensor.
        """
        return evidence.log_marginal_likelihood(self, prior_precision, sigma_noise)

    # ------------------------------------------------------- tuning and state
    def optimize_prior_precision(
        self,
        pred_type: PredType | str = PredType.GLM,
        method: TuningMethod | str = TuningMethod.MARGLIK,
        n_steps: int = 100,
        lr: float = 1e-1,
        init_prior_prec: float | Tensor = 1.0,
        prior_structure: PriorStructure | str = PriorStructure.SCALAR,
        val_loader: Iterable | None = None,
        loss: evidence.Loss | None = None,
        log_prior_prec_min: float = -4,
        log_prior_prec_max: float = 4,
        grid_size: int = 100,
        link_approx: LinkApprox | str = LinkApprox.PROBIT,
        n_samples: int = 100,
        verbose: bool = False,
        progress_bar: bool = False,
        log_prior_prec_base: float = 10.0,
        tune_sigma_noise: bool = False,
    ) -> list[float] | None:
        """Tune the prior precision (laplace-torch's arguments), see :mod:`.evidence`.

        Args:
            pred_type: Predictive of ``gridsearch`` (``"glm"``).
            method: ``"marglik"`` (evidence) or ``"gridsearch"`` (validation loss).
            n_steps: Adam steps of ``marglik``.
            lr: Adam learning rate on the log prior precision.
            init_prior_prec: Start of ``marglik``; a number is broadcast to
                ``prior_structure``.
            prior_structure: ``"scalar"``, ``"layerwise"`` (per parameter tensor) or
                ``"diag"`` (per parameter).
            val_loader: Validation batches of ``gridsearch``.
            loss: ``loss(prediction, y)`` of ``gridsearch`` (default: the predictive
                negative log likelihood).
            log_prior_prec_min: Grid start exponent.
            log_prior_prec_max: Grid end exponent.
            grid_size: Grid points.
            link_approx: Link approximation of ``gridsearch``.
            n_samples: Samples for ``link_approx="mc"``.
            verbose: Print the result.
            progress_bar: Show a tqdm progress bar.
            log_prior_prec_base: Base of the grid.
            tune_sigma_noise: Regression, ``marglik``: tune ``sigma_noise`` jointly
                (a scalar freely, a per-output one by a common factor).

        Returns:
            The negative evidence per Adam step (``marglik``), else ``None``.
        """
        return evidence.optimize_prior_precision(
            self,
            pred_type,
            method,
            n_steps,
            lr,
            init_prior_prec,
            prior_structure,
            val_loader,
            loss,
            log_prior_prec_min,
            log_prior_prec_max,
            grid_size,
            link_approx,
            n_samples,
            verbose,
            progress_bar,
            log_prior_prec_base,
            tune_sigma_noise,
        )

    def state_dict(self) -> dict[str, Any]:
        """The fitted state (plain tensors and strings, see :mod:`.state`)."""
        return state.state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved with :meth:`state_dict` (no refit, no decomposition).

        Raises:
            ValueError: If the state belongs to another configuration.
        """
        state.load_state_dict(self, state_dict)

    def __repr__(self) -> str:
        fitted = f"P={self.num_params}" if self.is_fitted else "not fitted"
        return (
            f"{type(self).__name__}(likelihood='{self.likelihood.value}', "
            f"hessian_structure='{self.hessian_structure.value}', {fitted})"
        )
