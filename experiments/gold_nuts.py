r"""NUTS on a problem's Bayesian network: preconditioned chains and their diagnostics.

Each chain is Pyro's NUTS on the potential :math:`-\log p(\theta, \mathcal{D})` of
the problem's :class:`~bayescurv.laplace.pyro_model.BayesianNetwork` (its
``log_joint``, the model's own density without a Pyro trace).
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
# matrix needs trees of hundreds of leapfrog steps. The chains therefore run in the
# coordinates z of theta = theta_MAP + L z with L the Cholesky factor of the
# all-weights full Laplace covariance at the MAP: the same as a dense mass matrix
# L L^T. This changes only the sampler's efficiency, never its target (the exact
# posterior); the diagnostics below check that the chains agree.
class Potential:
    """The potential energy of the whitened coordinates ``z`` (see the NOTE).

    Attributes:
        start: The MAP, ``[P]``.
        root: ``L``, ``[P, P]``.
        evaluations: Number of calls so far (leapfrog steps and initial ones).
    """

    def __init__(self, problem: Problem, data: Data, net: nn.Module) -> None:
        self.model = problem.bayesian(net)
        self.data = data
        la = Laplace(
            net,
            problem.likelihood,
            subset_of_weights="all",
            hessian_structure="full",
            prior_precision=problem.prior_precision,
            sigma_noise=problem.sigma_noise,
        )
        la.fit([(data.x_train, data.y_train)])
        posterior = posterior_distribution(la)
        self.start = posterior.mean
        self.root = torch.linalg.cholesky(posterior.covariance_matrix)
        self.evaluations = 0

    def __call__(self, params: dict[str, Tensor]) -> Tensor:
        r""":math:`-\log p(\theta(z), \mathcal{D})` of ``params["z"]`` ``[P]``."""
        self.evaluations += 1
        weights = self.weights(params["z"])
        return -self.model.log_joint(weights, self.data.x_train, self.data.y_train)

    def weights(self, z: Tensor) -> Tensor:
        """Weights ``[..., P]`` of whitened coordinates ``[..., P]``."""
        return self.start + z @ self.root.mT


def run_chain(
    potential: Potential, settings: NutsSettings, seed: int
) -> tuple[Tensor, int]:
    """One NUTS chain from a standard normal draw of ``z`` (a Laplace posterior draw).

    Returns:
        Draws ``[S, P]`` and the number of divergent transitions after warm-up.
    """
    pyro.set_rng_seed(seed)
    kernel = NUTS(
        potential_fn=potential,
        max_tree_depth=settings.max_tree_depth,
        target_accept_prob=0.8,
    )
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(
        potential.start.shape, generator=gen, dtype=potential.start.dtype
    )
    mcmc = MCMC(
        kernel,
        num_samples=settings.samples,
        warmup_steps=settings.warmup,
        initial_params={"z": start},
        disable_progbar=True,
    )
    mcmc.run()
    divergences = len(mcmc.diagnostics()["divergences"]["chain 0"])
    return potential.weights(mcmc.get_samples()["z"]), divergences


# NOTE [One basin]
# A BNN posterior has many modes; chains started at the MAPs of different
# initializations stay in their modes (in a smoke test: split R-hat of the
# predictions up to 8.7 on digits), so their pooled draws weigh the modes equally,
# not by their mass, and never converge. The gold standard is therefore the
# posterior of the basin of the MAP that every Laplace approximation expands
# around: all chains start there, from independent draws of the Laplace posterior
# (overdispersed in the directions where it is too narrow), and R-hat checks that
# they agree. The deep ensemble averages over five basins; its distance to NUTS
# includes the spread between modes.
def run_nuts(problem: Problem, data: Data, net: nn.Module, seed: int) -> NutsRun:
    """``problem.nuts.chains`` chains around the MAP ``net`` (see the module doc)."""
    settings = problem.nuts
    begin = time.perf_counter()
    potential = Potential(problem, data, net)
    draws, divergences = [], 0
    for chain in range(settings.chains):
        weights, divergent = run_chain(potential, settings, seed + chain)
        draws.append(weights)
        divergences += divergent
    return NutsRun(
        torch.stack(draws),
        time.perf_counter() - begin,
        potential.evaluations,
        divergences,
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
