r"""Function-space Laplace: the linearized network as a GP (``hessian_structure="gp"``).

The GGN Laplace posterior of the weights, :math:`\mathcal N(\theta_*, (\Sigma_0^{-1}
+ J^\top W J)^{-1})`, makes the linearized network a GP with the empirical NTK
:math:`K = J \Sigma_0 J^\top` as kernel (Khan et al., 2019; Immer et al., 2021,
"Improving predictions of Bayesian neural nets via local linearization"). Its
predictive and evidence need only ``[M C, M C]`` kernel matrices on ``M`` points,
not ``[P, P]`` ones: the choice for large networks on moderate data, or for any
network on a subset, landmarks or inducing points (``functional_approximation``).

:class:`FunctionalLaplace` (all weights) and :class:`FunctionalLLLaplace` (the last
layer) have laplace-torch's names and arguments; ``Laplace(...,
hessian_structure="gp")`` returns them. Like every posterior here, they are thin
objects around an immutable fitted state (:mod:`.state`) and the hyperparameters;
prediction (:mod:`.predictive`), the evidence and tuning (:mod:`.tuning`) and
saving (:mod:`.serialization`) are functions of the pair. See
``docs/function_space.md``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator
from typing import Any, NoReturn

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bayescurv.laplace import hyper
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
from bayescurv.laplace.function_space import predictive, serialization, tuning
from bayescurv.laplace.function_space.anchors import AnchorRows
from bayescurv.laplace.function_space.data import scan
from bayescurv.laplace.function_space.exact import exact_posterior
from bayescurv.laplace.function_space.nystrom import Batch, nystrom_posterior
from bayescurv.laplace.function_space.options import FunctionalApproximation
from bayescurv.laplace.function_space.roots import output_hessian_root
from bayescurv.laplace.function_space.rows import JacobianRows
from bayescurv.laplace.function_space.spectral import SpectralGP
from bayescurv.laplace.function_space.state import FunctionSpaceState, hyper_map
from bayescurv.laplace.likelihoods import LikelihoodModel
from bayescurv.laplace.posterior import BaseLaplace, eval_mode
from bayescurv.laplace.predict.links import link_function
from bayescurv.laplace.predict.predictive import Context
from bayescurv.laplace.sources import (
    CurvatureSource,
    EngineSource,
    LastLayerSource,
    find_last_layer,
    last_layer,
)
from bayescurv.laplace.sources.jacobians import DenseSegment, SegmentedJacobian
from bayescurv.laplace.tune import evidence
from bayescurv.laplace.tune.gridsearch import Loss, default_loss


class FunctionSpaceLaplace(BaseLaplace):
    r"""The GP posterior of the linearized network over one weight subset.

    The positional arguments are laplace-torch's ``FunctionalLaplace``'s.

    Args:
        model: A trained ``nn.Module`` at the MAP.
        likelihood: ``"classification"``, ``"regression"`` or ``"binary"``.
        n_subset: Training points the posterior is built on (``None``: all):
            the exact GP's subset (``"sod"``), the landmarks (``"nystrom"``) or
            the inducing points (``"variational"``), drawn at random with
            ``seed``.
        sigma_noise: Regression noise :math:`\sigma`, a scalar or ``[K]``.
        prior_precision: :math:`\pi`, a scalar or one per parameter tensor
            ``[B]`` (the kernel :math:`J \Sigma_0 J^\top`; per-parameter priors
            are not supported in function space).
        prior_mean: :math:`\mu_0`, a scalar or ``[P]``.
        temperature: :math:`T`.
        enable_backprop: Predictions differentiable w.r.t. the inputs.
        dict_key_x: Input key of dict batches.
        dict_key_y: Target key of dict batches.
        backend: laplace-torch compatibility (a GGN backend).
        backend_kwargs: laplace-torch compatibility.
        independent_outputs: A GP per output: no kernel between outputs and the
            diagonal of every :math:`W_n` (laplace-torch's option).
        seed: Seed of the random subset.
        hessian_structure: ``"gp"``.
        functional_approximation: ``"sod"`` (default), ``"nystrom"`` or
            ``"variational"`` (:class:`FunctionalApproximation`).
        diagonal_kernel: laplace-torch 0.2's name of ``independent_outputs``.
        n_eigenvalues: Nyström: keep this many eigenpairs of the landmarks'
            kernel (``None``: every positive one).
        batch_size: Variational: training points per natural-gradient step
            (``None``: as many rows as inducing rows, at least 256).
        memory_budget: Bytes of kept anchor Jacobians and of one chunk.
        **kwargs: Further options of
            :class:`~bayescurv.laplace.posterior.BaseLaplace` (``generator``, ...).

    Raises:
        ValueError: For an option that does not apply in function space (another
            curvature, Monte Carlo curvature, reward modeling, a per-parameter
            prior, a bad ``n_subset``).
    """

    function_space = True
    subset = SubsetOfWeights.ALL

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        n_subset: int | None = None,
        sigma_noise: hyper.Number = 1.0,
        prior_precision: hyper.Number = 1.0,
        prior_mean: hyper.Number = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: Any = None,
        backend_kwargs: dict[str, Any] | None = None,
        independent_outputs: bool = False,
        seed: int = 0,
        *,
        hessian_structure: HessianStructure | str = HessianStructure.GP,
        functional_approximation: FunctionalApproximation | str = (
            FunctionalApproximation.SOD
        ),
        diagonal_kernel: bool | None = None,
        n_eigenvalues: int | None = None,
        batch_size: int | None = None,
        memory_budget: int = 2**28,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            model,
            likelihood,
            sigma_noise,
            prior_precision,
            prior_mean,
            temperature,
            enable_backprop,
            dict_key_x,
            dict_key_y,
            backend,
            backend_kwargs,
            hessian_structure=hessian_structure,
            memory_budget=memory_budget,
            **kwargs,
        )
        self._check_options()
        if diagonal_kernel is not None and independent_outputs and not diagonal_kernel:
            raise ValueError(
                "diagonal_kernel=False contradicts independent_outputs=True (they are "
                "one option; diagonal_kernel is laplace-torch 0.2's name)."
            )
        self.independent_outputs = bool(independent_outputs or diagonal_kernel)
        self.n_subset = _optional_count(n_subset, "n_subset")
        self.n_eigenvalues = _optional_count(n_eigenvalues, "n_eigenvalues")
        self.batch_size = _optional_count(batch_size, "batch_size")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}.")
        self.seed = seed
        self.functional_approximation = parse(
            FunctionalApproximation,
            functional_approximation,
            "functional_approximation",
        )

    def _check_options(self) -> None:
        if self.hessian_structure is not HessianStructure.GP:
            raise ValueError(
                f"{type(self).__name__} is hessian_structure='gp', got "
                f"'{self.hessian_structure.value}'."
            )
        if self.options.curvature is not CurvatureType.GGN or self.options.stochastic:
            raise ValueError(
                "hessian_structure='gp' is the GP of the linearized network: it needs "
                "the exact GGN (curvature='ggn', stochastic=False, a GGN backend)."
            )
        if self.likelihood is Likelihood.REWARD_MODELING:
            raise ValueError(
                "likelihood='reward_modeling' is not supported in function space; "
                "use a weight-space structure."
            )

    # -------------------------------------------------------- subset-specific
    def _make_source(self, likelihood: LikelihoodModel, inputs: Any) -> CurvatureSource:
        return EngineSource(self.model, likelihood, self.options)

    def _subset_parameters(self) -> dict[str, nn.Parameter] | None:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

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
        """Build the GP posterior from the training data at the MAP.

        One forward pass sums the loss of all data and draws the ``n_subset``
        points; the approximation then needs their Jacobians (``"sod"``) or one
        more pass over all data (``"nystrom"``, ``"variational"``; the loader
        must be re-iterable). The model is put in eval mode and left unchanged; a
        failed fit keeps the previous posterior.

        Args:
            train_loader: Batches ``(x, y)`` or dicts.
            override: Must be ``True`` (a GP posterior cannot add data).
            progress_bar: Show tqdm progress bars.
            distributed: Must not ask for a reduction over processes (``None``
                with one process, or ``False``: fit this process's data).
            process_group: See ``distributed``.

        Raises:
            ValueError: For ``override=False``, a fit across processes, an empty or
                one-shot loader where a second pass is needed, targets that do not
                fit the likelihood, or ``n_subset`` larger than the data set.
        """
        if communicator(distributed, process_group) is not None:
            raise ValueError(
                "hessian_structure='gp' fits in one process: pass distributed=False "
                "to fit this rank's data, or fit on one rank."
            )
        if not override:
            raise ValueError(
                "hessian_structure='gp' cannot add to an earlier fit (override=False)."
            )
        if (
            self.functional_approximation is not FunctionalApproximation.SOD
            and iter(train_loader) is train_loader
        ):
            raise ValueError(
                f"functional_approximation='{self.functional_approximation.value}' "
                "passes over the data twice: pass a re-iterable train_loader."
            )
        self.model.eval()
        likelihood = self._likelihood_model()
        found = scan(
            self.model,
            train_loader,
            self._reader,
            likelihood,
            self.dict_key_x,
            self.n_subset,
            self.seed,
            progress_bar,
        )
        n_outputs = math.prod(found.output_shape)
        hyper.sigma_noise(self._hyper.sigma_noise, found.loss, n_outputs)
        source = self._make_source(likelihood, found.inputs)
        mean = source.parameter_vector()
        prior = self._fit_prior(source, mean)
        anchors = AnchorRows(
            source, found.inputs, source.block_sizes, self.options.memory_budget
        )
        posterior = self._posterior(
            anchors, likelihood, prior, found.n_data, train_loader, progress_bar
        )
        state = FunctionSpaceState(
            source=source,
            posterior=posterior,
            approximation=self.functional_approximation,
            prior_fit=prior,
            mean=mean,
            loss=found.loss,
            n_data=found.n_data,
            n_outputs=n_outputs,
            output_shape=found.output_shape,
            likelihood=likelihood,
            sigma_fit=self._hyper.sigma_noise.detach(),
            anchor_targets=found.targets,
            n_subset=found.n_kept,
        )
        values = self._hyper.with_(
            prior_precision=prior,
            prior_mean=hyper.prior_mean(self._hyper.prior_mean, mean, len(mean)),
        )
        self._replace_state(state, values)

    def _likelihood_model(self) -> LikelihoodModel:
        sigma = self._hyper.sigma_noise
        weights = None
        if sigma.ndim == 1:  # per-output weights, as the weight-space fit
            weights = (sigma[0] / sigma).square().detach()
        return LikelihoodModel(self.likelihood, weights)

    def _fit_prior(self, source: CurvatureSource, mean: Tensor) -> Tensor:
        sizes = source.block_sizes
        prior = hyper.prior_precision(self._hyper.prior_precision, mean, sizes)
        if prior.ndim == 1 and prior.shape[0] != len(sizes):
            raise ValueError(
                "hessian_structure='gp' supports a scalar prior precision or one per "
                f"parameter tensor [{len(sizes)}], not one per parameter "
                f"[{sum(sizes)}]."
            )
        return prior.detach()

    def _posterior(
        self,
        anchors: AnchorRows,
        likelihood: LikelihoodModel,
        prior: Tensor,
        n_data: int,
        loader: Iterable,
        progress_bar: bool,
    ) -> SpectralGP:
        """The approximation's GP posterior at the fit's prior, unit data scale."""
        independent = self.independent_outputs
        variances = prior.expand(len(anchors.block_sizes)).reciprocal()
        approximation = self.functional_approximation
        with torch.no_grad():
            if approximation is FunctionalApproximation.SOD:
                weight = n_data / anchors.num_points  # each point stands for N / M
                roots = output_hessian_root(likelihood, anchors.outputs, independent)
                return exact_posterior(
                    anchors, roots * math.sqrt(weight), variances, independent
                )
            batches = self._training_chunks(
                anchors.source, loader, likelihood, progress_bar
            )
            if approximation is FunctionalApproximation.NYSTROM:
                return nystrom_posterior(
                    anchors,
                    batches,
                    variances,
                    independent,
                    self.n_eigenvalues,
                    self.options.memory_budget,
                )
        from bayescurv.laplace.function_space.variational import (  # noqa: PLC0415
            variational_posterior,
        )

        return variational_posterior(
            anchors,
            self._reader.batches(loader),
            likelihood,
            variances,
            independent,
            n_data,
            self.batch_size,
            progress_bar,
        )

    def _training_chunks(
        self,
        source: CurvatureSource,
        loader: Iterable,
        likelihood: LikelihoodModel,
        progress_bar: bool,
    ) -> Iterator[Batch]:
        """Every training chunk's Jacobians and output Hessian roots."""
        bar = functools.partial(
            tqdm, disable=not progress_bar, desc="Laplace.fit (kernel)"
        )
        for inputs, _ in self._reader.batches(loader, wrap=bar):
            with torch.enable_grad() if source.needs_grad else torch.no_grad():
                chunks = list(source.jacobian_segments(inputs))
            for output, jac in chunks:
                root = output_hessian_root(
                    likelihood, output.detach(), self.independent_outputs
                )
                yield jac, root

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
        """The GP predictive on ``x`` (laplace-torch's arguments).

        The arguments of :meth:`~bayescurv.laplace.posterior.BaseLaplace.__call__`;
        ``pred_type`` is ``"glm"`` or laplace-torch's ``"gp"`` (the same
        predictive); ``"nn"`` raises (no weight samples).
        """
        del fitting
        _no_model_kwargs(model_kwargs)
        with eval_mode(self.model):
            return predictive.predict(
                self._gp_context("__call__"),
                self._hyper,
                x,
                pred_type,
                joint,
                link_approx,
                n_samples,
                diagonal_output,
                generator,
                noise,
            )

    def glm_moments(
        self, x: Any, joint: bool = False, diagonal_output: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Mean ``[N, C]`` and covariance ``[N, C, C]`` of the GP posterior."""
        with eval_mode(self.model):
            return predictive.moments(
                self._gp_context("glm_moments"), self._hyper, x, joint, diagonal_output
            )

    def functional_samples(
        self,
        x: Any,
        pred_type: PredType | str = PredType.GLM,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        joint: bool = False,
        **model_kwargs: Any,
    ) -> Tensor:
        """Draws of :math:`f(x)` ``[S, N, C]`` (``joint``: correlated over inputs)."""
        _no_model_kwargs(model_kwargs)
        with eval_mode(self.model):
            return predictive.functional_samples(
                self._gp_context("functional_samples"),
                self._hyper,
                x,
                pred_type,
                n_samples,
                diagonal_output,
                generator,
                joint,
            )

    def predictive_samples(
        self,
        x: Any,
        pred_type: PredType | str = PredType.GLM,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        joint: bool = False,
        **model_kwargs: Any,
    ) -> Tensor:
        """The link applied to :meth:`functional_samples`, ``[S, N, C]``."""
        samples = self.functional_samples(
            x, pred_type, n_samples, diagonal_output, generator, joint, **model_kwargs
        )
        return link_function(self.likelihood)(samples)

    def functional_variance(self, Js: Tensor) -> Tensor:
        r"""The GP posterior covariance ``[N, C, C]`` for Jacobians ``[N, C, P]``."""
        state = self._gp_state("functional_variance")
        jac = SegmentedJacobian([DenseSegment(self._check_jacobians(Js))], len(Js))
        factor, ratio = hyper_map(state, self._hyper)
        gp = state.posterior
        return gp.covariance(gp.project(jac), factor.detach(), ratio.detach())

    def functional_covariance(self, Js: Tensor) -> Tensor:
        """The joint GP posterior covariance ``[N C, N C]`` of Jacobians."""
        state = self._gp_state("functional_covariance")
        jac = SegmentedJacobian([DenseSegment(self._check_jacobians(Js))], len(Js))
        rows = JacobianRows.all_rows(jac, state.block_sizes)
        factor, ratio = hyper_map(state, self._hyper)
        return state.posterior.joint_covariance(rows, factor.detach(), ratio.detach())

    def gpytorch_model(self) -> tuple[Any, Any]:
        """Gpytorch's exact GP of the linearized network and its likelihood.

        Regression only; see :func:`~.exact_gp.exact_gp` (its exact marginal
        likelihood equals :meth:`log_marginal_likelihood` at the MAP).
        """
        from bayescurv.laplace.function_space.exact_gp import exact_gp  # noqa: PLC0415

        return exact_gp(self._gp_state("gpytorch_model"), self._hyper)

    # ------------------------------------------------------------ evidence
    def log_marginal_likelihood(
        self,
        prior_precision: hyper.Number | None = None,
        sigma_noise: hyper.Number | None = None,
    ) -> Tensor:
        r"""The Laplace evidence in function space (:mod:`.tuning`).

        Equal to the weight-space evidence with all data; differentiable in both
        arguments, which become the current values (stored detached).
        """
        state = self._gp_state("log_marginal_likelihood")
        values = self._hyper
        if prior_precision is not None:
            values = values.with_(prior_precision=self._valid_prior(prior_precision))
        if sigma_noise is not None:
            values = values.with_(sigma_noise=self._valid_sigma(sigma_noise))
        hyper_map(state, values)  # a clear error for a prior it cannot take
        self._set_hyper(
            values.with_(
                prior_precision=values.prior_precision.detach(),
                sigma_noise=values.sigma_noise.detach(),
            )
        )
        return tuning.log_marginal_likelihood(state, values)

    @property
    def log_det_posterior_precision(self) -> Tensor:
        r""":math:`\log\det\Lambda = \log\det(I + s R^\top K R) + \sum_i \log\pi_i`."""
        state = self._gp_state("log_det_posterior_precision")
        _, ratio = hyper_map(state, self._hyper)
        prior = evidence.log_prior_det(state, self._hyper.prior_precision)  # type: ignore[arg-type]
        return state.posterior.log_det(ratio) + prior

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
        loss: Loss | None = None,
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

        ``prior_structure="scalar"`` (the only one in function space) tunes a
        common factor of the fit's prior: the prior itself for a scalar prior;
        a per-tensor prior keeps its ratios and ``init_prior_prec`` and the grid
        set its first entry. ``marglik`` costs :math:`O(r)` per step (no kernel
        evaluation); ``gridsearch`` computes the validation kernels once.

        Returns:
            The negative evidence per Adam step (``marglik``), else ``None``.

        Raises:
            ValueError: For another prior structure, an unknown option,
                ``gridsearch`` without ``val_loader``, or ``tune_sigma_noise``
                without regression and ``marglik``.
        """
        state = self._gp_state("optimize_prior_precision")
        predictive.pred_type_of(pred_type)
        method = parse(TuningMethod, method, "method")
        structure = parse(PriorStructure, prior_structure, "prior_structure")
        link_approx = parse(LinkApprox, link_approx, "link_approx")
        if structure is not PriorStructure.SCALAR:
            raise ValueError(
                "hessian_structure='gp' tunes a common factor of the fit's prior "
                "(prior_structure='scalar'); for per-tensor priors refit with a "
                f"prior_precision of shape [{len(state.block_sizes)}], got "
                f"prior_structure='{structure.value}'."
            )
        if tune_sigma_noise and (
            self.likelihood is not Likelihood.REGRESSION
            or method is not TuningMethod.MARGLIK
        ):
            raise ValueError(
                "tune_sigma_noise=True needs likelihood='regression' and "
                "method='marglik'."
            )
        history = None
        if method is TuningMethod.MARGLIK:
            if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
                raise ValueError(f"n_steps must be a positive int, got {n_steps!r}.")
            start = self._hyper.with_(
                prior_precision=self._common(state, init_prior_prec)
            )
            tuned, history = tuning.optimize_marglik(
                state, start, n_steps, lr, tune_sigma_noise, progress_bar
            )
            self._set_hyper(tuned)
        else:
            if val_loader is None:
                raise ValueError("method='gridsearch' needs a val_loader.")
            grid = torch.logspace(
                log_prior_prec_min,
                log_prior_prec_max,
                grid_size,
                base=log_prior_prec_base,
            )
            candidates = [self._common(state, float(v)) for v in grid]
            with eval_mode(self.model):
                best = tuning.gridsearch(
                    state,
                    self._hyper,
                    candidates,
                    list(self._reader.batches(val_loader)),
                    loss or default_loss(self.likelihood, self.sigma_noise),
                    self.likelihood,
                    link_approx,
                    n_samples,
                    progress_bar,
                )
            self._set_hyper(self._hyper.with_(prior_precision=best))
        if verbose:
            print(f"Optimized prior precision: {self.prior_precision}.")
        return history

    def _common(self, state: FunctionSpaceState, value: float | Tensor) -> Tensor:
        """The fit's prior scaled so that its first entry is ``value``."""
        value = hyper.as_tensor(value, "init_prior_prec", state.mean)
        if value.numel() != 1:
            raise ValueError(
                "hessian_structure='gp' tunes one common factor: pass a number as "
                "init_prior_prec."
            )
        fit = state.prior_fit
        prior = fit * (value.reshape(()) / fit.reshape(-1)[0])
        hyper.check_positive(prior, "init_prior_prec")
        return prior.detach()

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The fitted posterior as plain tensors (:mod:`.serialization`)."""
        state = self._gp_state("state_dict")
        return serialization.state_dict(
            self._config(), state, self._hyper, self._gp_options()
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a posterior saved with :meth:`state_dict`.

        Recomputes the anchors' Jacobians on this model; no refit.

        Raises:
            ValueError: If the state belongs to another configuration or model.
        """
        state, values = serialization.load_state_dict(
            state_dict,
            self._config(),
            self._gp_options(),
            self._load_source,
            self.options.memory_budget,
        )
        self._replace_state(state, values)

    def _gp_options(self) -> dict[str, Any]:
        return {
            "functional_approximation": self.functional_approximation.value,
            "independent_outputs": self.independent_outputs,
        }

    # ------------------------------------------------- weight-space members
    @property
    def precision(self) -> NoReturn:
        """Not available: the GP posterior has no weight-space precision."""
        self._weight_space("precision")

    @property
    def posterior_precision(self) -> NoReturn:  # noqa: D102
        self._weight_space("posterior_precision")

    @property
    def posterior_covariance(self) -> NoReturn:  # noqa: D102
        self._weight_space("posterior_covariance")

    @property
    def posterior_variance(self) -> NoReturn:  # noqa: D102
        self._weight_space("posterior_variance")

    @property
    def posterior_scale(self) -> NoReturn:  # noqa: D102
        self._weight_space("posterior_scale")

    @property
    def H(self) -> NoReturn:  # noqa: D102
        self._weight_space("H")

    @property
    def H_facs(self) -> NoReturn:  # noqa: D102
        self._weight_space("H_facs")

    def sample(self, n_samples: int = 100, generator: Any = None) -> NoReturn:  # noqa: D102
        self._weight_space("sample")

    def square_norm(self, value: Tensor) -> NoReturn:  # noqa: D102
        self._weight_space("square_norm")

    def _weight_space(self, what: str) -> NoReturn:
        raise AttributeError(
            f"{type(self).__name__}.{what}: hessian_structure='gp' is the posterior "
            "of the network's outputs, not of its weights; use la(x), glm_moments "
            "or functional_variance, or a weight-space structure ('full', 'kron', ...)."
        )

    @property
    def state(self) -> FunctionSpaceState:  # type: ignore[override]
        """The immutable fitted state (:class:`~.state.FunctionSpaceState`)."""
        return self._gp_state("state")

    # -------------------------------------------------------------- helpers
    def _gp_state(self, what: str) -> FunctionSpaceState:
        return self._fitted(what)  # type: ignore[return-value]

    def _gp_context(self, what: str) -> Context:
        state = self._gp_state(what)
        return Context(
            state=state,  # type: ignore[arg-type]
            precision=None,  # type: ignore[arg-type]
            sigma_noise=self._hyper.sigma_noise,
            likelihood=self.likelihood,
            reader=self._reader,
            enable_backprop=self.enable_backprop,
        )

    def _valid_prior(self, value: hyper.Number) -> Tensor:
        tensor = super()._valid_prior(value)
        sizes = self._block_sizes()
        if sizes is not None and tensor.ndim == 1 and tensor.shape[0] != len(sizes):
            raise ValueError(
                "hessian_structure='gp' supports a scalar prior precision or one per "
                f"parameter tensor [{len(sizes)}], not one per parameter."
            )
        return tensor


class FunctionalLaplace(FunctionSpaceLaplace):
    """The GP posterior over all weights (laplace-torch's ``FunctionalLaplace``).

    Takes the arguments of :class:`FunctionSpaceLaplace`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(2, 1, bias=False).double()
        >>> x = torch.eye(2, dtype=torch.float64)
        >>> la = FunctionalLaplace(model, "regression")
        >>> la.fit([(x, model(x).detach())])
        >>> la(x)[1]  # x^T (x x^T + I)^{-1} x = I / 2, as FullLaplace
        tensor([[[0.5000]],
        <BLANKLINE>
                [[0.5000]]], dtype=torch.float64)
    """


class FunctionalLLLaplace(FunctionalLaplace):
    r"""The GP posterior over the last ``nn.Linear`` layer (``FunctionalLLLaplace``).

    The kernel is :math:`(\phi \phi'^\top / \pi_W + 1 / \pi_b) I_C` of the
    last layer's features (no Jacobian is formed).

    Args:
        model: A model whose output is the last Linear layer's output.
        likelihood: See :class:`FunctionSpaceLaplace`.
        n_subset: See :class:`FunctionSpaceLaplace`.
        sigma_noise: See :class:`FunctionSpaceLaplace`.
        prior_precision: See :class:`FunctionSpaceLaplace`.
        prior_mean: See :class:`FunctionSpaceLaplace`.
        temperature: See :class:`FunctionSpaceLaplace`.
        enable_backprop: See :class:`FunctionSpaceLaplace`.
        feature_reduction: Features ``[N, *T, d]`` to ``[N, d]`` (see
            :class:`~bayescurv.laplace.LastLayerLaplace`).
        dict_key_x: Input key of dict batches.
        dict_key_y: Target key of dict batches.
        last_layer_name: The layer's module name (default: found at ``fit``).
        backend: laplace-torch compatibility.
        backend_kwargs: laplace-torch compatibility.
        independent_outputs: See :class:`FunctionSpaceLaplace`.
        seed: See :class:`FunctionSpaceLaplace`.
        **kwargs: See :class:`FunctionSpaceLaplace`.
    """

    subset = SubsetOfWeights.LAST_LAYER

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        n_subset: int | None = None,
        sigma_noise: hyper.Number = 1.0,
        prior_precision: hyper.Number = 1.0,
        prior_mean: hyper.Number = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        feature_reduction: Any = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        last_layer_name: str | None = None,
        backend: Any = None,
        backend_kwargs: dict[str, Any] | None = None,
        independent_outputs: bool = False,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        self.feature_reduction = feature_reduction
        self.last_layer_name = last_layer_name
        if last_layer_name is not None:
            last_layer(model, last_layer_name)  # a clear error now, not at fit
        super().__init__(
            model,
            likelihood,
            n_subset,
            sigma_noise,
            prior_precision,
            prior_mean,
            temperature,
            enable_backprop,
            dict_key_x,
            dict_key_y,
            backend,
            backend_kwargs,
            independent_outputs,
            seed,
            **kwargs,
        )

    def _make_source(self, likelihood: LikelihoodModel, inputs: Any) -> CurvatureSource:
        name = self.last_layer_name or find_last_layer(self.model, inputs)
        return LastLayerSource(
            self.model, likelihood, self.options, name, self.feature_reduction
        )

    def _load_source(
        self, likelihood: LikelihoodModel, saved: dict[str, Any]
    ) -> CurvatureSource:
        name = saved.get("last_layer_name")
        if name is None:
            raise ValueError("the saved state names no last layer.")
        return LastLayerSource(
            self.model, likelihood, self.options, name, self.feature_reduction
        )

    def _subset_parameters(self) -> dict[str, nn.Parameter] | None:
        if self._state is not None:
            return self._state.source.parameters
        if self.last_layer_name is None:
            return None
        return LastLayerSource(
            self.model,
            None,
            self.options,
            self.last_layer_name,  # type: ignore[arg-type]
        ).parameters

    @property
    def last_layer(self) -> nn.Linear | None:
        """The last layer (``None`` before the first fit unless named)."""
        if self._state is not None:
            return self._state.source.layer  # type: ignore[attr-defined]
        if self.last_layer_name is None:
            return None
        return last_layer(self.model, self.last_layer_name)


def _optional_count(value: int | None, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}.")
    return value


def _no_model_kwargs(model_kwargs: dict[str, Any]) -> None:
    if model_kwargs:
        raise TypeError(
            f"unexpected keyword arguments {sorted(model_kwargs)}: the GP predictive "
            "does not call the model with keyword arguments."
        )
