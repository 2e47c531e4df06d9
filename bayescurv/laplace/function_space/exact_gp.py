r"""gpytorch's exact GP of the linearized network (regression).

For a Gaussian likelihood the linearized network with the prior
:math:`\theta \sim \mathcal N(\mu_0, \Sigma_0)` *is* a GP regression model,

.. math::
    f(x) \sim \mathcal{GP}\big(m(x),\ J(x) \Sigma_0 J(x')^\top\big), \quad
    m(x) = f(x; \theta_*) + J(x)(\mu_0 - \theta_*), \quad
    y = f + \varepsilon,\ \varepsilon \sim \mathcal N(0, T\sigma^2),

and :func:`exact_gp` returns it as a gpytorch
:class:`~gpytorch.models.ExactGP` on the posterior's training points (all, or the
subset, whose noise is scaled by :math:`M / N` as each point stands for
:math:`N / M`). Its :class:`~gpytorch.mlls.ExactMarginalLogLikelihood` is the
linearized model's exact evidence, which equals the Laplace evidence at the MAP
(where the linear model's posterior mode is :math:`\theta_*`; away from it the
exact one is larger) for temperature 1; its predictive equals ``la(x)`` at the MAP
(its mean is the linear model's posterior mean, the network output there).
Everything gpytorch offers (fantasies, other likelihoods, hyperparameter training)
then applies. gpytorch switches to iterative solvers above 800 rows; wrap the calls
in ``gpytorch.settings.max_cholesky_size(n)`` for exact ones.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from bayescurv import FunctionalLaplace
    >>> model = nn.Linear(2, 1, bias=False).double()
    >>> x, y = torch.eye(2, dtype=torch.float64), torch.ones(2, 1, dtype=torch.float64)
    >>> with torch.no_grad():
    ...     _ = model.weight.fill_(0.5)  # the MAP under prior 1, noise 1
    >>> la = FunctionalLaplace(model, "regression")
    >>> la.fit([(x, y)])
    >>> gp, likelihood = exact_gp(la.state, la.hyperparameters)
    >>> rows = gp.train_inputs[0]
    >>> mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, gp)
    >>> exact = mll(gp(rows), gp.train_targets) * len(rows)
    >>> torch.allclose(exact, la.log_marginal_likelihood())
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import gpytorch
import torch
from torch import Tensor

from bayescurv.laplace.enums import Likelihood
from bayescurv.laplace.function_space.kernel import NTKKernel, decode_rows, encode_rows
from bayescurv.laplace.function_space.state import FunctionSpaceState, hyper_map
from bayescurv.laplace.sources import CurvatureSource
from bayescurv.laplace.state import Hyperparameters


class LinearizedMean(gpytorch.means.Mean):
    r"""The prior mean :math:`m(x)_c = f_c(x; \theta_*) + J_c(x)(\mu_0 - \theta_*)`.

    Args:
        source: The weight subset's source (outputs and Jacobians).
        input_shape: One input's shape.
        shift: :math:`\mu_0 - \theta_*`, ``[P]``.
    """

    def __init__(
        self, source: CurvatureSource, input_shape: Sequence[int], shift: Tensor
    ) -> None:
        super().__init__()
        self.source = source
        self.input_shape = tuple(input_shape)
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, rows: Tensor) -> Tensor:  # noqa: D102
        inputs, index, outputs = decode_rows(rows, self.input_shape)
        means = []
        with torch.set_grad_enabled(self.source.needs_grad):
            for output, jac in self.source.jacobian_segments(inputs):
                block = slice(0, jac.num_params)
                moved = jac.matmul(block, self.shift[:, None].to(output))[..., 0]
                means.append((output + moved).detach())
        return torch.cat(means)[index, outputs]


class LinearizedExactGP(gpytorch.models.ExactGP):
    """The linearized network as gpytorch's exact GP (see the module doc)."""

    def __init__(
        self,
        rows: Tensor,
        targets: Tensor,
        likelihood: gpytorch.likelihoods.Likelihood,
        mean: LinearizedMean,
        kernel: NTKKernel,
    ) -> None:
        super().__init__(rows, targets, likelihood)
        self.mean_module = mean
        self.covar_module = kernel

    def forward(self, rows: Tensor) -> gpytorch.distributions.MultivariateNormal:  # noqa: D102
        return gpytorch.distributions.MultivariateNormal(
            self.mean_module(rows), self.covar_module(rows)
        )


def exact_gp(
    state: FunctionSpaceState, hyper: Hyperparameters
) -> tuple[LinearizedExactGP, gpytorch.likelihoods.FixedNoiseGaussianLikelihood]:
    """The exact GP regression model of a fitted regression posterior (module doc).

    Args:
        state: A fitted function-space state with ``likelihood="regression"`` and
            tensor inputs.
        hyper: The hyperparameters (prior as a common factor of the fit's).

    Returns:
        The model (in train mode, on the posterior's training rows and targets)
        and its fixed-noise Gaussian likelihood.

    Raises:
        ValueError: For another likelihood or non-tensor inputs.
    """
    if state.likelihood.kind is not Likelihood.REGRESSION:
        raise ValueError(
            "the exact GP exists for likelihood='regression' (a Gaussian "
            f"likelihood), not '{state.likelihood.kind.value}'."
        )
    inputs = state.anchor_inputs
    if not isinstance(inputs, Tensor):
        raise ValueError("the exact gpytorch GP needs tensor inputs ([x, c] rows).")
    factor, ratio = (v.detach() for v in hyper_map(state, hyper))
    classes = state.n_outputs
    weights = state.likelihood.noise_weights
    weights = torch.ones(classes).to(state.mean) if weights is None else weights
    scale = ratio * factor * state.n_data / state.n_subset  # s N / M
    noise = (1 / (scale * weights.to(state.mean))).repeat(len(state.anchor_targets))
    gp = state.posterior
    kernel = NTKKernel(
        state.source,
        inputs.shape[1:],
        gp.block_sizes,
        gp.variances / factor,
        gp.independent,
    )
    mean = LinearizedMean(state.source, inputs.shape[1:], hyper.prior_mean - state.mean)
    likelihood = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise=noise)
    rows = encode_rows(inputs, classes)
    targets = state.anchor_targets.reshape(-1).to(state.mean)
    model = LinearizedExactGP(rows, targets, likelihood, mean, kernel).to(state.mean)
    return model, likelihood
