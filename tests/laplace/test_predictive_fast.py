"""The GLM predictive's fast paths against a dense J Σ Jᵀ (torch.func Jacobians)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bayescurv import Laplace
from bayescurv.engine import reference
from bayescurv.laplace.sources.jacobians import LinearSegment, SegmentedJacobian
from tests.conftest import assert_close
from tests.laplace.conftest import make_problem, positions

STRUCTURES = ["full", "kron", "diag", "lowrank"]
ENTRIES = torch.tensor([1, 4, 9, 16, 20, 25])  # entries of several tensors
WHOLE = ["0.weight", "2.bias"]  # whole tensors: factored segments
SMALL_BUDGET = 2_000  # bytes: a few samples per chunk


def fitted(problem, subset, structure, **kwargs):
    if subset == "subnetwork_entries":
        subset, kwargs["subnetwork_indices"] = "subnetwork", ENTRIES
    elif subset == "subnetwork_tensors":
        kwargs["subnetwork_indices"] = positions(problem.model, WHOLE)
        subset = "subnetwork"
    la = Laplace(
        problem.model,
        problem.likelihood,
        subset_of_weights=subset,
        hessian_structure=structure,
        prior_precision=0.5,
        rank=3,
        **kwargs,
    )
    la.fit(problem.loader())
    return la


def reference_jacobian(la, problem, x, subset):
    jac = reference.jacobian(problem.model, x)
    if subset == "last_layer":
        return jac[..., positions(problem.model, ["2.weight", "2.bias"])]
    if subset == "subnetwork_entries":
        return jac[..., ENTRIES]
    if subset == "subnetwork_tensors":
        return jac[..., positions(problem.model, WHOLE)]
    return jac


CASES = [
    (subset, structure)
    for subset in ["all", "last_layer", "subnetwork_tensors", "subnetwork_entries"]
    for structure in STRUCTURES
    if not (subset == "subnetwork_entries" and structure == "kron")
]


@pytest.mark.parametrize(("subset", "structure"), CASES)
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_glm_moments_match_dense(likelihood, subset, structure):
    problem = make_problem(likelihood)
    la = fitted(problem, subset, structure, memory_budget=SMALL_BUDGET)
    x = problem.x[:7]
    jac = reference_jacobian(la, problem, x, subset)
    covariance = la.posterior_covariance
    expected = jac @ covariance @ jac.mT
    f_mu, f_var = la.glm_moments(x)
    assert_close(f_mu, problem.model(x).detach().reshape(7, -1), "f_mu")
    assert_close(f_var, expected, "f_var")
    _, variances = la.glm_moments(x, diagonal_output=True)
    assert_close(variances, expected.diagonal(dim1=1, dim2=2), "variances")
    flat = jac.reshape(-1, jac.shape[-1])
    f_mu_joint, joint = la.glm_moments(x, joint=True)
    assert_close(f_mu_joint, f_mu.flatten(), "joint f_mu")
    assert_close(joint, flat @ covariance @ flat.T, "joint f_var")


class Mixed(nn.Module):
    """Linear layers that factor and ones that do not."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 4)  # factored
        self.shared = nn.Linear(4, 4)  # called twice: explicit
        self.inplace = nn.Linear(4, 4)  # output overwritten by relu_: explicit
        self.sequence = nn.Linear(2, 2)  # on [N, 2, 2]: explicit
        self.conv = nn.Conv1d(1, 1, 3, padding=1)  # not linear: explicit
        self.last = nn.Linear(4, 3, bias=False)  # factored

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(x))
        h = self.shared(torch.tanh(self.shared(h)))
        h = torch.relu_(self.inplace(h))
        h = torch.tanh(self.sequence(h.reshape(-1, 2, 2))).reshape(-1, 4)
        h = self.conv(h[:, None, :])[:, 0]
        return self.last(h)


def _mixed_problem():
    torch.manual_seed(0)
    model = Mixed().double().eval()
    x = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    return model, x, y


def test_which_linear_layers_factor():
    """Linear layers called once on [N, in] (an in-place op after one is fine)."""
    model, x, y = _mixed_problem()
    la = Laplace(model, "classification", subset_of_weights="all")
    la.fit([(x, y)])
    (_, jacobian), *_ = la.state.source.jacobian_segments(x)
    names = la.state.source.block_names
    factored = [
        name
        for name, segment in zip(names, jacobian.segments, strict=True)
        if isinstance(segment, LinearSegment)
    ]
    assert factored == [
        "first.weight",
        "first.bias",
        "inplace.weight",
        "inplace.bias",
        "last.weight",
    ]


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_mixed_segments_match_dense(structure):
    model, x, y = _mixed_problem()
    la = Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure=structure,
        prior_precision=0.7,
        memory_budget=SMALL_BUDGET,
    )
    la.fit([(x, y)])
    jac = reference.jacobian(model, x)
    expected = jac @ la.posterior_covariance @ jac.mT
    assert_close(la.glm_moments(x)[1], expected, f"{structure} mixed")


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_mlp_predictive_needs_no_explicit_jacobian(structure, monkeypatch):
    problem = make_problem("classification")
    la = fitted(problem, "all", structure)
    expected = la.glm_moments(problem.x)[1]

    def forbidden(*args, **kwargs):
        raise AssertionError("an explicit Jacobian was computed")

    monkeypatch.setattr(SegmentedJacobian, "dense", forbidden)
    monkeypatch.setattr(LinearSegment, "dense", forbidden)
    assert_close(la.glm_moments(problem.x)[1], expected, "factored only")


def test_chunks_do_not_change_the_result():
    problem = make_problem("regression")
    small = fitted(problem, "all", "kron", memory_budget=SMALL_BUDGET)
    large = fitted(problem, "all", "kron")
    for joint in (False, True):
        assert_close(
            small.glm_moments(problem.x, joint=joint)[1],
            large.glm_moments(problem.x, joint=joint)[1],
            f"chunked, joint={joint}",
        )
