"""laplace-torch's surface: class names, forms, curvature types, reward modeling.

Forms of ``H`` and the precision; GGN, empirical Fisher and Hessian; ``log_prob``;
backend names.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import bayescurv
from bayescurv import Laplace
from bayescurv.engine import reference
from bayescurv.laplace import AllWeightsLaplace, LastLayerLaplace, SubnetLaplace
from bayescurv.laplace.posterior import backend_curvature
from tests.conftest import assert_close
from tests.laplace.conftest import make_problem, positions, unit_loss

FLAVORS = [
    ("FullLaplace", "all", "full"),
    ("KronLaplace", "all", "kron"),
    ("DiagLaplace", "all", "diag"),
    ("LowRankLaplace", "all", "lowrank"),
    ("FullLLLaplace", "last_layer", "full"),
    ("KronLLLaplace", "last_layer", "kron"),
    ("DiagLLLaplace", "last_layer", "diag"),
]
SUBSET_CLASS = {"all": AllWeightsLaplace, "last_layer": LastLayerLaplace}


@pytest.mark.parametrize(("name", "subset", "structure"), FLAVORS)
def test_flavors_build_and_recognize_their_pair(name, subset, structure):
    model = make_problem("classification").model
    flavor = getattr(bayescurv, name)
    la = flavor(model, "classification")
    assert type(la) is SUBSET_CLASS[subset]
    assert la.hessian_structure.value == structure
    assert isinstance(la, flavor)
    from_factory = Laplace(
        model, "classification", subset_of_weights=subset, hessian_structure=structure
    )
    assert isinstance(from_factory, flavor)
    for other, other_subset, other_structure in FLAVORS:
        expected = other_structure == structure and other_subset in (subset, "all")
        if other_subset == "all":  # laplace-torch: FullLLLaplace is a FullLaplace
            expected = other_structure == structure
        assert isinstance(la, getattr(bayescurv, other)) == expected, other


def test_flavor_hierarchy_and_errors():
    model = make_problem("classification").model
    la = bayescurv.KronLLLaplace(model, "classification")
    assert isinstance(la, bayescurv.LLLaplace)
    assert isinstance(la, bayescurv.ParametricLaplace)
    assert isinstance(la, bayescurv.BaseLaplace)
    assert not isinstance(la, bayescurv.SubnetLaplace)
    assert issubclass(bayescurv.KronLLLaplace, bayescurv.KronLaplace)
    assert issubclass(bayescurv.KronLLLaplace, bayescurv.LLLaplace)
    assert not issubclass(bayescurv.KronLaplace, bayescurv.LLLaplace)
    sub = bayescurv.DiagSubnetLaplace(model, "classification", torch.tensor([0, 5]))
    assert isinstance(sub, (bayescurv.DiagLaplace, bayescurv.SubnetLaplace))
    # concrete names derive from the posterior class they build, as in laplace-torch
    assert issubclass(bayescurv.DiagSubnetLaplace, bayescurv.SubnetLaplace)
    assert issubclass(bayescurv.FullLLLaplace, bayescurv.laplace.LastLayerLaplace)
    assert not issubclass(bayescurv.FullLaplace, bayescurv.SubnetLaplace)
    with pytest.raises(TypeError, match="abstract"):
        bayescurv.ParametricLaplace(model, "classification")
    with pytest.raises(ValueError, match="is hessian_structure='full'"):
        bayescurv.FullLaplace(model, "classification", hessian_structure="diag")


def test_laplace_torch_positional_arguments():
    model = make_problem("regression").model
    la = bayescurv.FullLaplace(model, "regression", 0.5, 2.0, 0.0, 1.5)
    assert la.sigma_noise.item() == 0.5
    assert la.prior_precision.shape == (1,)
    assert la.prior_precision.item() == 2.0
    assert la.temperature == 1.5
    sub = SubnetLaplace(model, "regression", torch.tensor([1, 2, 3]), 0.5, 3.0)
    assert (sub.sigma_noise.item(), sub.prior_precision.item()) == (0.5, 3.0)
    assert sub.n_params_subnet == 3


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("structure", ["full", "diag", "kron", "lowrank"])
def test_laplace_torch_forms_equal_the_structure(subset, structure):
    problem = make_problem("regression")
    la = Laplace(
        problem.model,
        "regression",
        subset_of_weights=subset,
        hessian_structure=structure,
        sigma_noise=0.6,
        prior_precision=0.8,
    )
    la.fit(problem.loader())
    dense = la.precision.dense()
    form = la.posterior_precision
    if structure == "full":
        assert_close(form, dense, "full precision")
        assert_close(la.H, la.state.curvature.dense(), "full H")
    elif structure == "diag":
        assert_close(form, dense.diagonal(), "diag precision")
        assert_close(la.H, la.state.curvature.diagonal(), "diag H")
    elif structure == "lowrank":
        (vectors, values), prior = form
        rebuilt = vectors @ torch.diag(values) @ vectors.T + torch.diag(prior)
        assert_close(rebuilt, dense, "lowrank precision")
    else:
        assert_close(form.to_matrix(), dense, "kron precision")
    scale = la.posterior_scale
    covariance = torch.diag(scale.square()) if scale.ndim == 1 else scale @ scale.T
    expected = la.posterior_covariance
    if structure == "diag":
        expected = torch.diag(la.posterior_variance)
    assert_close(covariance, expected, "posterior scale")


@pytest.mark.parametrize("structure", ["full", "kron", "diag", "lowrank"])
def test_log_prob_and_square_norm_match_a_dense_gaussian(structure):
    problem = make_problem("classification")
    la = Laplace(
        problem.model,
        "classification",
        subset_of_weights="all",
        hessian_structure=structure,
        prior_precision=0.7,
    )
    la.fit(problem.loader())
    gaussian = torch.distributions.MultivariateNormal(
        la.mean, precision_matrix=la.precision.dense()
    )
    theta = la.mean + torch.randn(3, la.n_params, dtype=torch.float64)
    assert_close(la.log_prob(theta), gaussian.log_prob(theta), "log_prob")
    assert_close(la.log_prob(theta[0]), gaussian.log_prob(theta[0]), "one value")
    delta = theta - la.mean
    expected = torch.einsum("sp,pq,sq->s", delta, la.precision.dense(), delta)
    assert_close(la.square_norm(theta), expected, "square norm")
    assert_close(
        la.log_prob(theta, normalized=False), -expected / 2, "unnormalized log_prob"
    )


def _reference_curvature(problem, curvature: str, index=None):
    """EF or Hessian of the unit loss over the data, dense float64."""
    loss, factor = unit_loss(problem.likelihood)
    if curvature == "ef":
        matrix = factor**2 * reference.empirical_fisher(
            problem.model, loss, problem.x, problem.y
        )
    else:
        matrix = factor * reference.param_hessian(
            problem.model, loss, problem.x, problem.y
        )
    return matrix if index is None else matrix[index][:, index]


@pytest.mark.parametrize("likelihood", ["classification", "regression", "binary"])
@pytest.mark.parametrize("curvature", ["ef", "hessian"])
@pytest.mark.parametrize("subset", ["all", "last_layer", "subnetwork"])
@pytest.mark.parametrize("structure", ["full", "diag"])
def test_empirical_fisher_and_hessian(likelihood, curvature, subset, structure):
    problem = make_problem(likelihood)
    model = problem.model
    index = {
        "all": None,
        "last_layer": positions(model, ["2.weight", "2.bias"]),
        "subnetwork": torch.tensor([0, 3, 7, 12, 20, 25]),
    }[subset]
    extra = {"subnetwork_indices": index} if subset == "subnetwork" else {}
    la = Laplace(
        model,
        likelihood,
        subset_of_weights=subset,
        hessian_structure=structure,
        curvature=curvature,
        **extra,
    )
    la.fit(problem.loader())
    expected = _reference_curvature(problem, curvature, index)
    actual = la.state.curvature.dense()
    if structure == "diag":
        expected = torch.diag(expected.diagonal())
    assert_close(actual, expected, f"{curvature} {structure}")


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_hessian_lowrank_from_operator_products(subset, monkeypatch):
    from bayescurv.laplace.sources import builders  # noqa: PLC0415

    monkeypatch.setattr(builders, "DENSE_EIGEN_MAX", 0)
    problem = make_problem("regression")
    la = Laplace(
        problem.model,
        "regression",
        subset_of_weights=subset,
        hessian_structure="lowrank",
        curvature="ef",
        rank=3,
    )
    la.fit(problem.loader())
    index = (
        None if subset == "all" else positions(problem.model, ["2.weight", "2.bias"])
    )
    values = torch.linalg.eigvalsh(_reference_curvature(problem, "ef", index))
    torch.testing.assert_close(
        la.state.curvature.eigenvalues, values.flip(0)[:3], rtol=1e-4, atol=1e-10
    )


def test_kron_needs_a_positive_semidefinite_curvature():
    problem = make_problem("classification")
    la = Laplace(
        problem.model, "classification", subset_of_weights="all", curvature="hessian"
    )
    with pytest.raises(ValueError, match="'kron' needs a positive semi-definite"):
        la.fit(problem.loader())


@pytest.mark.parametrize("likelihood", ["classification", "regression", "binary"])
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_empirical_fisher_kron_is_exact_for_one_datum(likelihood, subset):
    """One sample: B = g gᵀ of the layer output's gradient, A = a aᵀ: the EF block."""
    problem = make_problem(likelihood)
    one = [(problem.x[:1], problem.y[:1])]
    la = Laplace(
        problem.model,
        likelihood,
        subset_of_weights=subset,
        hessian_structure="kron",
        curvature="ef",
    )
    la.fit(one)
    loss, factor = unit_loss(likelihood)
    ef = factor**2 * reference.empirical_fisher(
        problem.model, loss, problem.x[:1], problem.y[:1]
    )
    blocks, start = [], 0
    for p in problem.model.parameters():
        blocks.append(ef[start : start + p.numel(), start : start + p.numel()])
        start += p.numel()
    expected = torch.block_diag(*blocks)
    if subset == "last_layer":
        index = positions(problem.model, ["2.weight", "2.bias"])
        expected = torch.block_diag(*blocks[2:])
        assert index.numel() == expected.shape[0]
    assert_close(la.state.curvature.dense(), expected, f"EF kron {subset}")


def test_last_layer_hessian_is_its_ggn():
    problem = make_problem("classification")
    la = {
        kind: Laplace(problem.model, "classification", "last_layer", "full", **extra)
        for kind, extra in (("ggn", {}), ("hessian", {"curvature": "hessian"}))
    }
    for posterior in la.values():
        posterior.fit(problem.loader())
    assert_close(la["hessian"].H, la["ggn"].H, "last layer: Hessian = GGN")


def test_backend_names_select_the_curvature():
    ggn = type("CurvlinopsGGN", (), {})
    ef = type("AsdlEF", (), {})
    hessian = type("AsdlHessian", (), {})
    declared = type("Mine", (), {"curvature": "ef"})
    assert backend_curvature(ggn).value == "ggn"
    assert backend_curvature(ef).value == "ef"
    assert backend_curvature(hessian).value == "hessian"
    assert backend_curvature(declared).value == "ef"
    for error in (TypeError, ValueError):  # laplace-torch raises a ValueError
        with pytest.raises(error, match="implies no known curvature"):
            backend_curvature(type("Other", (), {}))
    problem = make_problem("regression")
    la = Laplace(problem.model, "regression", "all", "diag", backend=ef)
    la.fit(problem.loader())
    expected = torch.diag(_reference_curvature(problem, "ef").diagonal())
    assert_close(la.state.curvature.dense(), expected, "EF from the backend name")


@pytest.mark.parametrize("structure", ["full", "diag", "kron", "lowrank"])
def test_before_fit_the_data_term_is_zero_and_the_density_the_prior(structure):
    """laplace-torch's initial ``H`` (zeros in its form) and prior ``log_prob``."""
    problem = make_problem("classification")
    la = Laplace(problem.model, "classification", "all", structure, prior_precision=0.7)
    size = la.n_params
    theta = torch.randn(size, dtype=torch.float64)
    prior = torch.distributions.Normal(0.0, (1 / 0.7) ** 0.5)
    torch.testing.assert_close(la.log_prob(theta), prior.log_prob(theta).sum())
    zero = {
        "full": lambda h: h.abs().sum(),
        "diag": lambda h: h.abs().sum(),
        "kron": lambda h: sum(f.abs().sum() for fs in h.kfacs for f in fs),
    }
    if structure == "lowrank":
        assert la.H is None
    else:
        assert zero[structure](la.H) == 0
    la.fit(problem.loader())
    assert la.H is not None
    assert la.log_prob(theta) != prior.log_prob(theta).sum()
    la._init_H()  # laplace-torch's reset: unfitted again
    assert not la.is_fitted
    torch.testing.assert_close(la.log_prob(theta), prior.log_prob(theta).sum())
    last = Laplace(problem.model, "classification")  # last layer not known yet
    assert last.H is None


class RewardModel(nn.Module):
    """Scores single inputs ``[N, d] -> [N, 1]``; pairs ``[N, 2, d] -> [N, 2]``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            return self.net(x.reshape(-1, x.shape[-1])).reshape(x.shape[0], 2)
        return self.net(x)


@pytest.mark.parametrize("subset", ["last_layer"])
def test_reward_modeling(subset):
    torch.manual_seed(0)
    model = RewardModel().double()
    pairs = torch.randn(12, 2, 3, dtype=torch.float64)
    preferred = torch.randint(0, 2, (12,))
    la = Laplace(model, "reward_modeling", subset_of_weights=subset)
    la.fit([(pairs, preferred)])
    classification = Laplace(model, "classification", subset_of_weights=subset)
    classification.fit([(pairs, preferred)])
    assert_close(
        la.log_marginal_likelihood(),
        classification.log_marginal_likelihood(),
        "fitted as classification",
    )
    x = torch.randn(5, 3, dtype=torch.float64)
    f_mu, f_var = la(x)
    assert_close(f_mu, model(x).detach(), "reward mean")
    assert f_var.shape == (5, 1, 1)
    assert bool((f_var > 0).all())
    probs = la(pairs[:4], fitting=True)
    assert_close(probs, classification(pairs[:4]), "fitting=True: classification")
    with pytest.raises(ValueError, match="sigma_noise is a regression parameter"):
        Laplace(model, "reward_modeling", sigma_noise=0.5)
    assert math.isfinite(la.log_marginal_likelihood().item())


class Segmenter(nn.Module):
    """Logits per pixel: ``[N, 1, 4, 4] -> [N, 3, 4, 4]``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).tanh())


@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
def test_classification_per_position(structure):
    """Outputs [N, C, *T]: the GGN sums over positions, the predictive is per pixel."""
    torch.manual_seed(0)
    model = Segmenter().double().eval()
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6, 4, 4))
    la = Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure=structure,
        prior_precision=0.5,
    )
    la.fit([(x[:4], y[:4]), (x[4:], y[4:])])
    ggn = reference.ggn(model, nn.CrossEntropyLoss(reduction="sum"), x, y)
    if structure == "full":
        assert_close(la.state.curvature.dense(), ggn, "GGN over positions")
    if structure == "diag":
        assert_close(la.state.curvature.diagonal(), ggn.diagonal(), "diag")
    covariance = la.posterior_covariance
    jac = reference.jacobian(model, x[:2])  # [N, C H W, P]
    jac = jac.reshape(2, 3, 16, -1).transpose(1, 2)  # [N, T, C, P]
    expected = jac @ covariance @ jac.mT  # [N, T, C, C]
    f_mu, f_var = la.glm_moments(x[:2])
    assert f_mu.shape == (32, 3)
    assert_close(f_var, expected.reshape(32, 3, 3), "per-pixel GLM covariance")
    probs = la(x[:2])
    assert probs.shape == (2, 3, 4, 4)
    assert_close(probs.sum(1), torch.ones(2, 4, 4, dtype=torch.float64), "sum to 1")
    kappa = (1 + math.pi / 8 * expected.diagonal(dim1=-2, dim2=-1)).rsqrt()
    logits = model(x[:2]).detach().reshape(2, 3, 16).transpose(1, 2)
    probit = (kappa * logits).softmax(-1).transpose(1, 2).reshape(2, 3, 4, 4)
    assert_close(probs, probit, "probit per pixel")
    samples = la.predictive_samples(x[:2], n_samples=5)
    assert samples.shape == (5, 2, 3, 4, 4)
    nn_samples = la.predictive_samples(x[:2], pred_type="nn", n_samples=5)
    assert nn_samples.shape == (5, 2, 3, 4, 4)
    assert_close(nn_samples.sum(2), torch.ones(5, 2, 4, 4, dtype=torch.float64), "nn")


class TiedLM(nn.Module):
    """GPT-2-style: the output layer's weight is the embedding matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(7, 4)
        self.hidden = nn.Linear(4, 4)
        self.unembed = nn.Linear(4, 7, bias=False)
        self.unembed.weight = self.embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.unembed(torch.tanh(self.hidden(self.embedding(tokens))))


@pytest.mark.parametrize("structure", ["full", "diag", "lowrank"])
def test_tied_weights_get_the_summed_jacobian(structure):
    """The GLM variance is J Σ Jᵀ with the true Jacobian (both uses of the tie)."""
    torch.manual_seed(0)
    model = TiedLM().double().eval()
    tokens = torch.randint(0, 7, (12,))
    targets = torch.randint(0, 7, (12,))
    la = Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure=structure,
        prior_precision=0.5,
        rank=4,
    )
    la.fit([(tokens, targets)])
    assert la.n_params == 7 * 4 + 4 * 4 + 4  # the tied matrix counted once
    jac = reference.jacobian(model, tokens[:5])
    expected = jac @ la.posterior_covariance @ jac.mT
    assert_close(la.glm_moments(tokens[:5])[1], expected, f"tied {structure}")
    if structure == "full":
        ggn = reference.ggn(
            model, nn.CrossEntropyLoss(reduction="sum"), tokens, targets
        )
        assert_close(la.state.curvature.dense(), ggn, "tied GGN")


def test_tied_kronecker_factors_of_different_layouts_are_refused():
    """Embedding ([A, B]) tied to a Linear ([B, A]): the sum is not one Kronecker."""
    model = TiedLM().double()
    la = Laplace(model, "classification", subset_of_weights="all")
    with pytest.raises(NotImplementedError, match="Embedding, Linear"):
        la.fit([(torch.randint(0, 7, (5,)), torch.randint(0, 7, (5,)))])


def test_tied_last_layer_is_refused():
    model = TiedLM().double()
    la = Laplace(model, "classification", subset_of_weights="last_layer")
    with pytest.raises(ValueError, match=r"shares its parameters with 'embedding'"):
        la.fit([(torch.randint(0, 7, (5,)), torch.randint(0, 7, (5,)))])
