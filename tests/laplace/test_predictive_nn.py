"""The sampling (``pred_type="nn"``) predictive."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import vector_to_parameters

from bayescurv import Laplace
from bayescurv.engine import reference
from tests.conftest import assert_close
from tests.laplace.conftest import make_problem, positions

SUBNET = torch.tensor([0, 3, 5, 7, 9, 13, 17, 22])
Z_MAX = 5.0
SAMPLES = 4_000


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fitted(model, likelihood, x, y, subset, structure="full", **kwargs):
    if subset == "subnetwork":
        kwargs["subnetwork_indices"] = SUBNET
    la = Laplace(
        model,
        likelihood,
        subset_of_weights=subset,
        hessian_structure=structure,
        prior_precision=0.5,
        **kwargs,
    )
    la.fit([(x[:6], y[:6]), (x[6:], y[6:])])
    return la


def _full_vectors(la, model, draws):
    """The sampled subset written into all trainable parameters, ``[S, P_all]``."""
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    full = flat.expand(len(draws), -1).clone()
    if la.subset.value in ("all", "subnetwork"):  # subnetwork: all weights already
        return draws
    index = (
        positions(model, ["2.weight", "2.bias"])
        if la.subset.value == "last_layer"
        else SUBNET
    )
    full[:, index] = draws
    return full


@pytest.mark.parametrize("subset", ["all", "last_layer", "subnetwork"])
def test_samples_are_the_networks_at_sampled_weights(subset):
    problem = make_problem("classification")
    la = fitted(problem.model, "classification", problem.x, problem.y, subset)
    outputs = la.functional_samples(problem.x, "nn", n_samples=3, generator=_gen(1))
    draws = _full_vectors(la, problem.model, la.sample(3, _gen(1)))
    for output, vector in zip(outputs, draws, strict=True):
        network = copy.deepcopy(problem.model)
        vector_to_parameters(vector, network.parameters())
        assert_close(output, network(problem.x).detach(), f"{subset} sample")
    probs = la.predictive_samples(problem.x, "nn", n_samples=3, generator=_gen(1))
    assert_close(probs, outputs.softmax(-1), "softmax")
    mean = la(problem.x, "nn", link_approx="mc", n_samples=3, generator=_gen(1))
    assert_close(mean, probs.mean(0), "average")


def _linear_model():
    """A model linear in its parameters: fixed features, then a Linear layer."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Tanh(), nn.Linear(3, 2)).double().eval()


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_nn_equals_glm_for_a_linear_model(subset):
    """f(θ_s) = f_mu + J (θ_s - θ*) exactly: the same draws give the same outputs."""
    model = _linear_model()
    x = torch.randn(12, 3, generator=_gen(2), dtype=torch.float64)
    y = torch.randn(12, 2, generator=_gen(3), dtype=torch.float64)
    la = fitted(model, "regression", x, y, subset, "kron")
    outputs = la.functional_samples(x, "nn", n_samples=5, generator=_gen(4))
    jac = reference.jacobian(model, x)
    deltas = la.sample(5, _gen(4)) - la.mean
    linearized = model(x).detach() + torch.einsum("ncp,sp->snc", jac, deltas)
    assert_close(outputs, linearized, "nn = glm")
    f_mu, f_var = la(x)
    mean, variance = la(x, "nn", link_approx="mc", n_samples=SAMPLES, generator=_gen())
    standard = f_var.diagonal(dim1=1, dim2=2).sqrt() / math.sqrt(SAMPLES)
    assert ((mean - f_mu).abs() / standard).max() < Z_MAX
    relative = variance / f_var.diagonal(dim1=1, dim2=2) - 1
    assert relative.abs().max() < Z_MAX * math.sqrt(2 / SAMPLES)


def test_regression_nn_outputs_and_noise():
    problem = make_problem("regression")
    la = fitted(problem.model, "regression", problem.x, problem.y, "all", "diag")
    la.sigma_noise = 0.5
    samples = la.functional_samples(problem.x, "nn", 10, generator=_gen(5))
    mean, var = la(problem.x, "nn", link_approx="mc", n_samples=10, generator=_gen(5))
    assert_close(mean, samples.mean(0), "mean")
    assert_close(var, samples.var(0), "variance")
    _, noisy = la(
        problem.x, "nn", link_approx="mc", n_samples=10, generator=_gen(5), noise=True
    )
    assert_close(noisy, var + 0.25, "noise")
    with pytest.raises(ValueError, match=r"needs n_samples >= 2, got 1"):
        la(problem.x, "nn", link_approx="mc", n_samples=1)


class Fragile(nn.Module):
    """Raises on its third call."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2).double()
        self.calls = 0

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("third call")
        return scale * self.layer(x)


def test_model_is_unchanged_even_on_error():
    model = Fragile()
    x = torch.randn(8, 3, dtype=torch.float64)
    la = Laplace(model, "classification", subset_of_weights="all")
    la.fit([(x, torch.randint(0, 2, (8,)))])
    before = [p.detach().clone() for p in model.parameters()]
    model.calls = 0
    with pytest.raises(RuntimeError, match="third call"):
        la(x, "nn", link_approx="mc", n_samples=5)
    for p, saved in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, saved)
    model.calls = -100
    doubled = la.functional_samples(x, "nn", 2, generator=_gen(), scale=2.0)
    plain = la.functional_samples(x, "nn", 2, generator=_gen())
    assert_close(doubled, 2 * plain, "model keyword arguments")


def test_nn_is_reproducible():
    problem = make_problem("binary")
    la = fitted(problem.model, "binary", problem.x, problem.y, "last_layer", "kron")
    first = la(problem.x, "nn", link_approx="mc", n_samples=4, generator=_gen(7))
    second = la(problem.x, "nn", link_approx="mc", n_samples=4, generator=_gen(7))
    assert torch.equal(first, second)
    samples = la.functional_samples(problem.x, "nn", 4, generator=_gen(7))
    assert_close(first, torch.sigmoid(samples).mean(0), "binary average")


def test_gridsearch_with_sampled_networks():
    problem = make_problem("regression")
    la = fitted(problem.model, "regression", problem.x, problem.y, "all", "diag")
    shapes = []

    def loss(prediction, y):
        _, variance = prediction
        shapes.append(variance.shape)
        return variance.sum()  # smallest for the largest prior precision

    la.optimize_prior_precision(
        method="gridsearch",
        pred_type="nn",
        link_approx="mc",
        n_samples=20,
        val_loader=problem.loader(),
        grid_size=3,
        loss=loss,
    )
    assert la.prior_precision.item() == pytest.approx(1e4)
    assert set(shapes) == {(5, 2), (2, 2)}  # sample variances of the batches
    with pytest.raises(ValueError, match=r"pred_type='nn' averages"):
        la.optimize_prior_precision(
            method="gridsearch", pred_type="nn", val_loader=problem.loader()
        )
