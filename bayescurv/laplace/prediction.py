r"""The predictive distribution of a fitted Laplace approximation (laplace-torch's API).

Two predictives (``pred_type``):

* ``"glm"`` (default): the linearized network
  :math:`f(x; \theta) \approx f(x; \theta_*) + J(x)(\theta - \theta_*)`, whose output
  is Gaussian, :math:`\mathcal{N}(f_\mu, J \Lambda^{-1} J^\top)`
  (:mod:`bayescurv.laplace.functional`); classification pushes it through the
  softmax with a link approximation (:mod:`bayescurv.laplace.predictive`);
* ``"nn"``: networks with weights sampled from the posterior, averaged
  (:mod:`bayescurv.laplace.sampling`).

:class:`Predictive` is mixed into :class:`~bayescurv.laplace.posterior.BaseLaplace`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from bayescurv.laplace import functional
from bayescurv.laplace.enums import Likelihood, LinkApprox, PredType, parse
from bayescurv.laplace.predictive import (
    BINARY_LINKS,
    add_observation_noise,
    glm_link,
    link_function,
    sample_outputs,
)
from bayescurv.laplace.sampling import network_outputs

if TYPE_CHECKING:
    from bayescurv.curvature import CurvatureMatrix
    from bayescurv.laplace.data import BatchReader
    from bayescurv.laplace.sources import CurvatureSource


class Predictive:
    """``la(x, ...)``, ``predictive_samples``, ``functional_samples``, ``glm_moments``.

    Expects the attributes and helpers of
    :class:`~bayescurv.laplace.posterior.BaseLaplace`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import Laplace
        >>> model = nn.Linear(1, 1, bias=False).double()
        >>> x = torch.ones(1, 1, dtype=torch.float64)
        >>> la = Laplace(model, "regression", "all", "full", sigma_noise=0.5)
        >>> la.fit([(x, model(x).detach())])
        >>> f_mu, f_var = la(x)  # Lambda = x^2 / sigma^2 + 1 = 5: f_var = 1 / 5
        >>> f_var
        tensor([[[0.2000]]], dtype=torch.float64)
        >>> la(x, noise=True)[1]  # + sigma^2
        tensor([[[0.4500]]], dtype=torch.float64)
    """

    likelihood: Likelihood
    source: CurvatureSource
    enable_backprop: bool
    sigma_noise: Tensor
    _reader: BatchReader
    _device: torch.device

    if TYPE_CHECKING:

        def _check_fitted(self, what: str) -> None: ...
        def _precision(self) -> CurvatureMatrix: ...
        def sample(  # noqa: D102
            self, n_samples: int = 100, generator: torch.Generator | None = None
        ) -> Tensor: ...

    # ----------------------------------------------------------------- GLM
    def glm_moments(
        self, x: Any, joint: bool = False, diagonal_output: bool = False
    ) -> tuple[Tensor, Tensor]:
        r"""Mean and covariance of the linearized network's output.

        Args:
            x: Inputs ``[N, ...]`` (tensor, tuple or dict), moved to the model's
                device.
            joint: The covariance over all ``N C`` outputs.
            diagonal_output: Only the variances (no output covariances).

        Returns:
            :math:`f_\mu` ``[N, C]`` and :math:`f_{\mathrm{var}}` ``[N, C, C]``
            (``[N, C]`` with ``diagonal_output``); with ``joint``, ``[N C]`` and
            ``[N C, N C]`` (outputs flattened sample-major).
        """
        self._check_fitted("glm_moments")
        if self.enable_backprop and not self.source.supports_backprop:
            raise ValueError(
                f"enable_backprop=True: {type(self.source).__name__} cannot keep the "
                "graph of its Jacobians."
            )
        inputs = self._reader.inputs(x)
        precision = self._precision()
        with torch.set_grad_enabled(self.enable_backprop or self.source.needs_grad):
            f_mu, f_var = functional.glm_moments(
                self.source,
                precision,
                inputs,
                joint,
                diagonal_output,
                self.enable_backprop,
            )
        if not self.enable_backprop:
            f_mu, f_var = f_mu.detach(), f_var.detach()
        return f_mu, f_var

    # ---------------------------------------------------------- predictive
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
            generator: Randomness of ``"mc"`` and ``"nn"`` (on the model's device).
            fitting: laplace-torch's switch for its reward-modeling likelihood,
                which bayescurv does not have: no effect.
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
        del fitting
        pred_type, link_approx = self._check_call(
            pred_type, link_approx, joint, diagonal_output, noise, model_kwargs
        )
        self._check_sampling(n_samples, generator)
        regression = self.likelihood is Likelihood.REGRESSION
        if pred_type is PredType.NN:
            return self._nn_predictive(x, n_samples, generator, noise, model_kwargs)
        f_mu, f_var = self.glm_moments(x, joint=joint, diagonal_output=diagonal_output)
        if regression:
            if noise:
                f_var = add_observation_noise(f_var, self.sigma_noise, joint)
            return f_mu, f_var
        return glm_link(self.likelihood, f_mu, f_var, link_approx, n_samples, generator)

    def _nn_predictive(
        self,
        x: Any,
        n_samples: int,
        generator: torch.Generator | None,
        noise: bool,
        model_kwargs: dict[str, Any],
    ) -> Tensor | tuple[Tensor, Tensor]:
        if self.likelihood is not Likelihood.REGRESSION:
            samples = self.predictive_samples(
                x, PredType.NN, n_samples, generator=generator, **model_kwargs
            )
            return samples.mean(0)
        if n_samples < 2:
            raise ValueError(
                "pred_type='nn' estimates the regression variance from the samples "
                f"and needs n_samples >= 2, got {n_samples}."
            )
        samples = self.functional_samples(
            x, PredType.NN, n_samples, generator=generator, **model_kwargs
        )
        variance = samples.var(0)
        if noise:
            variance = add_observation_noise(variance, self.sigma_noise, False)
        return samples.mean(0), variance

    # ------------------------------------------------------------- samples
    def functional_samples(
        self,
        x: Any,
        pred_type: PredType | str = PredType.GLM,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        **model_kwargs: Any,
    ) -> Tensor:
        r"""Samples of the output :math:`f(x)` under the posterior.

        Args:
            x: Inputs ``[N, ...]``.
            pred_type: ``"glm"`` (draws from :math:`\mathcal{N}(f_\mu,
                f_{\mathrm{var}})`) or ``"nn"`` (outputs of sampled networks).
            n_samples: Draws ``S``.
            diagonal_output: ``"glm"``: independent outputs (no covariances).
            generator: Source of randomness.
            **model_kwargs: Keyword arguments of the model call (``"nn"`` only).

        Returns:
            ``[S, N, C]``.
        """
        pred_type = parse(PredType, pred_type, "pred_type")
        self._check_fitted("functional_samples")
        self._check_sampling(n_samples, generator)
        if pred_type is PredType.GLM:
            _check_no_model_kwargs(model_kwargs)
            f_mu, f_var = self.glm_moments(x, diagonal_output=diagonal_output)
            return sample_outputs(f_mu, f_var, n_samples, generator)
        weights = self.sample(n_samples, generator)
        inputs = self._reader.inputs(x)
        with torch.set_grad_enabled(self.enable_backprop):
            outputs = network_outputs(self.source, weights, inputs, model_kwargs)
        return outputs if self.enable_backprop else outputs.detach()

    def predictive_samples(
        self,
        x: Any,
        pred_type: PredType | str = PredType.GLM,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        **model_kwargs: Any,
    ) -> Tensor:
        """Samples of the predictive: the link applied to :meth:`functional_samples`.

        Args:
            x: Inputs ``[N, ...]``.
            pred_type: ``"glm"`` or ``"nn"``.
            n_samples: Draws ``S``.
            diagonal_output: ``"glm"``: independent outputs (no covariances).
            generator: Source of randomness.
            **model_kwargs: Keyword arguments of the model call (``"nn"`` only).

        Returns:
            ``[S, N, C]``: probabilities (softmax for classification, sigmoid for
            binary) or outputs (regression, without observation noise).
        """
        samples = self.functional_samples(
            x, pred_type, n_samples, diagonal_output, generator, **model_kwargs
        )
        return link_function(self.likelihood)(samples)

    # -------------------------------------------------------------- checks
    def _check_call(
        self,
        pred_type: PredType | str,
        link_approx: LinkApprox | str,
        joint: bool,
        diagonal_output: bool,
        noise: bool,
        model_kwargs: dict[str, Any],
    ) -> tuple[PredType, LinkApprox]:
        pred_type = parse(PredType, pred_type, "pred_type")
        link_approx = parse(LinkApprox, link_approx, "link_approx")
        self._check_fitted("__call__")
        kind = self.likelihood.value
        if pred_type is PredType.NN and link_approx is not LinkApprox.MC:
            raise ValueError(
                "pred_type='nn' averages over sampled networks: pass "
                f"link_approx='mc' (got '{link_approx.value}'), as in laplace-torch."
            )
        if pred_type is PredType.GLM:
            _check_no_model_kwargs(model_kwargs)
        if joint and (pred_type is PredType.NN or kind != "regression"):
            raise ValueError(
                "joint=True gives the joint Gaussian over the outputs of "
                "pred_type='glm' with likelihood='regression', not "
                f"pred_type='{pred_type.value}' with likelihood='{kind}'."
            )
        if joint and diagonal_output:
            raise ValueError("joint=True and diagonal_output=True exclude each other.")
        if noise and kind != "regression":
            raise ValueError(
                f"noise=True adds the regression noise; likelihood='{kind}' has none."
            )
        if self.likelihood is Likelihood.BINARY and link_approx not in BINARY_LINKS:
            valid = ", ".join(repr(m.value) for m in BINARY_LINKS)
            raise ValueError(
                f"link_approx='{link_approx.value}' needs likelihood='classification'"
                f"; for 'binary' use one of {valid}."
            )
        return pred_type, link_approx

    def _check_sampling(
        self, n_samples: int, generator: torch.Generator | None
    ) -> None:
        if isinstance(n_samples, bool) or not isinstance(n_samples, int):
            raise ValueError(f"n_samples must be a positive int, got {n_samples!r}.")
        if n_samples < 1:
            raise ValueError(f"n_samples must be a positive int, got {n_samples}.")
        if generator is None:
            return
        if not isinstance(generator, torch.Generator):
            raise ValueError(
                f"generator must be a torch.Generator, got {type(generator).__name__}."
            )
        if generator.device.type != self._device.type:
            raise ValueError(
                f"the generator is on {generator.device}, the model on {self._device}."
            )


def _check_no_model_kwargs(model_kwargs: dict[str, Any]) -> None:
    if model_kwargs:
        raise TypeError(
            f"unexpected keyword arguments {sorted(model_kwargs)}: keyword arguments "
            "of the model call are supported for pred_type='nn' only."
        )
