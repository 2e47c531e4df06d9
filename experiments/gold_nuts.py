r"""NUTS on a problem's Bayesian network: preconditioned chains and their diagnostics.

Each chain is Pyro's NUTS on the potential :math:`-\log p(\theta, \mathcal{D})` of
the problem's :class:`~bayescurv.laplace.pyro_model.BayesianNetwork` (its
``log_joint``, the model's own density without a Pyro trace), started at the MAP of
one initialization seed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pyro
import torch
from pyro.infer import MCMC, NUTS
from pyro.ops.stats import effective_sample_size, split_gelman_rubin
from torch import Tensor, nn

from bayescurv import Laplace
from bayescurv.laplace.pyro import posterior_distribution
from experiments.gold_problems import Data, NutsSettings, Problem


@dataclass(frozen=True)
class NutsRun:
    """Draws of all chains and what they cost.

    Attributes:
        weights: ``[C, S, P]`` draws per chain.
        seconds: Wall-clock time of all chains.
        gradient_evaluations: Potential gradients over all chains (leapfrog steps).
        divergences: Divergent transitions after warm-up, summed over chains.
    """

    weights: Tensor
    seconds: float
    gradient_evaluations: int
    divergences: int


# NOTE [Preconditioned NUTS]
# A BNN posterior is badly conditioned: the data pin some directions to widths of
# ~sigma / sqrt(N) while others keep the prior's width, so NUTS with a diagonal mass
# matrix needs trees of hundreds of leapfrog steps. Each chain therefore runs in the
# coordinates z of theta = theta_MAP + L z with L the Cholesky factor of the
# all-weights full Laplace covariance at its start: the same as a dense mass matrix
# L L^T. This changes only the sampler's efficiency, never its target (the exact
# posterior); the diagnostics below check that the chains agree.
def run_chain(
    problem: Problem, data: Data, net: nn.Module, settings: NutsSettings, seed: int
) -> tuple[Tensor, int, int]:
    """One NUTS chain started at the MAP ``net``.

    Returns:
        Draws ``[S, P]``, the number of gradient evaluations and of divergences.
    """
    model = problem.bayesian(net)
    la = Laplace(
        net,
        problem.likelihood,
        subset_of_weights="all",
        hessian_structure="full",
        prior_precision=problem.prior_precision,
        sigma_noise=problem.sigma_noise,
    )
    la.fit([(data.x_train, data.y_train)])
    preconditioner = posterior_distribution(la)
    root = torch.linalg.cholesky(preconditioner.covariance_matrix)
    start = preconditioner.mean
    evaluations = 0

    def potential(params: dict[str, Tensor]) -> Tensor:
        nonlocal evaluations
        evaluations += 1
        weights = start + root @ params["z"]
        return -model.log_joint(weights, data.x_train, data.y_train)

    pyro.set_rng_seed(seed)
    kernel = NUTS(
        potential_fn=potential,
        max_tree_depth=settings.max_tree_depth,
        target_accept_prob=0.8,
    )
    mcmc = MCMC(
        kernel,
        num_samples=settings.samples,
        warmup_steps=settings.warmup,
        initial_params={"z": torch.zeros_like(start)},
        disable_progbar=True,
    )
    mcmc.run()
    divergences = len(mcmc.diagnostics()["divergences"]["chain 0"])
    draws = start + mcmc.get_samples()["z"] @ root.mT
    return draws, evaluations, divergences


def run_nuts(problem: Problem, data: Data, nets: list[nn.Module], seed: int) -> NutsRun:
    """``problem.nuts.chains`` chains, chain ``c`` started at ``nets[c]``."""
    settings = problem.nuts
    begin = time.perf_counter()
    draws, evaluations, divergences = [], 0, 0
    for chain in range(settings.chains):
        result = run_chain(problem, data, nets[chain], settings, seed + chain)
        draws.append(result[0])
        evaluations += result[1]
        divergences += result[2]
    return NutsRun(
        torch.stack(draws), time.perf_counter() - begin, evaluations, divergences
    )


def diagnostics(values: Tensor) -> dict[str, float]:
    """Split R-hat and effective sample size of every scalar, summarized.

    Args:
        values: ``[C, S, ...]`` draws of ``C`` chains (e.g. predictions per test
            point).

    Returns:
        ``rhat_max``, ``rhat_median``, ``ess_min``, ``ess_median`` (bulk ESS over all
        ``C S`` draws).
    """
    flat = values.reshape(*values.shape[:2], -1)
    rhat = split_gelman_rubin(flat, chain_dim=0, sample_dim=1)
    ess = effective_sample_size(flat, chain_dim=0, sample_dim=1)
    finite = torch.isfinite(rhat)  # constant entries have no R-hat
    return {
        "rhat_max": rhat[finite].max().item(),
        "rhat_median": rhat[finite].median().item(),
        "ess_min": ess[finite].min().item(),
        "ess_median": ess[finite].median().item(),
    }
