"""KronLaplace on grouped and depthwise convolutions: one Kronecker block per group."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap
from torch.utils.data import DataLoader, TensorDataset

from bayescurv import Laplace, engine
from tests.conftest import assert_close


def _grouped_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, groups=4, padding=1),  # depthwise
        nn.Tanh(),
        nn.Conv2d(4, 6, 1, groups=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    ).double()


def _jacobians(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-sample Jacobians of the outputs w.r.t. all weights, ``[N, C, P]``."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def single(theta: dict, xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, theta, (xi[None],))[0]

    jac = vmap(jacrev(single), in_dims=(None, 0))(params, x)
    return torch.cat([j.flatten(2) for j in jac.values()], dim=2)


def test_grouped_convolutions_fit_and_predict():
    model = _grouped_cnn()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(24, 3, 5, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=gen)
    la = Laplace(
        model, "classification", subset_of_weights="all", hessian_structure="kron"
    )
    la.fit(DataLoader(TensorDataset(x, y), batch_size=10))
    la.optimize_prior_precision()
    # the precision: the engine's KFLR over the data set, block-diagonal over groups
    res = engine.backprop(
        model, nn.CrossEntropyLoss(reduction="sum"), x, y, [engine.KFLR()]
    )
    assert res["kflr"]["2.weight"][0].shape == (4, 1, 1)  # depthwise: [G, 1, 1]
    assert res["kflr"]["4.weight"][1].shape == (2, 2, 2)  # [G, C_in K / G, ...]
    blocks = [engine.kron_dense(fs) for fs in res["kflr"].values()]
    prior = la.prior_precision.item()
    expected = torch.block_diag(*blocks) + prior * torch.eye(
        sum(b.shape[0] for b in blocks), dtype=torch.float64
    )
    precision = la.precision.dense()
    assert_close(precision, expected, "posterior precision")
    # the GLM predictive variance: J Σ Jᵀ with the dense covariance
    test = x[:5]
    jac = _jacobians(model, test)
    covariance = torch.linalg.inv(expected)
    _, f_var = la.glm_moments(test)
    assert_close(f_var, jac @ covariance @ jac.mT, "GLM variance")
    probs = la(test)
    assert torch.isfinite(probs).all()
    assert_close(probs.sum(-1), torch.ones(5, dtype=torch.float64), "probabilities")


def test_grouped_convolutions_in_laplace_torch_forms():
    """``posterior_precision``, ``H``, ``H_facs``: one Kronecker block per group."""
    model = _grouped_cnn()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(12, 3, 5, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=gen)
    la = Laplace(model, "classification", "all", "kron", prior_precision=0.3)
    la.fit([(x, y)])
    dense = la.precision.dense()
    assert_close(la.posterior_precision.to_matrix(), dense, "posterior_precision")
    data_term = dense - 0.3 * torch.eye(dense.shape[0], dtype=dense.dtype)
    assert_close(la.H.to_matrix(), data_term, "H")
    assert_close(la.H_facs.to_matrix(), data_term, "H_facs")
    blocks = len(la.posterior_precision.eigenvalues)
    assert blocks == len(la.params) + 4 - 1 + 2 - 1  # depthwise: 4, grouped: 2
