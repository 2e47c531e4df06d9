"""StructuredNormal against torch's MultivariateNormal on the dense matrix (float64).

Every structure of the conformance suite (its ``make`` and ``dense`` reference) with
every prior structure it supports: log density, entropy, moments, gradients in the
prior, sampling on the covariance, and no dense matrix where none is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import Tensor
from torch.distributions import MultivariateNormal

from bayescurv.curvature import CurvatureMatrix, Dense, Diagonal, PriorStructure
from bayescurv.curvature.normal import StructuredNormal
from tests.conftest import assert_close
from tests.curvature import test_dense, test_diagonal, test_kron, test_lowrank
from tests.curvature.conformance import (
    LOOSE_SAMPLES,
    SCALE,
    Z_MAX,
    covariance_zscores,
    make_prior,
    reference_precision,
)

# The conformance classes give each structure's ``make`` and dense reference; they
# are reached through their modules so that pytest does not collect them here again.
STRUCTURES = {
    "dense": test_dense.TestDense,
    "diagonal": test_diagonal.TestDiagonal,
    "kron": test_kron.TestKronBlocks,
    "lowrank_isotropic": test_lowrank.TestLowRankIsotropic,
    "lowrank_woodbury": test_lowrank.TestLowRankWoodbury,
}
CASE_IDS = [
    (name, kind) for name, cls in STRUCTURES.items() for kind in cls.prior_kinds
]


@dataclass
class Case:
    precision: CurvatureMatrix
    reference: Tensor  # the dense float64 precision
    loc: Tensor  # [2, P]: a batch of two means
    prior: Tensor  # the prior precision added to the scaled data term


def make_case(name: str, kind: PriorStructure, prior_grad: bool = False) -> Case:
    maker = STRUCTURES[name]()
    base = maker.make(torch.Generator().manual_seed(0))
    prior = make_prior(kind, base.block_sizes).requires_grad_(prior_grad)
    precision = base.scaled(SCALE).add_prior(prior)
    reference = reference_precision(maker.dense(base), base.block_sizes, SCALE, prior)
    gen = torch.Generator().manual_seed(4)
    loc = torch.randn(2, base.num_params, generator=gen, dtype=torch.float64)
    return Case(precision, reference, loc, prior)


@pytest.fixture(params=CASE_IDS, ids=[f"{n}-{k.value}" for n, k in CASE_IDS])
def case(request: pytest.FixtureRequest) -> Case:
    return make_case(*request.param)


def test_log_prob_and_entropy_match_multivariate_normal(case: Case) -> None:
    d = StructuredNormal(case.loc, case.precision)
    expected = MultivariateNormal(case.loc, precision_matrix=case.reference)
    gen = torch.Generator().manual_seed(5)
    value = torch.randn(3, 2, case.loc.shape[-1], generator=gen, dtype=torch.float64)
    assert d.batch_shape == (2,)
    assert d.event_shape == (case.loc.shape[-1],)
    assert_close(d.log_prob(value), expected.log_prob(value), "log_prob")
    assert_close(d.log_prob(value[0, 0]), expected.log_prob(value[0, 0]), "broadcast")
    assert_close(d.entropy(), expected.entropy(), "entropy")


def test_moments_match_multivariate_normal(case: Case) -> None:
    d = StructuredNormal(case.loc, case.precision)
    expected = MultivariateNormal(case.loc, precision_matrix=case.reference)
    assert_close(d.mean, expected.mean, "mean")
    assert_close(d.variance, expected.variance, "variance")
    assert_close(d.covariance_matrix, expected.covariance_matrix, "covariance")
    assert_close(d.precision_matrix, expected.precision_matrix, "precision")


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("diagonal", PriorStructure.DIAG),
        ("kron", PriorStructure.LAYERWISE),
        ("lowrank_woodbury", PriorStructure.SCALAR),
        ("dense", PriorStructure.SCALAR),
    ],
)
def test_log_prob_gradients_match(name: str, kind: PriorStructure) -> None:
    """Differentiable in the location and the prior precision, as the dense one."""
    case = make_case(name, kind, prior_grad=True)
    loc = case.loc[0].clone().requires_grad_()
    value = torch.linspace(-1, 1, loc.shape[0], dtype=torch.float64)
    prior = case.prior
    ours = StructuredNormal(loc, case.precision).log_prob(value)
    theirs = MultivariateNormal(loc, precision_matrix=case.reference).log_prob(value)
    grads = torch.autograd.grad(ours, (loc, prior))
    expected = torch.autograd.grad(theirs, (loc, prior))
    assert_close(grads[0], expected[0], "d log_prob / d loc")
    assert_close(grads[1], expected[1], "d log_prob / d prior")


def test_samples_have_the_covariance(case: Case) -> None:
    d = StructuredNormal(case.loc[0], case.precision)
    samples = d.sample((LOOSE_SAMPLES,), generator=torch.Generator().manual_seed(0))
    assert samples.shape == (LOOSE_SAMPLES, case.loc.shape[-1])
    mean_z, cov_z = covariance_zscores(
        samples - case.loc[0], torch.linalg.inv(case.reference)
    )
    assert mean_z < Z_MAX
    assert cov_z < Z_MAX


def test_rsample_shapes_and_gradient() -> None:
    case = make_case("kron", PriorStructure.SCALAR)
    loc = case.loc.clone().requires_grad_()
    draws = StructuredNormal(loc, case.precision).rsample((4, 3))
    assert draws.shape == (4, 3, *loc.shape)
    (grad,) = torch.autograd.grad(draws.sum(), loc)
    assert torch.equal(grad, torch.full_like(loc, 12.0))
    first = StructuredNormal(case.loc, case.precision).sample(
        (2,), generator=torch.Generator().manual_seed(1)
    )
    second = StructuredNormal(case.loc, case.precision).sample(
        (2,), generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(first, second)
    assert not first.requires_grad


@pytest.mark.parametrize("name", ["diagonal", "kron", "lowrank_woodbury"])
def test_no_dense_matrix_is_formed(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Density, entropy, variances and draws go through the structure only."""
    case = make_case(name, PriorStructure.SCALAR)

    def forbidden(*args: object) -> Tensor:
        raise AssertionError("a dense [P, P] matrix was formed")

    monkeypatch.setattr(type(case.precision), "dense", forbidden)
    monkeypatch.setattr(CurvatureMatrix, "inverse", forbidden)
    d = StructuredNormal(case.loc, case.precision)
    d.log_prob(d.rsample((5,)))
    d.entropy()
    d.variance  # noqa: B018 (the property is the operation under test)


def test_is_a_pyro_distribution_in_plates() -> None:
    """Expands in a plate and scores like independent draws."""
    case = make_case("diagonal", PriorStructure.SCALAR)
    d = StructuredNormal(case.loc[0], case.precision)

    def model() -> Tensor:
        with pyro.plate("draws", 4):
            return pyro.sample("x", d)

    trace = pyro.poutine.trace(model).get_trace()
    site = trace.nodes["x"]
    assert site["value"].shape == (4, case.loc.shape[-1])
    assert_close(site["fn"].log_prob(site["value"]), d.log_prob(site["value"]), "lp")
    assert isinstance(d.to_event(0), dist.TorchDistribution)


def test_invalid_arguments_raise() -> None:
    precision = Diagonal(torch.ones(3, dtype=torch.float64)).add_prior(1.0)
    with pytest.raises(TypeError, match=r"must be a bayescurv\.curvature"):
        StructuredNormal(torch.zeros(3), torch.eye(3))
    with pytest.raises(ValueError, match=r"loc of shape \[\.\.\., 3\].*got \[4\]"):
        StructuredNormal(torch.zeros(4, dtype=torch.float64), precision)
    with pytest.raises(ValueError, match=r"precision is torch\.float64"):
        StructuredNormal(torch.zeros(3), precision)
    d = StructuredNormal(torch.zeros(3, dtype=torch.float64), precision, True)
    with pytest.raises(ValueError, match="value"):
        d.log_prob(torch.zeros(2, dtype=torch.float64))


def test_doctest_closed_form() -> None:
    """One draw of a 1-D Dense precision: density of the standardized value."""
    precision = Dense(torch.tensor([[4.0]], dtype=torch.float64))
    d = StructuredNormal(torch.tensor([1.0], dtype=torch.float64), precision)
    expected = -0.5 * 4.0 * 0.25 + 0.5 * math.log(4.0) - 0.5 * math.log(2 * math.pi)
    assert math.isclose(d.log_prob(torch.tensor([1.5]).double()).item(), expected)
