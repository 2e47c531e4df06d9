r"""The Laplace posterior over a weight subset, with any curvature structure.

:class:`BaseLaplace` is a thin object around two immutable values: the
:class:`~bayescurv.laplace.state.FittedState` that :meth:`BaseLaplace.fit` produces
and the :class:`~bayescurv.laplace.state.Hyperparameters`. Everything else is a
function of the pair: the posterior precision
(:func:`~bayescurv.laplace.state.posterior_precision`), the evidence
(:mod:`bayescurv.laplace.tune.evidence`), the predictive
(:mod:`bayescurv.laplace.predict`), tuning (:mod:`bayescurv.laplace.tune`) and the
saved state (:mod:`bayescurv.laplace.serialization`). A subclass per weight subset
(all weights, last layer, subnetwork; :mod:`bayescurv.laplace.subsets`) only says
where the curvature comes from (its
:class:`~bayescurv.laplace.sources.CurvatureSource`).

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

import functools
import math
from collections.abc import Iterable
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bayescurv.curvature import CurvatureMatrix
from bayescurv.engine.memory import Estimate, check_estimates
from bayescurv.laplace import hyper, serialization
from bayescurv.laplace.boundary import as_generator
from bayescurv.laplace.data import BatchReader
from bayescurv.laplace.distributed import communicator
from bayescurv.laplace.enums import (
    CurvatureType,
    HessianStructure,
    Likelihood,
    LinkApprox,
    PredType,
    PriorStructure,
    SubsetOfWeights,
    TuningMethod,
    parse,
)
from bayescurv.laplace.fit import FitPlan, fit_state
from bayescurv.laplace.laplace_torch import forms
from bayescurv.laplace.likelihoods import LikelihoodModel
from bayescurv.laplace.predict import predictive
from bayescurv.laplace.sources import CurvatureSource, SourceOptions
from bayescurv.laplace.state import (
    FittedState,
    Hyperparameters,
    check_noise_ratio,
    posterior_precision,
)
from bayescurv.laplace.tune import evidence, gridsearch, prior

DEFAULT_RANK = 10
"""Default number of eigenpairs of ``hessian_structure="lowrank"``."""


class NotFittedError(RuntimeError):
    """A quantity that needs ``fit()`` was requested before it."""


class BaseLaplace:
    r"""Laplace approximation over one weight subset; see the module doc.

    The positional arguments are laplace-torch's (``BaseLaplace``), so its calls work
    unchanged; the structure is a keyword.

    Args:
        model: A trained ``nn.Module`` (at the MAP); left unchanged except that
            ``fit`` puts it in eval mode. A ``DistributedDataParallel`` wrapper is
            unwrapped.
        likelihood: ``"classification"``, ``"regression"`` or ``"binary"``.
        sigma_noise: Regression noise :math:`\sigma`, a scalar or ``[K]``.
        prior_precision: :math:`\pi`, a scalar, ``[B]`` (per parameter tensor) or
            ``[P]``.
        prior_mean: :math:`\mu_0`, a scalar or ``[P]``.
        temperature: :math:`T` (``< 1`` sharpens the posterior).
        enable_backprop: Predictions differentiable w.r.t. the inputs.
        dict_key_x: Input key of dict batches.
        dict_key_y: Target key of dict batches.
        backend: laplace-torch's curvature backend class (e.g. ``BackPackGGN``,
            ``CurvlinopsEF``, ``AsdlHessian``): it selects the curvature it implies
            (GGN, empirical Fisher or Hessian), always computed by bayescurv's
            engine; :attr:`backend` is an instance of it.
        backend_kwargs: laplace-torch compatibility: ``{"stochastic": bool,
            "num_samples": int}``.
        asdl_fisher_kwargs: laplace-torch compatibility: accepted and ignored.
        hessian_structure: ``"full"``, ``"kron"``, ``"diag"`` or ``"lowrank"``.
        curvature: ``"ggn"`` (default), ``"ef"`` (empirical Fisher) or
            ``"hessian"``; set by ``backend`` if one is given.
        stochastic: Monte Carlo GGN (``DiagGGNMC``, ``KFAC``, ``SqrtGGNMC``) instead
            of the exact one (laplace-torch's backend option of that name).
        mc_samples: Monte Carlo columns per sample when ``stochastic``.
        rank: Eigenpairs of ``"lowrank"``.
        generator: Random generator of Monte Carlo draws and ``lowrank``'s start.
        memory_budget: Bytes per chunk of square-root columns and Jacobians.
        curvature_dtype: The dtype the curvature is accumulated and decomposed in
            (default float64, see the NOTE on float64 curvature); ``None``: the
            model's. Results are returned in the model's dtype.
        max_memory: Bytes the structure and dense results (covariance, joint
            predictive) may take; checked before allocating (``None``: a share of
            the memory available, see :mod:`bayescurv.engine.memory`).

    Raises:
        ValueError: For an unknown option (the message lists the valid values) or
            invalid hyperparameters.
    """

    subset: ClassVar[SubsetOfWeights]
    function_space: ClassVar[bool] = False
    """Whether the class is a function-space posterior (``hessian_structure="gp"``)."""

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        sigma_noise: hyper.Number = 1.0,
        prior_precision: hyper.Number = 1.0,
        prior_mean: hyper.Number = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: Any = None,
        backend_kwargs: dict[str, Any] | None = None,
        asdl_fisher_kwargs: dict[str, Any] | None = None,
        *,
        hessian_structure: HessianStructure | str = HessianStructure.KRON,
        curvature: CurvatureType | str = CurvatureType.GGN,
        stochastic: bool = False,
        mc_samples: int = 1,
        rank: int = DEFAULT_RANK,
        generator: torch.Generator | None = None,
        memory_budget: int = 2**28,
        curvature_dtype: torch.dtype | None = torch.float64,
        max_memory: int | None = None,
    ) -> None:
        del asdl_fisher_kwargs
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module  # the wrapped model; fit reduces by itself
        self.model = model
        self.likelihood = parse(Likelihood, likelihood, "likelihood")
        self.hessian_structure = parse(
            HessianStructure, hessian_structure, "hessian_structure"
        )
        if self.hessian_structure is HessianStructure.GP and not self.function_space:
            raise ValueError(
                "hessian_structure='gp' is the function-space posterior: use "
                "Laplace(..., hessian_structure='gp'), FunctionalLaplace or "
                "FunctionalLLLaplace; this class takes 'full', 'kron', 'diag' or "
                "'lowrank'."
            )
        self._backend_cls = backend
        self._backend_kwargs = dict(backend_kwargs or {})
        if backend is not None:
            curvature = backend_curvature(backend)
        stochastic = bool(self._backend_kwargs.get("stochastic", stochastic))
        mc_samples = self._backend_kwargs.get("num_samples", mc_samples)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}.")
        self.rank = rank
        self.max_memory = max_memory
        self.options = SourceOptions(
            parse(CurvatureType, curvature, "curvature"),
            stochastic,
            mc_samples,
            generator,
            memory_budget,
            _curvature_dtype(model, curvature_dtype),
        )
        self.enable_backprop = enable_backprop
        self.dict_key_x, self.dict_key_y = dict_key_x, dict_key_y
        self._state: FittedState | None = None
        self._cache: tuple[Hyperparameters, CurvatureMatrix] | None = None
        like = self._like
        self._hyper = Hyperparameters(
            prior_precision=self._valid_prior(prior_precision),
            prior_mean=hyper.prior_mean(prior_mean, like, self._num_params_known()),
            sigma_noise=self._valid_sigma(sigma_noise),
            temperature=hyper.temperature(temperature),
        )

    # -------------------------------------------------------- subset-specific
    def _make_source(self, likelihood: LikelihoodModel, inputs: Any) -> CurvatureSource:
        """The subset's source for a fit (``inputs``: the first batch's inputs)."""
        raise NotImplementedError

    def _load_source(
        self, likelihood: LikelihoodModel, saved: dict[str, Any]
    ) -> CurvatureSource:
        """The subset's source on this model for a saved state."""
        return self._make_source(likelihood, None)

    def _subset_parameters(self) -> dict[str, nn.Parameter] | None:
        """The subset's parameter tensors before a fit (``None`` if not known yet)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        train_loader: Iterable,
        override: bool = True,
        progress_bar: bool = False,
        *,
        distributed: bool | None = None,
        process_group: Any = None,
    ) -> None:
        """Accumulate the curvature and the loss over ``train_loader`` at the MAP.

        The model is put in eval mode; its parameters, ``requires_grad`` flags and
        ``.grad`` are left unchanged. The result replaces the previous fit only when
        everything succeeded: on an error or an interrupt the previous fit is kept.

        Under ``torch.distributed`` (initialized with more than one rank) every rank
        fits its shard of the data and one all-reduce of the accumulated sums gives
        every rank the posterior of all the data (:mod:`.distributed`).

        Args:
            train_loader: Batches ``(x, y)`` or dicts with ``dict_key_x``,
                ``dict_key_y`` (a ``DataLoader`` or a list); moved to the model's
                device. Distributed: this rank's shard (``DistributedSampler``;
                the points it repeats to even out the ranks are not counted).
            override: Start afresh (``True``) or add to the earlier fit.
            progress_bar: Show a tqdm progress bar.
            distributed: ``None`` (default): reduce over the ranks if
                ``torch.distributed`` is initialized with more than one rank;
                ``False``: fit this rank's data only; ``True``: reduce (raises if
                not initialized).
            process_group: The group to reduce over (default: the default group).

        Raises:
            ValueError: For an empty loader, targets that do not fit the
                likelihood, NaN or inf curvature, or ``override=False`` with
                ``lowrank``.
            DistributedFitError: If the ranks of a distributed fit disagree.
        """
        self.model.eval()
        plan = FitPlan(
            likelihood=self._fit_likelihood,
            structure=self.hessian_structure,
            make_source=self._make_source,
            reader=self._reader,
            dict_key_x=self.dict_key_x,
            rank=self.rank,
            generator=self.options.generator,
            max_memory=self.max_memory,
        )
        previous = None if override else self._state
        state = fit_state(
            plan,
            train_loader,
            self._hyper.sigma_noise,
            previous,
            progress_bar,
            communicator(distributed, process_group),
        )
        sizes = state.block_sizes
        fitted_hyper = self._hyper.with_(
            prior_precision=hyper.prior_precision(
                self._hyper.prior_precision, state.mean, sizes
            ),
            prior_mean=hyper.prior_mean(self._hyper.prior_mean, state.mean, sum(sizes)),
        )
        self._replace_state(state, fitted_hyper)

    @property
    def is_fitted(self) -> bool:
        """Whether ``fit`` (or ``load_state_dict``) has run."""
        return self._state is not None

    @property
    def state(self) -> FittedState:
        """The immutable fitted state (see :mod:`bayescurv.laplace.state`)."""
        return self._fitted("state")

    @property
    def hyperparameters(self) -> Hyperparameters:
        """The current hyperparameters as one immutable object."""
        return self._hyper

    # ------------------------------------------------------------ predictive
    def __call__(
        self,
        x: Any,
        pred_type: PredType | str = PredType.GLM,
        joint: bool = False,
        link_approx: LinkApprox | str = LinkApprox.PROBIT,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        fitting: bool = False,
        *,
        noise: bool = False,
        **model_kwargs: Any,
    ) -> Tensor | tuple[Tensor, Tensor]:
        r"""The posterior predictive on ``x`` (laplace-torch's arguments).

        Args:
            x: Test inputs ``[N, ...]`` (tensor, tuple or dict).
            pred_type: ``"glm"`` (linearized network) or ``"nn"`` (sampled
                networks; needs ``link_approx="mc"``, as in laplace-torch).
            joint: Regression with ``"glm"``: the joint Gaussian over all ``N K``
                outputs, mean ``[N K]`` and covariance ``[N K, N K]``.
            link_approx: Classification with ``"glm"``: ``"probit"``,
                ``"bridge"``, ``"bridge_norm"`` or ``"mc"``; binary: ``"probit"``
                or ``"mc"``. Ignored for regression.
            n_samples: Draws for ``"mc"`` and ``"nn"``.
            diagonal_output: Ignore the covariances between outputs: ``"glm"``
                regression returns variances ``[N, K]``, ``"mc"`` samples outputs
                independently, the bridge uses the variances only.
            generator: Randomness of ``"mc"`` and ``"nn"`` (on the model's device), or
                an int seed.
            fitting: Reward modeling: predict as the classification the posterior
                was fitted with (pairs) instead of as regression (rewards).
            noise: Regression: add the observation noise :math:`\sigma^2` to the
                variances (the predictive of targets, not of :math:`f`).
            **model_kwargs: Keyword arguments of the model call (``"nn"`` only).

        Returns:
            Classification and binary: probabilities ``[N, C]``. Regression:
            ``(f_mu, f_var)``; for ``"glm"`` ``f_var`` is ``[N, K, K]`` (``[N, K]``
            with ``diagonal_output``, ``[N K, N K]`` with ``joint``), for ``"nn"``
            the sample variances ``[N, K]`` (as laplace-torch).

        Raises:
            ValueError: For an unknown option (listing the valid ones), a
                combination that does not apply (e.g. ``joint`` for
                classification), a bad ``n_samples`` or ``generator``.
            TypeError: For model keyword arguments with ``"glm"``.
            NotFittedError: Before ``fit``.
        """
        context = self._context("__call__", fitting)
        with eval_mode(self.model):
            return predictive.predict(
                context,
                x,
                pred_type,
                joint,
                link_approx,
                n_samples,
                diagonal_output,
                as_generator(generator, self._device),
                noise,
                model_kwargs,
            )

    def predictive(
        self,
        x: Any,
        pred_type: PredType | str = PredType.GLM,
        link_approx: LinkApprox | str = LinkApprox.PROBIT,
        n_samples: int = 100,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """laplace-torch's alias of :meth:`__call__` with four arguments."""
        return self(
            x, pred_type=pred_type, link_approx=link_approx, n_samples=n_samples
        )

    def functional_variance_fast(self, x: Any) -> tuple[Tensor, Tensor]:
        """The GLM mean ``[N, C]`` and output variances ``[N, C]`` (laplace-torch).

        The same as ``glm_moments(x, diagonal_output=True)``; fast for every structure
        and subset here (closed forms, no explicit Jacobian where avoidable).
        """
        return self.glm_moments(x, diagonal_output=True)

    def glm_moments(
        self, x: Any, joint: bool = False, diagonal_output: bool = False
    ) -> tuple[Tensor, Tensor]:
        r"""Mean and covariance of the linearized network's output.

        Returns:
            :math:`f_\mu` ``[N, C]`` and :math:`f_{\mathrm{var}}` ``[N, C, C]``
            (``[N, C]`` with ``diagonal_output``; ``[N C]`` and ``[N C, N C]`` with
            ``joint``).
        """
        with eval_mode(self.model):
            return predictive.glm_moments(
                self._context("glm_moments"), x, joint, diagonal_output
            )

    def functional_samples(
        self,
        x: Any,
        pred_type: PredType | str = PredType.GLM,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        **model_kwargs: Any,
    ) -> Tensor:
        r"""Samples of the output :math:`f(x)` under the posterior, ``[S, N, C]``.

        Args:
            x: Inputs ``[N, ...]``.
            pred_type: ``"glm"`` (draws from :math:`\mathcal{N}(f_\mu,
                f_{\mathrm{var}})`) or ``"nn"`` (outputs of sampled networks).
            n_samples: Draws ``S``.
            diagonal_output: ``"glm"``: independent outputs (no covariances).
            generator: Source of randomness (a generator or an int seed).
            **model_kwargs: Keyword arguments of the model call (``"nn"`` only).
        """
        with eval_mode(self.model):
            return predictive.functional_samples(
                self._context("functional_samples"),
                x,
                pred_type,
                n_samples,
                diagonal_output,
                as_generator(generator, self._device),
                **model_kwargs,
            )

    def predictive_samples(
        self,
        x: Any,
        pred_type: PredType | str = PredType.GLM,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        **model_kwargs: Any,
    ) -> Tensor:
        """Samples of the predictive (the link on :meth:`functional_samples`).

        Returns:
            ``[S, N, C]``: probabilities (softmax for classification, sigmoid for
            binary) or outputs (regression, without observation noise).
        """
        with eval_mode(self.model):
            return predictive.predictive_samples(
                self._context("predictive_samples"),
                x,
                pred_type,
                n_samples,
                diagonal_output,
                as_generator(generator, self._device),
                **model_kwargs,
            )

    def functional_variance(self, Js: Tensor) -> Tensor:
        r""":math:`J_n \Lambda^{-1} J_n^\top` per sample for Jacobians ``[N, C, P]``.

        The GLM predictive's covariance per sample (laplace-torch's name).
        """
        precision = self.precision
        jacobians = self._check_jacobians(Js)
        variance = precision.inv_quad_form_batch(jacobians.to(precision.dtype))
        return variance.to(jacobians.dtype)

    def functional_covariance(self, Js: Tensor) -> Tensor:
        r"""Joint :math:`J \Lambda^{-1} J^\top` over all rows, ``[N C, N C]``.

        Args:
            Js: ``[N, C, P]`` or already flattened ``[N C, P]``.
        """
        precision = self.precision
        flat = self._check_jacobians(Js).reshape(1, -1, Js.shape[-1])
        rows = flat.shape[1]
        estimate = Estimate(
            f"{type(self).__name__}.functional_covariance: [N C, N C] = "
            f"[{rows}, {rows}]",
            2 * rows * rows * torch.empty((), dtype=precision.dtype).element_size(),
            "Use functional_variance (per input, [N, C, C]).",
        )
        check_estimates([estimate], self.max_memory, self._device)
        covariance = precision.inv_quad_form_batch(flat.to(precision.dtype))[0]
        return covariance.to(Js.dtype)

    def sample(
        self, n_samples: int = 100, generator: torch.Generator | None = None
    ) -> Tensor:
        r"""Draws from :math:`\mathcal{N}(\theta_*, \Lambda^{-1})`, ``[n, P]``.

        Args:
            n_samples: Number of draws.
            generator: A ``torch.Generator``, an int seed, or ``None`` (torch's
                global generator).

        Raises:
            TypeError: For a ``generator`` of another type.
        """
        draws = self.precision.sample(n_samples, as_generator(generator, self._device))
        mean = self._fitted("sample").mean
        return mean + draws.to(mean.dtype)

    # ------------------------------------------------------------ evidence
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
        state = self._fitted("log_marginal_likelihood")
        values = self._hyper
        if prior_precision is not None:
            values = values.with_(prior_precision=self._valid_prior(prior_precision))
        if sigma_noise is not None:
            values = values.with_(sigma_noise=self._valid_sigma(sigma_noise))
        self._set_hyper(
            values.with_(
                prior_precision=values.prior_precision.detach(),
                sigma_noise=values.sigma_noise.detach(),
            )
        )
        precision = None if _has_grad(values) else self.precision
        value = evidence.log_marginal_likelihood(state, values, precision)
        return value.to(state.mean.dtype)

    @property
    def log_likelihood(self) -> Tensor:
        r""":math:`\log p(\mathcal{D} \mid \theta_*)`, tempered (see likelihoods)."""
        state = self._fitted("log_likelihood")
        return evidence.log_likelihood(
            state, self._hyper.sigma_noise, self._hyper.temperature
        )

    @property
    def log_det_prior_precision(self) -> Tensor:
        r""":math:`\sum_i \log \pi_i`."""
        state = self._fitted("log_det_prior_precision")
        return evidence.log_prior_det(state, self._hyper.prior_precision)

    @property
    def log_det_posterior_precision(self) -> Tensor:
        r""":math:`\log\det\Lambda`."""
        return self.precision.logdet().to(self._like.dtype)

    @property
    def log_det_ratio(self) -> Tensor:
        r""":math:`\log\det\Lambda - \sum_i \log \pi_i`."""
        return self.log_det_posterior_precision - self.log_det_prior_precision

    @property
    def scatter(self) -> Tensor:
        r"""The prior scatter of the MAP.

        .. math:: (\theta_* - \mu_0)^\top \operatorname{diag}(\pi)(\theta_* - \mu_0)
        """
        state = self._fitted("scatter")
        return evidence.scatter(
            state, self._hyper.prior_mean, self._hyper.prior_precision
        )

    def square_norm(self, value: Tensor) -> Tensor:
        r""":math:`\Delta^\top \Lambda \Delta` with :math:`\Delta = \theta - \theta_*`.

        Args:
            value: :math:`\theta`, ``[P]`` or a batch ``[S, P]``.
        """
        precision = self.precision
        delta = (value - self._fitted("square_norm").mean).to(precision.dtype)
        product = precision.mvp(delta.reshape(-1, delta.shape[-1]).mT).mT
        norm = (product * delta.reshape(product.shape)).sum(-1)
        return norm.reshape(delta.shape[:-1]).to(value.dtype)

    def log_prob(self, value: Tensor, normalized: bool = True) -> Tensor:
        r"""The log density of the posterior at ``value`` (``[P]`` or ``[S, P]``).

        Args:
            value: Weights of the subset.
            normalized: Include the normalizer (else only the terms in ``value``).
        """
        if self._state is None and self._block_sizes() is not None:
            return self._prior_log_prob(value, normalized)
        log_prob = -self.square_norm(value) / 2
        if not normalized:
            return log_prob
        return (
            log_prob
            + (self.log_det_posterior_precision - self.n_params * math.log(2 * math.pi))
            / 2
        )

    # --------------------------------------------------------------- tuning
    def optimize_prior_precision(
        self,
        pred_type: PredType | str = PredType.GLM,
        method: TuningMethod | str = TuningMethod.MARGLIK,
        n_steps: int = 100,
        lr: float = 1e-1,
        init_prior_prec: float | Tensor = 1.0,
        prior_structure: PriorStructure | str = PriorStructure.SCALAR,
        val_loader: Iterable | None = None,
        loss: gridsearch.Loss | None = None,
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
        """Tune the prior precision (laplace-torch's arguments).

        Args:
            pred_type: Predictive of ``gridsearch`` (``"glm"`` or ``"nn"``).
            method: ``"marglik"`` (evidence, :mod:`.tune.prior`) or
                ``"gridsearch"`` (validation loss, :mod:`.tune.gridsearch`).
            n_steps: Adam steps of ``marglik``.
            lr: Adam learning rate on the log prior precision.
            init_prior_prec: Start of ``marglik``; a number is broadcast to
                ``prior_structure``.
            prior_structure: ``"scalar"``, ``"layerwise"`` (per parameter tensor) or
                ``"diag"`` (per parameter).
            val_loader: Validation batches of ``gridsearch``.
            loss: ``loss(prediction, y)`` of ``gridsearch``, or a metric with
                ``update``/``compute``/``reset`` (default: the predictive negative
                log likelihood).
            log_prior_prec_min: Grid start exponent.
            log_prior_prec_max: Grid end exponent.
            grid_size: Grid points.
            link_approx: Link approximation of ``gridsearch``.
            n_samples: Samples for ``link_approx="mc"`` and ``"nn"``.
            verbose: Print the result.
            progress_bar: Show a tqdm progress bar.
            log_prior_prec_base: Base of the grid.
            tune_sigma_noise: Regression, ``marglik``: tune ``sigma_noise`` jointly
                (a scalar freely, a per-output one by a common factor).

        Returns:
            The negative evidence per Adam step (``marglik``), else ``None``.

        Raises:
            ValueError: For an unknown option, ``gridsearch`` without a
                ``val_loader``, or ``tune_sigma_noise`` without regression.
        """
        state = self._fitted("optimize_prior_precision")
        method = parse(TuningMethod, method, "method")
        structure = parse(PriorStructure, prior_structure, "prior_structure")
        pred_type = parse(PredType, pred_type, "pred_type")
        link_approx = parse(LinkApprox, link_approx, "link_approx")
        if tune_sigma_noise and self.likelihood is not Likelihood.REGRESSION:
            raise ValueError(
                "tune_sigma_noise=True needs likelihood='regression', not "
                f"'{self.likelihood.value}'."
            )
        history = None
        if method is TuningMethod.MARGLIK:
            if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
                raise ValueError(f"n_steps must be a positive int, got {n_steps!r}.")
            start = self._initial_prior(init_prior_prec, structure)
            tuned, history = prior.optimize_marglik(
                state,
                self._hyper.with_(prior_precision=start),
                n_steps,
                lr,
                tune_sigma_noise,
                progress_bar,
            )
            self._set_hyper(tuned)
        else:
            if val_loader is None:
                raise ValueError("method='gridsearch' needs a val_loader.")
            if tune_sigma_noise:
                raise ValueError("tune_sigma_noise=True needs method='marglik'.")
            grid = torch.logspace(
                log_prior_prec_min,
                log_prior_prec_max,
                grid_size,
                base=log_prior_prec_base,
            )
            candidates = [self._initial_prior(float(v), structure) for v in grid]
            with eval_mode(self.model):
                best = gridsearch.gridsearch(
                    functools.partial(self._context_for, fitting=True),
                    candidates,
                    list(self._reader.batches(val_loader, "val_loader")),
                    loss
                    or gridsearch.default_loss(self._fit_likelihood, self.sigma_noise),
                    pred_type,
                    link_approx,
                    n_samples,
                    progress_bar,
                )
            self._set_hyper(self._hyper.with_(prior_precision=best))
        if verbose:
            print(f"Optimized prior precision: {self.prior_precision}.")
        return history

    # ------------------------------------------------------------ posterior
    @property
    def precision(self) -> CurvatureMatrix:
        r"""The posterior precision :math:`\Lambda` as a curvature structure.

        A :class:`~bayescurv.curvature.CurvatureMatrix`: ``logdet``, ``solve``,
        ``sample``, ``inverse_diagonal``, ``dense``, ...
        """
        state = self._fitted("precision")
        if self._cache is not None and self._cache[0] is self._hyper:
            return self._cache[1]
        value = posterior_precision(state, self._hyper)
        self._cache = (self._hyper, value)
        return value

    @property
    def posterior_precision(self) -> Any:
        r""":math:`\Lambda` in laplace-torch's form (:mod:`.forms`).

        ``[P, P]`` (full), ``[P]`` (diag), a ``KronDecomposed`` (kron) or
        ``((U, eigenvalues), prior)`` (lowrank); :attr:`precision` is the structure.
        """
        return forms.posterior_precision(
            self.precision, self.prior_precision_diag, self._like.dtype
        )

    @property
    def H(self) -> Any:
        """The unscaled data term in laplace-torch's form (:mod:`.forms`).

        Before ``fit`` zeros in that form, as laplace-torch initializes it (``None``
        for ``lowrank`` or a last layer not known yet); :attr:`state` holds it as a
        structure (``la.state.curvature``).
        """
        if self._state is not None:
            return forms.data_term(self._state.curvature, self._like.dtype)
        params = self._parameters()
        if params is None:
            return None
        return forms.zero_data_term(
            self.hessian_structure,
            list(params.values()),
            self._num_params_known(),
            self._like,
        )

    def _init_H(self) -> None:
        """laplace-torch's reset of the data term: forget the fitted curvature.

        The approximation is unfitted afterwards (:attr:`H` is zero, the density
        :meth:`log_prob` is the prior's); ``fit`` builds it again.
        """
        self._state = None

    @property
    def H_facs(self) -> Any:
        """The Kronecker factors of the data term as laplace-torch's ``Kron``."""
        curvature = self._fitted("H_facs").curvature
        if self.hessian_structure is not HessianStructure.KRON:
            raise AttributeError(
                f"H_facs exists for hessian_structure='kron', not "
                f"'{self.hessian_structure.value}'."
            )
        return forms.kron_factors(curvature, self._like.dtype)

    @property
    def posterior_scale(self) -> Tensor:
        r"""A scale of the posterior: :math:`S S^\top = \Lambda^{-1}`.

        The standard deviations ``[P]`` for ``diag`` (as laplace-torch), else the
        lower-triangular Cholesky factor ``[P, P]`` of the covariance.
        """
        if self.hessian_structure is HessianStructure.DIAG:
            return self.posterior_variance.sqrt()
        self._check_dense("posterior_scale")
        return scale_tril(self.precision.dense()).to(self._like.dtype)

    @property
    def backend(self) -> Any:
        """An instance of the ``backend`` class (laplace-torch's curvature interface).

        Default: ``CurvlinopsGGN`` (laplace-torch's default); every backend computes
        with bayescurv's engine.
        """
        from bayescurv.laplace.laplace_torch import backends  # noqa: PLC0415

        cls = self._backend_cls or backends.CurvlinopsGGN
        subset: dict[str, Any] = {}
        if self.subset is SubsetOfWeights.LAST_LAYER:
            source = None if self._state is None else self._state.source
            name = self.last_layer_name or getattr(source, "layer_name", None)
            subset["last_layer"] = True
            subset["last_layer_name"] = name
            subset["feature_reduction"] = self.feature_reduction
        if self.subset is SubsetOfWeights.SUBNETWORK:
            subset["subnetwork_indices"] = self.subnetwork_indices
        return cls(
            self.model,
            self._fit_likelihood.value,
            dict_key_x=self.dict_key_x,
            dict_key_y=self.dict_key_y,
            **subset,
            **self._backend_kwargs,
        )

    @property
    def posterior_covariance(self) -> Tensor:
        r""":math:`\Lambda^{-1}`, dense ``[P, P]`` (checked against ``max_memory``)."""
        self._check_dense("posterior_covariance")
        return self.precision.inverse().to(self._like.dtype)

    @property
    def posterior_variance(self) -> Tensor:
        r"""Marginal variances :math:`\operatorname{diag}(\Lambda^{-1})`, ``[P]``."""
        return self.precision.inverse_diagonal().to(self._like.dtype)

    # ----------------------------------------------------- hyperparameters
    @property
    def prior_precision(self) -> Tensor:
        r"""The prior precision :math:`\pi`: ``[1]`` (scalar), ``[B]`` or ``[P]``."""
        value = self._hyper.prior_precision
        return value.reshape(1) if value.ndim == 0 else value

    @prior_precision.setter
    def prior_precision(self, value: hyper.Number) -> None:
        self._set_hyper(
            self._hyper.with_(prior_precision=self._valid_prior(value).detach())
        )

    @property
    def prior_mean(self) -> Tensor:
        r"""The prior mean :math:`\mu_0`: 0-d or ``[P]``."""
        return self._hyper.prior_mean

    @prior_mean.setter
    def prior_mean(self, value: hyper.Number) -> None:
        mean = hyper.prior_mean(value, self._like, self._num_params_known())
        self._set_hyper(self._hyper.with_(prior_mean=mean.detach()))

    @property
    def sigma_noise(self) -> Tensor:
        r"""The regression noise :math:`\sigma`: 0-d or ``[K]`` (1 otherwise)."""
        return self._hyper.sigma_noise

    @sigma_noise.setter
    def sigma_noise(self, value: hyper.Number) -> None:
        self._set_hyper(
            self._hyper.with_(sigma_noise=self._valid_sigma(value).detach())
        )

    @property
    def temperature(self) -> float:
        """The posterior temperature :math:`T`."""
        return self._hyper.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._set_hyper(self._hyper.with_(temperature=hyper.temperature(value)))

    @property
    def prior_precision_diag(self) -> Tensor:
        r"""The prior precision per weight, ``[P]``."""
        state = self._fitted("prior_precision_diag")
        return evidence.expand_prior(self._hyper.prior_precision, state.block_sizes)

    # ------------------------------------------------ fitted quantities
    @property
    def mean(self) -> Tensor | None:
        r"""The MAP :math:`\theta_*` of the subset, ``[P]``.

        Before ``fit`` the prior mean, as in laplace-torch (``None`` for a last
        layer not known yet).
        """
        if self._state is not None:
            return self._state.mean
        return None if self._block_sizes() is None else self._hyper.prior_mean

    @property
    def loss(self) -> Tensor | float:
        r"""The unit loss summed over the data at the MAP (0 before ``fit``).

        Cross-entropy or binary cross-entropy; for regression
        :math:`\tfrac12 \sum_k w_k \mathrm{SSE}_k` (laplace-torch's ``loss``).
        """
        if self._state is None:
            return 0.0
        return self._state.likelihood.unit_loss(self._state.loss)

    @property
    def n_data(self) -> int:
        """Number of training points ``N`` (0 before ``fit``)."""
        return 0 if self._state is None else self._state.n_data

    @property
    def n_outputs(self) -> int:
        """Outputs per point (0 before ``fit``)."""
        return 0 if self._state is None else self._state.n_outputs

    @property
    def params(self) -> list[nn.Parameter]:
        """The parameter tensors of the subset (empty if not known before ``fit``)."""
        params = self._parameters()
        return [] if params is None else list(params.values())

    @property
    def n_params(self) -> int | None:
        """``P``, the number of weights with a posterior (``None`` if not known)."""
        if self._state is not None:
            return self._state.num_params
        return self._num_params_known()

    @property
    def num_params(self) -> int:
        """``P`` (after ``fit``)."""
        return self._fitted("num_params").num_params

    @property
    def n_layers(self) -> int | None:
        """Number of parameter tensors of the subset (``None`` if not known)."""
        params = self._parameters()
        return None if params is None else len(params)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The fitted posterior as plain tensors and strings (:mod:`.serialization`)."""
        state = self._fitted("state_dict")
        return serialization.state_dict(self._config(), state, self._hyper)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a posterior saved with :meth:`state_dict` (no refit).

        Raises:
            ValueError: If the state belongs to another configuration, other weights
                or another model (parameter names and shapes are checked).
        """
        state, values = serialization.load_state_dict(
            state_dict, self._config(), self._load_source
        )
        self._replace_state(state, values)

    def __repr__(self) -> str:
        fitted = f"P={self.num_params}" if self.is_fitted else "not fitted"
        return (
            f"{type(self).__name__}(likelihood='{self.likelihood.value}', "
            f"hessian_structure='{self.hessian_structure.value}', {fitted})"
        )

    # -------------------------------------------------------------- helpers
    def _fitted(self, what: str) -> FittedState:
        if self._state is None:
            raise NotFittedError(
                f"{type(self).__name__}.{what} needs a fitted Laplace approximation; "
                "call fit(train_loader) first."
            )
        return self._state

    def _config(self) -> dict[str, str]:
        return {
            "subset": self.subset.value,
            "likelihood": self.likelihood.value,
            "hessian_structure": self.hessian_structure.value,
        }

    def _context(self, what: str, fitting: bool = False) -> predictive.Context:
        self._fitted(what)
        return self._context_for(self._hyper.prior_precision, fitting)

    def _context_for(
        self, prior_precision: Tensor, fitting: bool = False
    ) -> predictive.Context:
        values = self._hyper.with_(prior_precision=prior_precision)
        if values.prior_precision is self._hyper.prior_precision:
            precision = self.precision
        else:
            precision = posterior_precision(self._state, values)
        return predictive.Context(
            state=self._state,
            precision=precision,
            sigma_noise=values.sigma_noise,
            likelihood=self._fit_likelihood if fitting else self._predict_likelihood,
            reader=self._reader,
            enable_backprop=self.enable_backprop,
            same_outputs=self.likelihood is not Likelihood.REWARD_MODELING,
            max_memory=self.max_memory,
        )

    @property
    def _fit_likelihood(self) -> Likelihood:
        """The likelihood of the fit (reward modeling fits a classification)."""
        if self.likelihood is Likelihood.REWARD_MODELING:
            return Likelihood.CLASSIFICATION
        return self.likelihood

    @property
    def _predict_likelihood(self) -> Likelihood:
        """The likelihood of predictions (reward modeling predicts rewards)."""
        if self.likelihood is Likelihood.REWARD_MODELING:
            return Likelihood.REGRESSION
        return self.likelihood

    def _set_hyper(self, values: Hyperparameters) -> None:
        self._hyper, self._cache = values, None

    def _replace_state(self, state: Any, values: Hyperparameters) -> None:
        """Install a new fitted state with its hyperparameters (after a fit or load).

        The one place the state changes; subclasses with a state of their own (the
        function-space posterior) install it here too.
        """
        self._state, self._hyper, self._cache = state, values, None

    @property
    def _like(self) -> Tensor:
        """A tensor with the model's dtype and device."""
        if self._state is not None:
            return self._state.mean
        param = next(self.model.parameters(), None)
        return torch.empty(0) if param is None else param.detach()

    @property
    def _device(self) -> torch.device:
        return self._like.device

    @property
    def _reader(self) -> BatchReader:
        like = self._like
        return BatchReader(
            self.dict_key_x,
            self.dict_key_y,
            like.device,
            self._fit_likelihood,
            like.dtype if like.numel() and like.is_floating_point() else None,
        )

    def _parameters(self) -> dict[str, nn.Parameter] | None:
        if self._state is not None:
            return self._state.source.parameters
        return self._subset_parameters()

    def _block_sizes(self) -> list[int] | None:
        if self._state is not None:
            return self._state.block_sizes
        params = self._subset_parameters()
        return None if params is None else [p.numel() for p in params.values()]

    def _num_params_known(self) -> int | None:
        sizes = self._block_sizes()
        return None if sizes is None else sum(sizes)

    def _valid_prior(self, value: hyper.Number) -> Tensor:
        sizes = self._block_sizes()
        tensor = hyper.prior_precision(value, self._like, sizes)
        if (
            self.hessian_structure is HessianStructure.KRON
            and sizes is not None
            and tensor.numel() == sum(sizes) != len(sizes)
        ):
            raise ValueError(
                "hessian_structure='kron' takes a scalar or per-layer prior "
                f"precision ([{len(sizes)}]), got one per weight ([{sum(sizes)}]); "
                "use hessian_structure='diag' or 'full' for a per-weight prior."
            )
        return tensor

    def _valid_sigma(self, value: hyper.Number) -> Tensor:
        tensor = hyper.sigma_noise(value, self._like, self.n_outputs or None)
        if self.likelihood is not Likelihood.REGRESSION and not bool(
            (tensor.detach() == 1).all()
        ):
            raise ValueError(
                f"sigma_noise is a regression parameter; likelihood="
                f"'{self.likelihood.value}' needs sigma_noise=1."
            )
        if self._state is not None:
            check_noise_ratio(self._state, tensor)
        return tensor

    def _initial_prior(self, init: float | Tensor, structure: PriorStructure) -> Tensor:
        state = self._fitted("optimize_prior_precision")
        start = prior.initial_prior(init, structure, state.block_sizes, state.mean)
        return self._valid_prior(start).detach()

    def _prior_log_prob(self, value: Tensor, normalized: bool) -> Tensor:
        """The prior's log density (the posterior before ``fit``, as laplace-torch)."""
        precision = evidence.expand_prior(
            self._hyper.prior_precision, self._block_sizes()
        )
        delta = value - self._hyper.prior_mean
        log_prob = -(delta.square() * precision).sum(-1) / 2
        if not normalized:
            return log_prob
        return (
            log_prob
            + (precision.log().sum() - precision.numel() * math.log(2 * math.pi)) / 2
        )

    def _check_dense(self, what: str) -> None:
        """Refuse a dense ``[P, P]`` result above ``max_memory`` before computing it.

        Raises:
            MemoryBudgetError: With the estimate, the budget and alternatives.
        """
        size = self.num_params
        item = torch.empty((), dtype=self.precision.dtype).element_size()
        estimate = Estimate(
            f"{type(self).__name__}.{what}: dense [P, P] = [{size}, {size}]",
            3 * size * size * item,  # the result, its float64 form, a factor
            "Use posterior_variance (the diagonal), sample(), or the predictive.",
        )
        check_estimates([estimate], self.max_memory, self._device)

    def _check_jacobians(self, jacobians: Tensor) -> Tensor:
        size = self.num_params
        if not isinstance(jacobians, Tensor) or jacobians.shape[-1] != size:
            shape = getattr(jacobians, "shape", type(jacobians).__name__)
            raise ValueError(
                f"Jacobians must be a tensor [..., P={size}] on {self._device}, got "
                f"{shape}."
            )
        return jacobians


# NOTE [float64 curvature]
# A GGN or Kronecker factor formed in float32 has its exact null space smeared by
# round-off (eigenvalues of +-1e-7 * lambda_max where they should be 0); with the small
# prior precisions that evidence tuning finds, log det(s H + pi I) and the variances
# along those directions are then off by orders of magnitude (a 1-50-50-1 regression
# MLP on 300 points: relative evidence error 52 at prior 1e-6, 3e-3 at prior 1). The
# engine forms Gram matrices from upcast vectors, so accumulating the curvature in
# float64 keeps rank and null space exact while the model runs in float32; only the
# per-sample vectors carry float32 rounding. Decompositions, evidence and the
# predictive's contractions then run in float64 and results are cast back to the
# model's dtype. curvature_dtype=torch.float32 (or None) trades this for speed.
def _curvature_dtype(model: nn.Module, dtype: torch.dtype | None) -> torch.dtype | None:
    """The validated curvature dtype; refuses half-precision and meta models.

    Raises:
        ValueError: For a float16/bfloat16 or meta model or a non-floating
            ``dtype``.
    """
    param = next(model.parameters(), None)
    if param is not None and param.is_meta:
        raise ValueError(
            "the model's parameters are on the meta device (no values); materialize "
            "the model first, e.g. model.to_empty(device='cpu') and "
            "model.load_state_dict(...)."
        )
    if param is not None and param.dtype in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"the model's parameters are {param.dtype}: Laplace needs float32 or "
            "float64 weights (call model.float() first; the curvature is accumulated "
            "in float64 either way)."
        )
    if dtype is not None and not (
        isinstance(dtype, torch.dtype) and dtype.is_floating_point
    ):
        raise ValueError(
            f"curvature_dtype must be a floating torch.dtype, got {dtype!r}."
        )
    return dtype


class UnknownBackendError(TypeError, ValueError):
    """A ``backend`` whose curvature cannot be told (laplace-torch: ValueError)."""


def backend_curvature(backend: Any) -> CurvatureType:
    """The curvature a laplace-torch backend class implies (GGN, EF or Hessian).

    Reads the class attribute ``curvature`` of bayescurv's backend classes, else the
    class name (``...GGN``, ``...EF``, ``...Hessian``, as laplace-torch names them).

    Raises:
        UnknownBackendError: For a backend whose curvature cannot be told (a
            ``TypeError`` and a ``ValueError``).
    """
    declared = getattr(backend, "curvature", None)
    if declared is not None:
        return parse(CurvatureType, declared, "backend curvature")
    name = getattr(backend, "__name__", type(backend).__name__)
    for suffix, kind in (
        ("EF", CurvatureType.EF),
        ("Hessian", CurvatureType.HESSIAN),
        ("GGN", CurvatureType.GGN),
    ):
        if name.endswith(suffix):
            return kind
    raise UnknownBackendError(
        f"backend={name} implies no known curvature; pass a laplace-torch backend "
        "class (e.g. BackPackGGN, CurvlinopsEF, AsdlHessian) or curvature='ggn', "
        "'ef' or 'hessian'."
    )


def scale_tril(precision: Tensor) -> Tensor:
    r"""The lower-triangular :math:`L` with :math:`L L^\top = P^{-1}`, ``[P, P]``.

    From the Cholesky factor of the flipped precision (no explicit inverse).
    """
    flipped = torch.linalg.cholesky(precision.flip((-2, -1)))
    upper = flipped.flip((-2, -1))  # U = J L J: upper triangular, U U^T = P
    eye = torch.eye(precision.shape[-1], dtype=precision.dtype, device=precision.device)
    return torch.linalg.solve_triangular(upper.mT, eye, upper=False)  # U^{-T}


def _has_grad(values: Hyperparameters) -> bool:
    return values.prior_precision.requires_grad or values.sigma_noise.requires_grad


@contextmanager
def eval_mode(model: nn.Module) -> Any:
    """Evaluate ``model`` in eval mode (dropout off, BatchNorm statistics fixed).

    # NOTE [Predictions in eval mode]
    # The posterior linearizes the network fitted in eval mode; a model switched back
    # to train mode (for more training, say) would make the GLM mean and Jacobians
    # random (dropout) or batch-dependent (BatchNorm). Predictions therefore always
    # run in eval mode and restore the caller's mode afterwards.
    """
    modes = [(m, m.training) for m in model.modules()]
    if not any(training for _, training in modes):
        yield  # already in eval mode (the common case): nothing to switch
        return
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:  # train() would recurse into the children
            module.training = training
