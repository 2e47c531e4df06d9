r"""The predictive distribution of a fitted Laplace approximation (laplace-torch's API).

Two predictives (``pred_type``):

* ``"glm"`` (default): the linearized network
  :math:`f(x; \theta) \approx f(x; \theta_*) + J(x)(\theta - \theta_*)`, whose output
  is Gaussian, :math:`\mathcal{N}(f_\mu, J \Lambda^{-1} J^\top)`
  (:mod:`bayescurv.laplace.predict.glm`); classification pushes it through the
  softmax with a link approximation (:mod:`bayescurv.laplace.predict.links`);
* ``"nn"``: networks with weights sampled from the posterior, averaged
  (:mod:`bayescurv.laplace.predict.sampling`).

Every function takes a :class:`Context` (the fitted state and the posterior precision
for the current hyperparameters) and the inputs; none changes the model or the
posterior.

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

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bayescurv.curvature import CurvatureMatrix
from bayescurv.laplace.data import BatchReader, batch_size, describe
from bayescurv.laplace.enums import Likelihood, LinkApprox, PredType, parse
from bayescurv.laplace.predict import glm, streaming
from bayescurv.laplace.predict.links import (
    BINARY_LINKS,
    add_observation_noise,
    glm_link,
    link_function,
    sample_outputs,
)
from bayescurv.laplace.predict.sampling import network_outputs
from bayescurv.laplace.sources import CurvatureSource
from bayescurv.laplace.sources.last_layer import LastLayerSource
from bayescurv.laplace.state import FittedState


@dataclass(frozen=True)
class Context:
    """Everything a prediction needs besides the inputs (a fitted posterior).

    Attributes:
        state: The fitted state.
        precision: The posterior precision for the current hyperparameters.
        sigma_noise: The regression noise (for ``noise=True``).
        likelihood: The likelihood kind of the predictions.
        reader: Moves inputs to the model's device.
        enable_backprop: Keep the graph w.r.t. the inputs.
        same_outputs: Predictions have the outputs per sample of the fit (not so
            for reward modeling, fitted on pairs): checked on every ``x``.
        max_memory: Bytes the predictive's results may take (``None``: the engine's
            default); see :mod:`~bayescurv.laplace.predict.streaming`.
    """

    state: FittedState
    precision: CurvatureMatrix
    sigma_noise: Tensor
    likelihood: Likelihood
    reader: BatchReader
    enable_backprop: bool
    same_outputs: bool = True
    max_memory: int | None = None

    @property
    def source(self) -> CurvatureSource:
        """The subset's curvature source."""
        return self.state.source

    @property
    def device(self) -> torch.device:
        """The model's device."""
        return self.state.mean.device

    @property
    def positionwise(self) -> bool:
        """A classification per position: outputs ``[N, C, *T]``."""
        return (
            self.likelihood is Likelihood.CLASSIFICATION
            and len(self.state.output_shape) > 1
        )

    def from_positions(self, values: Tensor) -> Tensor:
        """``[..., N T, C]`` per position back to ``[..., N, C, *T]``."""
        classes, *positions = self.state.output_shape
        lead = values.shape[:-2]
        values = values.reshape(*lead, -1, math.prod(positions), classes)
        values = values.transpose(-1, -2)
        return values.reshape(*lead, values.shape[-3], classes, *positions)

    def sample(self, n_samples: int, generator: torch.Generator | None) -> Tensor:
        r"""Weights from :math:`\mathcal{N}(\theta_*, \Lambda^{-1})`, ``[n, P]``."""
        draws = self.precision.sample(n_samples, generator)
        return self.state.mean + draws.to(self.state.mean.dtype)

    def chunks(
        self,
        what: str,
        inputs: Any,
        per_input: tuple[int, int],
        fixed: int = 0,
        alternative: str = "",
    ) -> int:
        """Check a predictive's memory (:mod:`.streaming`); inputs per chunk.

        Args:
            what: The path, named in the error.
            inputs: All test inputs.
            per_input: Entries per input of the result (model dtype) and of the
                float64 temporaries of a chunk.
            fixed: Bytes that do not depend on the inputs (sampled weights).
            alternative: What to do instead, for the error.

        Raises:
            MemoryBudgetError: Above ``max_memory``, before allocating.
        """
        count = batch_size(inputs, self.reader.dict_key_x)
        item = self.state.mean.element_size()
        temporaries = per_input[1] * streaming.FLOAT64
        size = streaming.chunk_size(temporaries, self.source.options.memory_budget)
        streaming.check(
            f"{what} for N={count} inputs",
            fixed + count * per_input[0] * item,
            temporaries,
            min(size, count),
            alternative,
            self.max_memory,
            self.device,
        )
        return size

    def moment_entries(self, diagonal: bool) -> int:
        """Entries of the GLM mean and covariance per input."""
        outputs = self.state.n_outputs
        width = self.state.output_shape[0] if self.positionwise else outputs
        return outputs + (outputs if diagonal else outputs * width)


def glm_moments(
    ctx: Context, x: Any, joint: bool = False, diagonal_output: bool = False
) -> tuple[Tensor, Tensor]:
    r"""Mean and covariance of the linearized network's output.

    Args:
        ctx: The fitted posterior.
        x: Inputs ``[N, ...]`` (tensor, tuple or dict), moved to the model's device.
        joint: The covariance over all ``N C`` outputs.
        diagonal_output: Only the variances (no output covariances).

    Returns:
        :math:`f_\mu` ``[N, C]`` and :math:`f_{\mathrm{var}}` ``[N, C, C]``
        (``[N, C]`` with ``diagonal_output``); with ``joint``, ``[N C]`` and
        ``[N C, N C]`` (outputs flattened sample-major). A classification per
        position (outputs ``[N, C, *T]``) gives ``[N T, C]`` and ``[N T, C, C]``.

    Raises:
        ValueError: If ``enable_backprop`` is set and the source cannot keep the
            graph of its Jacobians.
    """
    inputs = ctx.reader.inputs(x)
    if joint:
        return _joint_moments(ctx, inputs)
    entries = ctx.moment_entries(diagonal_output)
    size = ctx.chunks(
        "GLM moments", inputs, (entries, 2 * entries), alternative=_CHEAPER_GLM
    )
    return streaming.stream(
        lambda chunk: _moments(ctx, chunk, diagonal_output),
        inputs,
        size,
        ctx.reader.dict_key_x,
    )


_CHEAPER_GLM = "Use diagonal_output=True, or predict on fewer inputs at a time."


def _joint_moments(ctx: Context, inputs: Any) -> tuple[Tensor, Tensor]:
    """The joint covariance ``[N C, N C]`` (not streamed: it couples inputs)."""
    rows = batch_size(inputs, ctx.reader.dict_key_x) * ctx.state.n_outputs
    ctx.chunks(
        f"joint GLM covariance [N C, N C] = [{rows}, {rows}]",
        inputs,
        (ctx.state.n_outputs, 0),
        fixed=3 * rows * rows * streaming.FLOAT64,  # columns, their concatenation, sum
        alternative="Use joint=False (per-input covariances [N, C, C]), or fewer "
        "inputs.",
    )
    return _moments(ctx, inputs, False, joint=True)


def _moments(
    ctx: Context, inputs: Any, diagonal_output: bool, joint: bool = False
) -> tuple[Tensor, Tensor]:
    """The GLM moments of one chunk of inputs (see :func:`glm_moments`)."""
    if ctx.enable_backprop and not ctx.source.supports_backprop:
        raise ValueError(
            f"enable_backprop=True: {type(ctx.source).__name__} cannot keep the "
            "graph of its Jacobians."
        )
    with torch.set_grad_enabled(ctx.enable_backprop or ctx.source.needs_grad):
        if ctx.positionwise:
            f_mu, f_var = glm.positionwise_moments(
                ctx.source,
                ctx.precision,
                inputs,
                ctx.state.output_shape[0],
                diagonal_output,
                ctx.enable_backprop,
            )
        else:
            f_mu, f_var = glm.glm_moments(
                ctx.source,
                ctx.precision,
                inputs,
                joint,
                diagonal_output,
                ctx.enable_backprop,
            )
    if not ctx.enable_backprop:
        f_mu, f_var = f_mu.detach(), f_var.detach()
    return f_mu, f_var


def _check_output_count(ctx: Context, count: int, inputs: Any) -> None:
    """Sampled networks must give as many outputs per sample on ``x`` as at fit.

    (The GLM predictive needs no such check: its Jacobians fail on such inputs.)

    Raises:
        ValueError: E.g. for ``x`` without a batch axis, which a model may map to
            one output per feature.
    """
    if ctx.positionwise or not ctx.same_outputs or count == ctx.state.n_outputs:
        return
    raise ValueError(
        f"x: the model gives {count} outputs per sample on inputs "
        f"{describe(inputs)}, the posterior was fitted with output shape "
        f"{list(ctx.state.output_shape)} per sample; pass x with the samples on the "
        "leading axis and the per-sample shape of the training inputs."
    )


def predict(
    ctx: Context,
    x: Any,
    pred_type: PredType | str = PredType.GLM,
    joint: bool = False,
    link_approx: LinkApprox | str = LinkApprox.PROBIT,
    n_samples: int = 100,
    diagonal_output: bool = False,
    generator: torch.Generator | None = None,
    noise: bool = False,
    model_kwargs: dict[str, Any] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """The posterior predictive on ``x``; see ``BaseLaplace.__call__``."""
    model_kwargs = model_kwargs or {}
    pred_type, link_approx = check_call(
        ctx, pred_type, link_approx, joint, diagonal_output, noise, model_kwargs
    )
    check_sampling(ctx, n_samples, generator)
    if pred_type is PredType.NN:
        return _nn_predictive(ctx, x, n_samples, generator, noise, model_kwargs)
    if joint:  # as laplace-torch: the joint covariance ignores diagonal_output
        f_mu, f_var = glm_moments(ctx, x, joint=True)
        if noise:
            f_var = add_observation_noise(f_var, ctx.sigma_noise, joint)
        return f_mu, f_var

    # the probit link reads only the variances: the covariances between outputs (C
    # times the contractions of the variances alone) are not formed
    variances_only = diagonal_output or (
        ctx.likelihood is not Likelihood.REGRESSION and link_approx is LinkApprox.PROBIT
    )

    def chunk(inputs: Any) -> Tensor | tuple[Tensor, Tensor]:
        f_mu, f_var = _moments(ctx, inputs, variances_only)
        if ctx.likelihood is Likelihood.REGRESSION:
            if noise:
                f_var = add_observation_noise(f_var, ctx.sigma_noise, False)
            return f_mu, f_var
        probs = glm_link(ctx.likelihood, f_mu, f_var, link_approx, n_samples, generator)
        return ctx.from_positions(probs) if ctx.positionwise else probs

    inputs = ctx.reader.inputs(x)
    moments = ctx.moment_entries(variances_only)
    draws = n_samples if link_approx is LinkApprox.MC else 1
    size = ctx.chunks(
        f"GLM predictive (link_approx='{link_approx.value}')",
        inputs,
        (moments, 2 * moments + 2 * draws * ctx.state.n_outputs),
        alternative=_CHEAPER_GLM,
    )
    return streaming.stream(chunk, inputs, size, ctx.reader.dict_key_x)


def _nn_predictive(
    ctx: Context,
    x: Any,
    n_samples: int,
    generator: torch.Generator | None,
    noise: bool,
    model_kwargs: dict[str, Any],
) -> Tensor | tuple[Tensor, Tensor]:
    if ctx.likelihood is not Likelihood.REGRESSION:
        samples = predictive_samples(
            ctx, x, PredType.NN, n_samples, generator=generator, **model_kwargs
        )
        return samples.mean(0)
    if n_samples < 2:
        raise ValueError(
            "pred_type='nn' estimates the regression variance from the samples and "
            f"needs n_samples >= 2, got {n_samples}."
        )
    samples = functional_samples(
        ctx, x, PredType.NN, n_samples, generator=generator, **model_kwargs
    )
    variance = samples.var(0)
    if noise:
        variance = add_observation_noise(variance, ctx.sigma_noise, False)
    return samples.mean(0), variance


def functional_samples(
    ctx: Context,
    x: Any,
    pred_type: PredType | str = PredType.GLM,
    n_samples: int = 100,
    diagonal_output: bool = False,
    generator: torch.Generator | None = None,
    **model_kwargs: Any,
) -> Tensor:
    r"""Samples of the output :math:`f(x)` under the posterior, ``[S, N, C]``.

    ``[S, N, C, *T]`` for a classification per position.

    ``"glm"`` draws from :math:`\mathcal{N}(f_\mu, f_{\mathrm{var}})`
    (independent outputs with ``diagonal_output``); ``"nn"`` evaluates networks
    with sampled weights (``model_kwargs`` go to the model call).
    """
    pred_type = parse(PredType, pred_type, "pred_type")
    check_sampling(ctx, n_samples, generator)
    inputs = ctx.reader.inputs(x)
    outputs = n_samples * ctx.state.n_outputs
    if pred_type is PredType.GLM:
        _check_no_model_kwargs(model_kwargs)
        moments = ctx.moment_entries(diagonal_output)
        size = ctx.chunks(
            "GLM functional samples [S, N, C]",
            inputs,
            (outputs, 2 * moments + outputs),
            alternative="Use fewer n_samples, or fewer inputs at a time.",
        )

        def glm_chunk(chunk: Any) -> Tensor:
            f_mu, f_var = _moments(ctx, chunk, diagonal_output)
            samples = sample_outputs(f_mu, f_var, n_samples, generator)
            return ctx.from_positions(samples) if ctx.positionwise else samples

        return streaming.stream(glm_chunk, inputs, size, ctx.reader.dict_key_x, 1)
    params = ctx.state.mean.numel()
    size = ctx.chunks(
        f"pred_type='nn': sampled weights [S, P] = [{n_samples}, {params}] and "
        "outputs [S, N, C]",
        inputs,
        (outputs, outputs),
        fixed=n_samples * params * (streaming.FLOAT64 + ctx.state.mean.element_size()),
        alternative="Use fewer n_samples, or pred_type='glm' (no sampled weights).",
    )
    weights = ctx.sample(n_samples, generator)  # once: every chunk sees them

    def nn_chunk(chunk: Any) -> Tensor:
        with torch.set_grad_enabled(ctx.enable_backprop):
            outputs = network_outputs(ctx.source, weights, chunk, model_kwargs)
        if not isinstance(ctx.source, LastLayerSource):  # its outputs: the layer's
            _check_output_count(ctx, outputs.shape[-1], chunk)
        if ctx.positionwise:
            outputs = outputs.reshape(*outputs.shape[:2], *ctx.state.output_shape)
        return outputs if ctx.enable_backprop else outputs.detach()

    return streaming.stream(nn_chunk, inputs, size, ctx.reader.dict_key_x, 1)


def predictive_samples(
    ctx: Context,
    x: Any,
    pred_type: PredType | str = PredType.GLM,
    n_samples: int = 100,
    diagonal_output: bool = False,
    generator: torch.Generator | None = None,
    **model_kwargs: Any,
) -> Tensor:
    """The link applied to :func:`functional_samples`, ``[S, N, C]``.

    Probabilities (softmax for classification, sigmoid for binary) or outputs
    (regression, without observation noise).
    """
    samples = functional_samples(
        ctx, x, pred_type, n_samples, diagonal_output, generator, **model_kwargs
    )
    if ctx.positionwise:  # classes on axis 2
        return samples.softmax(2)
    return link_function(ctx.likelihood)(samples)


def check_call(
    ctx: Context,
    pred_type: PredType | str,
    link_approx: LinkApprox | str,
    joint: bool,
    diagonal_output: bool,
    noise: bool,
    model_kwargs: dict[str, Any],
) -> tuple[PredType, LinkApprox]:
    """Parse and check the options of a predictive call.

    Raises:
        ValueError: For an unknown option or a combination that does not apply.
        TypeError: For model keyword arguments with ``"glm"``.
    """
    pred_type = parse(PredType, pred_type, "pred_type")
    link_approx = parse(LinkApprox, link_approx, "link_approx")
    kind = ctx.likelihood.value
    if pred_type is PredType.NN and link_approx is not LinkApprox.MC:
        raise ValueError(
            "pred_type='nn' averages over sampled networks: pass link_approx='mc' "
            f"(got '{link_approx.value}'), as in laplace-torch."
        )
    if pred_type is PredType.GLM:
        _check_no_model_kwargs(model_kwargs)
    if joint and (pred_type is PredType.NN or kind != "regression"):
        raise ValueError(
            "joint=True gives the joint Gaussian over the outputs of pred_type='glm' "
            f"with likelihood='regression', not pred_type='{pred_type.value}' with "
            f"likelihood='{kind}'."
        )
    if noise and kind != "regression":
        raise ValueError(
            f"noise=True adds the regression noise; likelihood='{kind}' has none."
        )
    if ctx.likelihood is Likelihood.BINARY and link_approx not in BINARY_LINKS:
        valid = ", ".join(repr(m.value) for m in BINARY_LINKS)
        raise ValueError(
            f"link_approx='{link_approx.value}' needs likelihood='classification'; "
            f"for 'binary' use one of {valid}."
        )
    return pred_type, link_approx


def check_sampling(
    ctx: Context, n_samples: int, generator: torch.Generator | None
) -> None:
    """Raise a ``ValueError`` for a bad sample count or generator."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}.")
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise ValueError(
            f"generator must be a torch.Generator, got {type(generator).__name__}."
        )
    if generator.device.type != ctx.device.type:
        raise ValueError(
            f"the generator is on {generator.device}, the model on {ctx.device}."
        )


def _check_no_model_kwargs(model_kwargs: dict[str, Any]) -> None:
    if model_kwargs:
        raise TypeError(
            f"unexpected keyword arguments {sorted(model_kwargs)}: keyword arguments "
            "of the model call are supported for pred_type='nn' only."
        )
