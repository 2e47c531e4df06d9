"""Every subset x structure x likelihood against a dense float64 computation."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from bayescurv import Laplace
from bayescurv.laplace import ModuleNameSubnetMask
from bayescurv.laplace.sources import builders
from tests.conftest import assert_close
from tests.laplace.conftest import (
    N,
    Problem,
    dense_evidence,
    dense_ggn,
    layer_inputs,
    positions,
)

PRIOR = 0.7
SIGMA = 0.8  # regression noise
RANK = 2
LOWRANK_RTOL = 1e-5  # randomized subspace iteration is not exact
SUBSETS = ["all", "last_layer", "subnetwork"]
STRUCTURES = ["full", "diag", "kron", "lowrank"]
RANDOM_SUBNET = torch.tensor([0, 3, 7, 12, 14, 17, 20, 22, 25])


def subset_index(problem: Problem, subset: str, structure: str) -> Tensor:
    model = problem.model
    if subset == "all":
        return positions(model, [n for n, _ in model.named_parameters()])
    if subset == "last_layer":
        return positions(model, ["2.weight", "2.bias"])
    if structure == "kron":  # whole tensors
        return ModuleNameSubnetMask(model, ["0"]).select()
    return RANDOM_SUBNET


def dense_kron(problem: Problem, index: Tensor, ggn: Tensor) -> Tensor:
    """KFLR reference: B = the bias block of the GGN, A = mean of input outer products.

    For a Linear layer, sample n's GGN block of the weight is
    (G_n^T Λ_n G_n) ⊗ x_n x_n^T and of the bias G_n^T Λ_n G_n, so the Kronecker
    factors follow from the dense GGN and the layer inputs.
    """
    inputs = layer_inputs(problem.model, problem.x)
    blocks, start = [], 0
    names = dict(problem.model.named_parameters())
    chosen = set(index.tolist())
    for name, p in names.items():
        idx = torch.arange(start, start + p.numel())
        start += p.numel()
        if idx[0].item() not in chosen:
            continue
        layer = name.rsplit(".", 1)[0]
        bias_idx = positions(problem.model, [f"{layer}.bias"])
        full_bias = dense_ggn(problem, bias_idx)
        if name.endswith("bias"):
            blocks.append(full_bias)
        else:
            x = inputs[layer]
            blocks.append(torch.kron(full_bias, x.T @ x / N))
    del ggn
    return torch.block_diag(*blocks)


def dense_lowrank(ggn: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(ggn)
    top_values, top_vectors = values[-RANK:], vectors[:, -RANK:]
    low = top_vectors @ torch.diag(top_values) @ top_vectors.T
    return low + torch.diag((ggn.diagonal() - low.diagonal()).clamp(min=0))


def reference_curvature(
    problem: Problem, subset: str, structure: str
) -> tuple[Tensor, Tensor]:
    index = subset_index(problem, subset, structure)
    ggn = dense_ggn(problem, index)
    if structure == "full":
        return index, ggn
    if structure == "diag":
        return index, torch.diag(ggn.diagonal())
    if structure == "kron":
        return index, dense_kron(problem, index, ggn)
    return index, dense_lowrank(ggn)


def make_laplace(problem: Problem, subset: str, structure: str, **kwargs) -> Laplace:
    extra = dict(kwargs)
    if subset == "subnetwork":
        extra["subnetwork_indices"] = subset_index(problem, subset, structure)
    if structure == "lowrank":
        extra["rank"] = RANK
    if problem.likelihood == "regression":
        extra["sigma_noise"] = SIGMA
    return Laplace(
        problem.model,
        problem.likelihood,
        subset_of_weights=subset,
        hessian_structure=structure,
        **extra,
    )


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("subset", SUBSETS)
def test_evidence_and_posterior_match_dense(problem, subset, structure):
    la = make_laplace(problem, subset, structure, prior_precision=PRIOR)
    la.fit(problem.loader())
    index, curvature = reference_curvature(problem, subset, structure)
    scale = 1 / SIGMA**2 if problem.likelihood == "regression" else 1.0
    precision = scale * curvature + PRIOR * torch.eye(len(index), dtype=torch.float64)
    mean = torch.cat([p.detach().flatten() for p in problem.model.parameters()])[index]
    prior = torch.full((len(index),), PRIOR, dtype=torch.float64)
    expected = dense_evidence(problem, precision, mean, prior, SIGMA)
    assert_close(la.state.mean, mean, "MAP")
    assert_close(la.precision.dense(), precision, "posterior precision")
    assert_close(la.log_marginal_likelihood(), expected, "evidence")
    assert_close(la.posterior_variance, torch.linalg.inv(precision).diagonal(), "var")


@pytest.mark.parametrize("structure", STRUCTURES)
def test_layerwise_prior_matches_dense(structure):
    from tests.laplace.conftest import make_problem  # noqa: PLC0415

    problem = make_problem("classification")
    la = make_laplace(problem, "all", structure)
    la.fit(problem.loader())
    prior = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    sizes = [p.numel() for p in problem.model.parameters()]
    per_param = torch.repeat_interleave(prior, torch.tensor(sizes))
    _, curvature = reference_curvature(problem, "all", structure)
    precision = curvature + torch.diag(per_param)
    expected = dense_evidence(problem, precision, la.mean, per_param)
    actual = la.log_marginal_likelihood(prior_precision=prior)
    assert_close(actual, expected, "evidence")
    assert_close(la.prior_precision, prior, "prior precision is set")


@pytest.mark.parametrize("subset", ["all", "subnetwork", "last_layer"])
def test_randomized_top_eigenpairs_match_dense(problem, subset, monkeypatch):
    """Beyond DENSE_EIGEN_MAX the eigenpairs come from the sources' GGN products."""
    monkeypatch.setattr(builders, "DENSE_EIGEN_MAX", 0)
    index = subset_index(problem, subset, "lowrank")
    extra = {"subnetwork_indices": index} if subset == "subnetwork" else {}
    la = Laplace(
        problem.model,
        problem.likelihood,
        subset_of_weights=subset,
        hessian_structure="lowrank",
        rank=RANK,
        **extra,
    )
    la.fit(problem.loader())
    values, vectors = torch.linalg.eigh(dense_ggn(problem, index))
    structure = la.precision
    torch.testing.assert_close(
        structure.eigenvalues, values.flip(0)[:RANK], rtol=LOWRANK_RTOL, atol=1e-10
    )
    overlap = (structure.eigenvectors.T @ vectors[:, -RANK:]).abs()
    torch.testing.assert_close(
        overlap.max(1).values, torch.ones(RANK).double(), rtol=0, atol=LOWRANK_RTOL
    )
