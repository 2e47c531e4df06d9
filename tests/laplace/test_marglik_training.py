"""Online evidence optimization during training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bayescurv.compat.laplace.curvature import BackPackEF, BackPackGGN
from bayescurv.laplace import marglik_training

NOISE = 0.3


def test_recovers_the_noise_of_a_linear_gaussian_model():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(80, 3, generator=gen, dtype=torch.float64)
    w = torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
    y = x @ w + NOISE * torch.randn(80, 1, generator=gen, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    loader = [(x[i : i + 40], y[i : i + 40]) for i in range(0, 80, 40)]
    la, trained, margliks, losses = marglik_training(
        model,
        loader,
        "regression",
        hessian_structure="full",
        optimizer_kwargs={"lr": 1e-1},
        n_epochs=40,
        n_hypersteps=10,
        prior_structure="scalar",
    )
    assert trained is model
    assert margliks[-1] < margliks[0]
    assert losses[-1] < losses[0]
    assert la.sigma_noise.item() == pytest.approx(NOISE, rel=0.25)
    torch.testing.assert_close(
        la.mean, torch.cat([model.weight.flatten(), model.bias]).detach()
    )


def test_classification_with_layerwise_prior():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 2, generator=gen)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2))
    loader = [(x[:20], y[:20]), (x[20:], y[20:])]
    la, _, margliks, _ = marglik_training(
        model,
        loader,
        "classification",
        hessian_structure="kron",
        n_epochs=6,
        n_epochs_burnin=2,
        marglik_frequency=2,
        n_hypersteps=3,
        optimizer_kwargs={"lr": 1e-2},
    )
    assert len(margliks) == 3 * 3  # epochs 2, 4, 6
    assert la.prior_precision.shape == (4,)
    assert la.is_fitted


def test_returns_the_hyperparameters_of_the_best_evidence():
    """The returned posterior's evidence is the best one recorded, not a step later."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(60, 2, generator=gen, dtype=torch.float64)
    y = (x[:, :1] - 0.5 * x[:, 1:]).tanh() + 0.1 * torch.randn(
        60, 1, generator=gen, dtype=torch.float64
    )
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    la, _, margliks, _ = marglik_training(
        model,
        [(x[:30], y[:30]), (x[30:], y[30:])],
        "regression",
        hessian_structure="full",
        n_epochs=8,
        n_hypersteps=5,
        lr_hyp=0.3,  # large steps: a step after the best differs visibly
        optimizer_kwargs={"lr": 1e-2},
        prior_structure="scalar",
    )
    best = min(margliks)
    assert -la.log_marginal_likelihood().item() == pytest.approx(best, rel=1e-9)


def test_backend_picks_the_curvature():
    """laplace-torch's ``backend=`` (positional after hessian_structure) is honoured."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(30, 2, generator=gen, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    fits = {}
    for backend in (BackPackGGN, BackPackEF):
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double()
        la, _, _, _ = marglik_training(
            model, [(x, y)], "classification", "full", backend, n_epochs=2
        )
        fits[backend] = la
    assert fits[BackPackEF].options.curvature == "ef"
    assert fits[BackPackGGN].options.curvature == "ggn"
    assert not torch.allclose(
        fits[BackPackEF].posterior_precision, fits[BackPackGGN].posterior_precision
    )
