"""laplace-torch's curvature interfaces against dense torch.func references."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import Tensor, nn

from bayescurv.engine import reference
from bayescurv.laplace.laplace_torch import backends
from bayescurv.laplace.laplace_torch.backends import (
    AsdlEF,
    CurvatureInterface,
    EFInterface,
    GGNInterface,
    HessianInterface,
)
from bayescurv.laplace.laplace_torch.feature_extractor import FeatureExtractor
from bayescurv.laplace.laplace_torch.matrix import Kron
from tests.conftest import assert_close
from tests.laplace.conftest import Problem, make_problem, positions, unit_loss

INTERFACES = {"ggn": GGNInterface, "ef": EFInterface, "hessian": HessianInterface}
NAMED = {
    "ggn": ["BackPackGGN", "AsdlGGN", "CurvlinopsGGN", "AsdfghjklGGN"],
    "ef": ["BackPackEF", "AsdlEF", "CurvlinopsEF", "AsdfghjklEF"],
    "hessian": ["AsdlHessian", "CurvlinopsHessian", "AsdfghjklHessian"],
}
LAST = ["2.weight", "2.bias"]  # the last layer of the conftest MLP


def dense_reference(problem: Problem, curvature: str) -> Tensor:
    """``factor *`` the curvature of the sum-reduced loss over all weights."""
    loss, factor = unit_loss(problem.likelihood)
    compute = {
        "ggn": reference.ggn,
        "ef": reference.empirical_fisher,
        "hessian": reference.param_hessian,
    }[curvature]
    return factor * compute(problem.model, loss, problem.x, problem.y)


def expected_loss(problem: Problem) -> Tensor:
    loss, factor = unit_loss(problem.likelihood)
    with torch.no_grad():
        return factor * loss(problem.model(problem.x), problem.y)


@pytest.mark.parametrize("curvature", list(INTERFACES))
def test_full_and_diag(problem, curvature):
    backend = INTERFACES[curvature](problem.model, problem.likelihood)
    assert backend.curvature == curvature
    loss, dense = backend.full(problem.x, problem.y)
    loss_diag, diagonal = backend.diag(problem.x, problem.y)
    expected = dense_reference(problem, curvature)
    assert_close(dense, expected, f"{curvature} full")
    assert_close(diagonal, expected.diagonal(), f"{curvature} diag")
    assert_close(loss, expected_loss(problem), "loss")
    assert_close(loss_diag, expected_loss(problem), "loss of diag")


@pytest.mark.parametrize("curvature", list(INTERFACES))
def test_subnetwork_and_last_layer_are_blocks(problem, curvature):
    expected = dense_reference(problem, curvature)
    chosen = torch.tensor([0, 5, 12, 17, 25])
    sub = INTERFACES[curvature](
        problem.model, problem.likelihood, subnetwork_indices=chosen
    )
    assert sub.num_params == 5
    assert_close(sub.full(problem.x, problem.y)[1], expected[chosen][:, chosen], "sub")
    assert_close(sub.diag(problem.x, problem.y)[1], expected.diagonal()[chosen], "sd")
    extractor = FeatureExtractor(problem.model, last_layer_name="2")
    last = INTERFACES[curvature](extractor, problem.likelihood, last_layer=True)
    index = positions(problem.model, LAST)
    assert_close(last.full(problem.x, problem.y)[1], expected[index][:, index], "ll")


@pytest.mark.parametrize("curvature", list(NAMED))
def test_named_backends_compute_their_curvature(problem, curvature):
    expected = dense_reference(problem, curvature).diagonal()
    for name in NAMED[curvature]:
        backend = getattr(backends, name)(problem.model, problem.likelihood)
        assert isinstance(backend, INTERFACES[curvature])
        assert backend.curvature == curvature
        assert not backend.stochastic
        assert_close(backend.diag(problem.x, problem.y)[1], expected, name)


def block_diagonal_part(matrix: Tensor, sizes: list[int]) -> Tensor:
    mask = torch.block_diag(*[torch.ones(s, s) for s in sizes]).bool()
    return matrix * mask


@pytest.mark.parametrize("curvature", ["ggn", "ef"])
def test_kron_is_exact_for_one_datum(problem, curvature):
    one = make_problem(problem.likelihood)
    one.x, one.y = one.x[:1], one.y[:1]
    backend = INTERFACES[curvature](one.model, one.likelihood)
    loss, kron = backend.kron(one.x, one.y, N=1)
    sizes = [p.numel() for p in one.model.parameters()]
    expected = block_diagonal_part(dense_reference(one, curvature), sizes)
    assert_close(kron.to_matrix(), expected, f"{curvature} kron, one datum")
    assert_close(loss, expected_loss(one), "loss")


@pytest.mark.parametrize("curvature", ["ggn", "ef"])
def test_kron_batches_add_up(problem, curvature):
    backend = INTERFACES[curvature](problem.model, problem.likelihood)
    x, y, n = problem.x, problem.y, len(problem.x)
    loss, whole = backend.kron(x, y, N=n)
    loss_a, first = backend.kron(x[:5], y[:5], N=n)
    loss_b, second = backend.kron(x[5:], y[5:], N=n)
    assert_close((first + second).to_matrix(), whole.to_matrix(), "batches")
    assert_close(loss_a + loss_b, loss, "loss")
    # weights' input side is averaged over N: halved against twice the data
    _, half = backend.kron(x, y, N=2 * n)
    for ours, full in zip(half.kfacs, whole.kfacs, strict=True):
        scale = 0.5 if len(full) == 2 else 1.0  # a bias has no input side
        assert_close(Kron([ours]).to_matrix(), scale * Kron([full]).to_matrix(), "N")


def test_kron_of_an_embedding_averages_its_input_side():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2)).double()
    x = torch.randint(0, 5, (8, 2))
    y = torch.randint(0, 2, (8,))
    backend = GGNInterface(model, "classification")
    _, whole = backend.kron(x, y, N=8)
    parts = [backend.kron(x[i : i + 3], y[i : i + 3], N=8)[1] for i in (0, 3, 6)]
    assert whole.kfacs[0][0].ndim == 1  # the engine's diagonal input factor
    assert_close(sum(parts).to_matrix(), whole.to_matrix(), "batches with Embedding")


def test_kron_options(problem):
    backend = GGNInterface(problem.model, problem.likelihood)
    with pytest.raises(TypeError, match=r"unsupported keyword arguments \['diag_A'\]"):
        backend.kron(problem.x, problem.y, N=12, diag_A=True)
    with pytest.raises(ValueError, match="N must be a positive int"):
        backend.kron(problem.x, problem.y, N=0)
    sub = GGNInterface(
        problem.model, problem.likelihood, subnetwork_indices=torch.tensor([1, 2])
    )
    with pytest.raises(ValueError, match="no Kronecker structure"):
        sub.kron(problem.x, problem.y, N=12)
    with pytest.raises(NotImplementedError, match="no Kronecker factors"):
        HessianInterface(problem.model, problem.likelihood).kron(
            problem.x, problem.y, N=12
        )


def relative_error(estimate: Tensor, exact: Tensor) -> float:
    return float((estimate - exact).norm() / exact.norm())


@pytest.mark.parametrize(
    ("samples", "tolerance"),
    [
        pytest.param(4000, 0.1, id="loose"),
        pytest.param(200_000, 0.01, id="tight", marks=pytest.mark.montecarlo),
    ],
)
def test_stochastic_ggn_converges(problem, samples, tolerance):
    exact = dense_reference(problem, "ggn")
    gen = torch.Generator().manual_seed(0)
    backend = GGNInterface(
        problem.model,
        problem.likelihood,
        stochastic=True,
        num_samples=samples,
        generator=gen,
    )
    assert backend.stochastic
    assert relative_error(backend.diag(problem.x, problem.y)[1], exact.diagonal()) < (
        tolerance
    )
    full = backend.full(problem.x, problem.y)[1]
    assert relative_error(full, exact) < tolerance
    _, kron = backend.kron(problem.x, problem.y, N=12)
    _, kron_exact = GGNInterface(problem.model, problem.likelihood).kron(
        problem.x, problem.y, N=12
    )
    assert relative_error(kron.to_matrix(), kron_exact.to_matrix()) < tolerance


def test_jacobians(problem):
    model, x = problem.model, problem.x
    backend = CurvatureInterface(model, problem.likelihood)
    js, f = backend.jacobians(x)
    assert_close(js, reference.jacobian(model, x), "Jacobians")
    assert_close(f, model(x).detach(), "output")
    chosen = torch.tensor([3, 4, 20])
    sub = CurvatureInterface(model, problem.likelihood, subnetwork_indices=chosen)
    assert_close(sub.functorch_jacobians(x)[0], js[:, :, chosen], "subnetwork")
    extractor = FeatureExtractor(model, last_layer_name="2")
    last = CurvatureInterface(extractor, problem.likelihood, last_layer=True)
    index = positions(model, LAST)
    assert_close(last.last_layer_jacobians(x)[0], js[:, :, index], "closed form")
    named = AsdlEF(model, problem.likelihood, True, last_layer_name="2")
    assert isinstance(named.model, FeatureExtractor)
    assert named.model.last_layer is model[2]
    assert_close(named.last_layer_jacobians(x)[0], js[:, :, index], "plain model")
    assert_close(last.jacobians(x)[0], js[:, :, index], "last layer, torch.func")


def test_jacobians_keep_the_graph(problem):
    x = problem.x.clone().requires_grad_(True)
    backend = CurvatureInterface(problem.model, problem.likelihood)
    js, f = backend.jacobians(x, enable_backprop=True)
    (ours,) = torch.autograd.grad(js.square().sum() + f.sum(), x)
    x_ref = problem.x.clone().requires_grad_(True)
    expected = reference.jacobian(problem.model, x_ref).square().sum()
    (theirs,) = torch.autograd.grad(expected + problem.model(x_ref).sum(), x_ref)
    assert_close(ours, theirs, "d/dx of the Jacobians and outputs")
    detached, _ = backend.jacobians(x)
    assert not detached.requires_grad


def test_gradients(problem):
    loss, _ = unit_loss(problem.likelihood)
    backend = EFInterface(problem.model, problem.likelihood)
    grads, value = backend.gradients(problem.x, problem.y)
    expected = reference.per_sample_gradients(problem.model, loss, problem.x, problem.y)
    flat = torch.cat([g.flatten(start_dim=1) for g in expected.values()], dim=1)
    assert_close(grads, flat, "individual gradients")
    assert_close(value, expected_loss(problem) / unit_loss(problem.likelihood)[1], "l")


@pytest.mark.parametrize("curvature", list(INTERFACES))
def test_no_side_effects_on_grad_and_requires_grad(problem, curvature):
    model = problem.model
    sentinels = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, s in zip(model.parameters(), sentinels, strict=True):
        p.grad = s
    extractor = FeatureExtractor(model, last_layer_name="2")
    last = INTERFACES[curvature](extractor, problem.likelihood, last_layer=True)
    last.diag(problem.x, problem.y)
    last.full(problem.x, problem.y)
    if curvature != "hessian":
        last.kron(problem.x, problem.y, N=12)
    last.gradients(problem.x, problem.y)
    try:
        assert all(p.requires_grad for p in model.parameters())
        assert all(
            p.grad is s for p, s in zip(model.parameters(), sentinels, strict=True)
        )
    finally:
        for p in model.parameters():
            p.grad = None


def test_invalid_arguments():
    problem = make_problem("classification")
    model = problem.model
    with pytest.raises(ValueError, match="unknown likelihood 'poisson'"):
        GGNInterface(model, "poisson")
    with pytest.raises(ValueError, match="needs a FeatureExtractor"):
        GGNInterface(model, "regression", last_layer=True)
    with pytest.raises(KeyError, match="no module 'head'"):
        AsdlEF(model, "regression", True, last_layer_name="head")
    with pytest.raises(ValueError, match=r"indices in \[0, 31\)"):
        GGNInterface(model, "regression", subnetwork_indices=torch.tensor([31]))
    with pytest.raises(ValueError, match="non-empty 1-D integer"):
        GGNInterface(model, "regression", subnetwork_indices=torch.tensor([0.5]))
    with pytest.raises(NotImplementedError, match="defines no curvature"):
        CurvatureInterface(model, "regression").diag(problem.x, problem.y)
    with pytest.raises(TypeError, match="unsupported keyword arguments"):
        EFInterface(model, "regression").full(problem.x, problem.y, mc_samples=3)


@pytest.mark.parametrize("name", [n for names in NAMED.values() for n in names])
def test_positional_arguments_as_laplace_torch(name):
    curvature = pytest.importorskip("laplace.curvature")
    theirs = getattr(curvature, name, None)
    if theirs is None:
        pytest.skip(f"{name} needs an optional laplace-torch backend")
    ours = inspect.signature(getattr(backends, name)).parameters
    expected = list(inspect.signature(theirs).parameters)
    assert list(ours)[: len(expected)] == expected
