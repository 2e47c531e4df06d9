r"""The predictive of a function-space posterior: laplace-torch's ``la(x)``.

The GP posterior gives the linearized network's Gaussian over the outputs,

.. math::
    f(x_*) \sim \mathcal N\big(f(x_*; \theta_*),\ \operatorname{Cov}[f_*]\big)

with the network output at the MAP as mean (as for every Laplace posterior) and
the GP covariance of :mod:`.spectral`, which equals the weight-space
:math:`J_* \Lambda^{-1} J_*^\top` for the same data and prior. Link approximations,
observation noise and samples are the weight-space ones
(:mod:`bayescurv.laplace.predict.links`).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from bayescurv.laplace.enums import Likelihood, LinkApprox, PredType
from bayescurv.laplace.function_space.rows import JacobianRows, concat_rows
from bayescurv.laplace.function_space.state import FunctionSpaceState, hyper_map
from bayescurv.laplace.predict.links import (
    add_observation_noise,
    glm_link,
    sample_outputs,
)
from bayescurv.laplace.predict.predictive import Context, check_call, check_sampling
from bayescurv.laplace.state import Hyperparameters


def pred_type_of(pred_type: PredType | str) -> PredType | str:
    """laplace-torch's ``"gp"`` is the GLM predictive here; ``"nn"`` is refused.

    Raises:
        ValueError: For ``"nn"`` (a function-space posterior has no weight samples).
    """
    if pred_type == "gp":
        return PredType.GLM
    if pred_type == PredType.NN:
        raise ValueError(
            "pred_type='nn' samples weights; the function-space posterior "
            "(hessian_structure='gp') has none: use pred_type='glm' (or 'gp'), or a "
            "weight-space structure."
        )
    return pred_type


def glm_moments(
    state: FunctionSpaceState,
    hyper: Hyperparameters,
    inputs: Any,
    joint: bool = False,
    diagonal: bool = False,
    differentiable: bool = False,
) -> tuple[Tensor, Tensor]:
    r"""Mean and covariance of the linearized network's output (the GP posterior).

    Args:
        state: The fitted state.
        hyper: The hyperparameters.
        inputs: A batch of inputs on the model's device.
        joint: The covariance over all ``N C`` outputs.
        diagonal: Only the variances.
        differentiable: Keep the graph w.r.t. the inputs.

    Returns:
        :math:`f_\mu` ``[N, C]`` and :math:`f_{\mathrm{var}}` ``[N, C, C]``
        (``[N, C]`` if ``diagonal``); with ``joint``, ``[N C]`` and
        ``[N C, N C]``.
    """
    factor, ratio = (v.detach() for v in hyper_map(state, hyper))
    gp, source = state.posterior, state.source
    means, variances, rows = [], [], []
    with torch.set_grad_enabled(differentiable or source.needs_grad):
        for f_mu, jac in source.jacobian_segments(inputs, differentiable):
            means.append(f_mu)
            if joint:
                rows.append(JacobianRows.all_rows(jac, gp.block_sizes))
                continue
            with torch.set_grad_enabled(differentiable):
                variances.append(
                    gp.covariance(gp.project(jac, diagonal), factor, ratio)
                )
    f_mu = torch.cat(means)
    if joint:
        with torch.set_grad_enabled(differentiable):
            return f_mu.flatten(), gp.joint_covariance(concat_rows(rows), factor, ratio)
    return f_mu, torch.cat(variances)


def predict(
    ctx: Context,
    hyper: Hyperparameters,
    x: Any,
    pred_type: PredType | str,
    joint: bool,
    link_approx: LinkApprox | str,
    n_samples: int,
    diagonal_output: bool,
    generator: torch.Generator | None,
    noise: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    """``la(x)``: probabilities, or ``(f_mu, f_var)`` for regression.

    Raises:
        ValueError: For ``pred_type="nn"``, an unknown option or a combination
            that does not apply (as the weight-space predictive).
    """
    pred_type = pred_type_of(pred_type)
    _, link_approx = check_call(
        ctx, pred_type, link_approx, joint, diagonal_output, noise, {}
    )
    check_sampling(ctx, n_samples, generator)
    f_mu, f_var = moments(ctx, hyper, x, joint, diagonal_output)
    if ctx.likelihood is Likelihood.REGRESSION:
        if noise:
            f_var = add_observation_noise(f_var, ctx.sigma_noise, joint)
        return f_mu, f_var
    return glm_link(ctx.likelihood, f_mu, f_var, link_approx, n_samples, generator)


def moments(
    ctx: Context,
    hyper: Hyperparameters,
    x: Any,
    joint: bool = False,
    diagonal_output: bool = False,
) -> tuple[Tensor, Tensor]:
    """:func:`glm_moments` on raw inputs ``x``.

    The inputs are moved to the device; the results are detached unless
    ``enable_backprop``.
    """
    f_mu, f_var = glm_moments(
        ctx.state,  # type: ignore[arg-type]
        hyper,
        ctx.reader.inputs(x),
        joint,
        diagonal_output,
        ctx.enable_backprop,
    )
    if not ctx.enable_backprop:
        f_mu, f_var = f_mu.detach(), f_var.detach()
    return f_mu, f_var


def functional_samples(
    ctx: Context,
    hyper: Hyperparameters,
    x: Any,
    pred_type: PredType | str,
    n_samples: int,
    diagonal_output: bool,
    generator: torch.Generator | None,
    joint: bool = False,
) -> Tensor:
    r"""Draws of :math:`f(x)` from the GP posterior, ``[S, N, C]``.

    With ``joint`` the draws are correlated across the inputs (the joint Gaussian
    over all ``N C`` outputs), as laplace-torch's function-space estimators do.
    ``pred_type="nn"`` draws from the GP posterior too, with a warning (as
    laplace-torch: there are no weight samples to push through the network).
    """
    if pred_type == PredType.NN:
        warnings.warn(
            "pred_type='nn' has no weight samples in function space "
            "(hessian_structure='gp'): drawing from the GP posterior of the "
            "linearized network (pred_type='glm'), as laplace-torch does.",
            UserWarning,
            stacklevel=3,
        )
    else:
        pred_type_of(pred_type)
    check_sampling(ctx, n_samples, generator)
    if joint:
        f_mu, f_var = moments(ctx, hyper, x, joint=True)
        samples = sample_outputs(f_mu[None], f_var[None], n_samples, generator)
        return samples.reshape(n_samples, -1, ctx.state.n_outputs)
    f_mu, f_var = moments(ctx, hyper, x, diagonal_output=diagonal_output)
    return sample_outputs(f_mu, f_var, n_samples, generator)
