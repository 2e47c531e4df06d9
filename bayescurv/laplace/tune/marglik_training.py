r"""Online evidence optimization during training (Immer et al., 2021, Algorithm 1).

Alternates (i) epochs of MAP training of the weights on the negative log joint per
datum with the hyperparameters fixed,

.. math::
    \mathcal{L}(\theta) = \frac{1}{B} \sum_{n \in \text{batch}}
    \frac{s\, \ell(f_\theta(x_n), y_n)}{T} + \frac{1}{2N}\, \theta^\top
    \operatorname{diag}(\pi)\, \theta

(unit loss :math:`\ell` and scale :math:`s = 1/\sigma^2` as in
:mod:`bayescurv.laplace.likelihoods`), with (ii) every ``marglik_frequency`` epochs a
Laplace fit over all weights and ``n_hypersteps`` Adam steps on the log prior
precision (and the log noise) that maximize the Laplace evidence. The weights and
hyperparameters of the best evidence are kept (early stopping on the evidence).
laplace-torch's ``marglik_training`` has the same arguments (except ``backend``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import trange

from bayescurv.laplace.data import BatchReader, call_model
from bayescurv.laplace.enums import (
    HessianStructure,
    Likelihood,
    PriorStructure,
    parse,
)
from bayescurv.laplace.factory import Laplace
from bayescurv.laplace.posterior import BaseLaplace
from bayescurv.laplace.tune.prior import Adam


def unit_loss(likelihood: Likelihood, output: Tensor, target: Tensor) -> Tensor:
    """The summed unit loss of a batch (differentiable), see the likelihoods doc."""
    if likelihood is Likelihood.CLASSIFICATION:
        return nn.functional.cross_entropy(output, target, reduction="sum")
    if likelihood is Likelihood.BINARY:
        return nn.functional.binary_cross_entropy_with_logits(
            output, target, reduction="sum"
        )
    return 0.5 * (output - target).square().sum()


def marglik_training(
    model: nn.Module,
    train_loader: Iterable,
    likelihood: Likelihood | str = Likelihood.CLASSIFICATION,
    hessian_structure: HessianStructure | str = HessianStructure.KRON,
    backend: Any = None,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.Adam,
    optimizer_kwargs: dict[str, Any] | None = None,
    scheduler_cls: type | None = None,
    scheduler_kwargs: dict[str, Any] | None = None,
    n_epochs: int = 300,
    lr_hyp: float = 1e-1,
    prior_structure: PriorStructure | str = PriorStructure.LAYERWISE,
    n_epochs_burnin: int = 0,
    n_hypersteps: int = 10,
    marglik_frequency: int = 1,
    prior_prec_init: float = 1.0,
    sigma_noise_init: float = 1.0,
    temperature: float = 1.0,
    fix_sigma_noise: bool = False,
    progress_bar: bool = False,
    enable_backprop: bool = False,
    dict_key_x: str = "input_ids",
    dict_key_y: str = "labels",
) -> tuple[BaseLaplace, nn.Module, list[float], list[float]]:
    """Train ``model`` and its prior (and noise) by the Laplace evidence.

    Args:
        model: The model to train (in place); its output are logits or means.
        train_loader: Training batches (re-iterable); its length ``N`` is the
            number of samples it yields per epoch.
        likelihood: ``"classification"``, ``"regression"`` or ``"binary"``.
        hessian_structure: Structure of the Laplace fits (all weights).
        backend: laplace-torch's curvature backend class (e.g. ``BackPackGGN``,
            ``AsdlEF``): picks the curvature type (GGN, empirical Fisher or
            Hessian), computed by the engine; ``None``: the GGN.
        optimizer_cls: Optimizer of the weights.
        optimizer_kwargs: Its arguments (default ``lr=1e-3``).
        scheduler_cls: Optional learning-rate scheduler, stepped every batch.
        scheduler_kwargs: Its arguments.
        n_epochs: Training epochs.
        lr_hyp: Adam learning rate of the log hyperparameters.
        prior_structure: ``"scalar"``, ``"layerwise"`` or ``"diag"``.
        n_epochs_burnin: Epochs before the first evidence step.
        n_hypersteps: Adam steps on the hyperparameters per evidence step.
        marglik_frequency: Epochs between evidence steps.
        prior_prec_init: Initial prior precision.
        sigma_noise_init: Initial noise (regression).
        temperature: Posterior temperature.
        fix_sigma_noise: Keep the noise at ``sigma_noise_init``.
        progress_bar: Show a tqdm bar over epochs.
        enable_backprop: Passed to the returned Laplace.
        dict_key_x: Input key of dict batches.
        dict_key_y: Target key of dict batches.

    Returns:
        The Laplace fitted at the best evidence, the model (with the best weights),
        the negative evidence after every hyperstep and the training loss per epoch.

    Raises:
        ValueError: For an unknown option or an empty loader.
    """
    likelihood = parse(Likelihood, likelihood, "likelihood")
    structure = parse(PriorStructure, prior_structure, "prior_structure")
    params = [p for p in model.parameters() if p.requires_grad]
    like = params[0].detach()
    reader = BatchReader(dict_key_x, dict_key_y, like.device, likelihood, like.dtype)
    sizes = [p.numel() for p in params]
    shapes = {
        PriorStructure.SCALAR: (),
        PriorStructure.LAYERWISE: (len(sizes),),
        PriorStructure.DIAG: (sum(sizes),),
    }
    log_prior = torch.full(shapes[structure], math.log(prior_prec_init)).to(like)
    log_sigma = torch.tensor(math.log(sigma_noise_init)).to(like)
    tune_sigma = likelihood is Likelihood.REGRESSION and not fix_sigma_noise
    hyper = [log_prior.requires_grad_(True)] + (
        [log_sigma.requires_grad_(True)] if tune_sigma else []
    )
    hyper_optimizer = Adam(hyper, lr_hyp)
    optimizer = optimizer_cls(params, **(optimizer_kwargs or {"lr": 1e-3}))
    scheduler = (
        scheduler_cls(optimizer, **(scheduler_kwargs or {})) if scheduler_cls else None
    )
    num = sum(len(targets) for _, targets in reader.batches(train_loader))
    if num == 0:
        raise ValueError("marglik_training: train_loader yielded no batches.")

    def fitted_laplace(prior: Tensor, sigma: Tensor) -> BaseLaplace:
        """An all-weights Laplace of the current model with these hyperparameters."""
        la = Laplace(
            model,
            likelihood,
            subset_of_weights="all",
            hessian_structure=hessian_structure,
            backend=backend,
            prior_precision=prior,
            sigma_noise=sigma if likelihood is Likelihood.REGRESSION else 1.0,
            temperature=temperature,
            enable_backprop=enable_backprop,
            dict_key_x=dict_key_x,
            dict_key_y=dict_key_y,
        )
        la.fit(train_loader)
        return la

    best: tuple[float, dict | None, Tensor, Tensor] | None = None
    margliks: list[float] = []
    losses: list[float] = []
    for epoch in trange(1, n_epochs + 1, disable=not progress_bar, desc="marglik"):
        prior, sigma = log_prior.detach().exp(), log_sigma.detach().exp()
        losses.append(
            _train_epoch(
                model,
                train_loader,
                reader,
                likelihood,
                optimizer,
                scheduler,
                _expand(prior, sizes),
                _scale(likelihood, sigma, temperature),
                num,
            )
        )
        if epoch < n_epochs_burnin or epoch % marglik_frequency != 0:
            continue
        la = fitted_laplace(prior, sigma)
        improved = False
        for _ in range(n_hypersteps):
            # the evidence is evaluated at these values, before the Adam step
            evaluated = (log_prior.detach().exp(), log_sigma.detach().exp())
            noise = log_sigma.exp() if tune_sigma else None
            negative = -la.log_marginal_likelihood(log_prior.exp(), noise)
            hyper_optimizer.step(list(torch.autograd.grad(negative, hyper)))
            margliks.append(negative.item())
            if best is None or margliks[-1] < best[0]:
                best = (margliks[-1], None, *evaluated)  # weights: below
                improved = True
        if improved:  # the weights are the same for every hyperstep of an epoch
            best = (best[0], copy.deepcopy(model.state_dict()), *best[2:])
    if best is not None:
        model.load_state_dict(best[1])
        prior, sigma = best[2], best[3]
    else:
        prior, sigma = log_prior.detach().exp(), log_sigma.detach().exp()
    return fitted_laplace(prior, sigma), model, margliks, losses


def _expand(prior: Tensor, sizes: list[int]) -> Tensor:
    """A 0-d, per-tensor ``[B]`` or per-parameter ``[P]`` prior as ``[P]``."""
    if prior.ndim == 0:
        return prior.expand(sum(sizes))
    if prior.shape[0] == len(sizes):
        return torch.repeat_interleave(prior, torch.tensor(sizes, device=prior.device))
    return prior


def _scale(likelihood: Likelihood, sigma: Tensor, temperature: float) -> Tensor:
    """Data-term scale ``s / T`` of the negative log joint."""
    if likelihood is Likelihood.REGRESSION:
        return 1 / (temperature * sigma.square())
    return torch.tensor(1 / temperature)


def _train_epoch(
    model: nn.Module,
    loader: Iterable,
    reader: BatchReader,
    likelihood: Likelihood,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    prior: Tensor,
    scale: Tensor,
    num: int,
) -> float:
    """One epoch on the negative log joint per datum; returns its mean over batches."""
    model.train()
    total, batches = 0.0, 0
    for inputs, targets in reader.batches(loader):
        optimizer.zero_grad()
        theta = torch.cat([p.flatten() for p in model.parameters() if p.requires_grad])
        output = call_model(model, inputs)
        data_term = scale * unit_loss(likelihood, output, targets) / len(targets)
        loss = data_term + 0.5 * (prior * theta.square()).sum() / num
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total, batches = total + loss.item(), batches + 1
    return total / max(batches, 1)
