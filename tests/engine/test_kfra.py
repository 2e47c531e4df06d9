"""KFRA: equals KFLR for one datum, the batch-averaged recursion by hand, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bayescurv import engine
from bayescurv.engine import reference
from tests.cases import ResidualMLP, make_loss, make_targets
from tests.conftest import assert_close


def _chains() -> dict[str, nn.Sequential]:
    torch.manual_seed(0)
    frozen = nn.Linear(4, 4)
    frozen.requires_grad_(False)
    return {
        "relu_sigmoid": nn.Sequential(
            nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Sigmoid(),
            nn.Linear(4, 3),
        ),
        "tanh_elu_nested": nn.Sequential(
            nn.Flatten(),
            nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Dropout(0.3)),
            nn.Sequential(nn.Linear(5, 4, bias=False), nn.ELU(), nn.Identity()),
            nn.Linear(4, 3),
        ),
        "inplace_frozen": nn.Sequential(
            nn.Flatten(), nn.Linear(6, 4), nn.ReLU(inplace=True), frozen,
            nn.LeakyReLU(0.2), nn.Linear(4, 3), nn.Softplus(),
        ),
    }  # fmt: skip


CHAINS = _chains()


@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
@pytest.mark.parametrize("chain", CHAINS, ids=list(CHAINS))
def test_kfra_equals_kflr_for_one_datum(chain, loss):
    model = CHAINS[chain].double().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 3, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = make_targets(loss, model(x), gen)
    loss_func = make_loss(loss, "mean")
    res = engine.backprop(model, loss_func, x, y, [engine.KFRA(), engine.KFLR()])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(res["kfra"]) == trainable
    for name, factors in res["kfra"].items():
        assert len(factors) == len(res["kflr"][name])
        for i, (f, g) in enumerate(zip(factors, res["kflr"][name], strict=True)):
            assert_close(f, g, f"factor {i} of {name}")


@pytest.mark.parametrize(
    ("act", "derivative"),
    [
        (nn.Tanh(), lambda h: 1 - torch.tanh(h) ** 2),
        (nn.Sigmoid(), lambda h: torch.sigmoid(h) * (1 - torch.sigmoid(h))),
        (nn.ReLU(), lambda h: (h > 0).double()),
    ],
    ids=["tanh", "sigmoid", "relu"],
)
def test_kfra_recursion_by_hand_on_a_two_layer_mlp(act, derivative):
    """``G_2 = sum_n H_n``; ``G_1 = (W_2^T G_2 W_2) * mean_n(phi'_n phi'_n^T)``."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), act, nn.Linear(5, 3)).double()
    x = torch.randn(7, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    loss_func = nn.CrossEntropyLoss()
    res = engine.backprop(model, loss_func, x, y, [engine.KFRA(), engine.KFLR()])

    n = x.shape[0]
    hess = reference.loss_hessian(model, loss_func, x, y)
    g2 = sum(hess[i, :, i, :] for i in range(n))
    with torch.no_grad():
        h = model[0](x)
        a = act(h)
    w2 = model[2].weight.detach()
    d = derivative(h)
    g1 = (w2.T @ g2 @ w2) * (d.T @ d / n)
    expected = {
        "2.weight": [g2, a.T @ a / n],
        "2.bias": [g2],
        "0.weight": [g1, x.T @ x / n],
        "0.bias": [g1],
    }
    for name, factors in expected.items():
        for i, (f, g) in enumerate(zip(res["kfra"][name], factors, strict=True)):
            assert_close(f, g, f"factor {i} of {name}")
    # with N > 1 KFRA is a different approximation than KFLR in the first layer
    assert not torch.allclose(res["kfra"]["0.weight"][0], res["kflr"]["0.weight"][0])


def test_kfra_with_other_extensions_in_one_call():
    """In-place activations are re-applied on copies: other results are untouched."""
    model = CHAINS["inplace_frozen"].double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    loss_func = nn.CrossEntropyLoss()
    alone = engine.backprop(model, loss_func, x, y, [engine.DiagGGNExact()])
    both = engine.backprop(
        model, loss_func, x, y, [engine.KFRA(), engine.DiagGGNExact()]
    )
    for name, value in alone["diag_ggn_exact"].items():
        assert_close(both["diag_ggn_exact"][name], value, name)


def _run(model: nn.Module, x: torch.Tensor):
    y = torch.randint(0, 3, (x.shape[0],))
    return engine.backprop(model.double(), nn.CrossEntropyLoss(), x, y, [engine.KFRA()])


X = torch.randn(4, 5, dtype=torch.float64)


@pytest.mark.parametrize(
    ("model", "x", "match"),
    [
        (ResidualMLP(), X, "an nn.Sequential chain .*; got ResidualMLP"),
        (
            nn.Sequential(nn.Unflatten(1, (1, 5)), nn.Conv1d(1, 3, 5), nn.Flatten()),
            X,
            "KFRA does not support Unflatten at '0'",
        ),
        (
            nn.Sequential(nn.Linear(5, 5), nn.LayerNorm(5), nn.Linear(5, 3)),
            X,
            "KFRA does not support LayerNorm at '1'",
        ),
        (
            nn.Sequential(nn.Linear(5, 3), nn.Dropout(0.5)),
            X,
            "Dropout at '1' in eval mode",
        ),
        (
            nn.Sequential(nn.Linear(5, 3), nn.Flatten(), nn.Linear(6, 3)),
            torch.randn(4, 2, 5, dtype=torch.float64),
            r"2-D inputs \[N, in\]; the one at '0' got shape \(4, 2, 5\)",
        ),
    ],
    ids=["residual", "unsupported_module", "norm_layer", "dropout_train", "linear_3d"],
)
def test_kfra_errors_name_the_problem(model, x, match):
    with pytest.raises(NotImplementedError, match=match):
        _run(model, x)


def test_kfra_rejects_weight_sharing():
    shared = nn.Linear(5, 5)
    with pytest.raises(NotImplementedError, match="Linear was called more than once"):
        _run(nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(5, 3)), X)
