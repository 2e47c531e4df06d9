"""Subnetwork masks and the subnetwork posterior as a block of the full one."""

from __future__ import annotations

import pytest
import torch

from bayescurv import Laplace
from bayescurv.laplace import (
    LargestMagnitudeSubnetMask,
    LargestVarianceDiagLaplaceSubnetMask,
    ModuleNameSubnetMask,
    ParamNameSubnetMask,
    RandomSubnetMask,
    SubnetMask,
)
from bayescurv.laplace.laplace_torch.swag import fit_diagonal_swag_var
from bayescurv.laplace.subnetwork import (
    LargestVarianceSWAGSubnetMask,
    LastLayerSubnetMask,
    ScoreBasedSubnetMask,
)
from tests.conftest import assert_close
from tests.laplace.conftest import make_problem


@pytest.fixture
def problem():
    return make_problem("classification")


def flat(model):
    return torch.cat(
        [p.detach().flatten() for p in model.parameters() if p.requires_grad]
    )


def test_name_masks(problem):
    model = problem.model
    assert ParamNameSubnetMask(model, ["0.bias"]).select().tolist() == [12, 13, 14, 15]
    by_module = ModuleNameSubnetMask(model, ["2"]).select()
    assert by_module.tolist() == list(range(16, 31))
    with pytest.raises(ValueError, match=r"unknown or frozen parameter names \['w'\]"):
        ParamNameSubnetMask(model, ["w"])
    with pytest.raises(ValueError, match=r"unknown module names \['head'\]"):
        ModuleNameSubnetMask(model, ["head"])
    with pytest.raises(ValueError, match=r"hold no trainable weights"):
        ModuleNameSubnetMask(model, ["1"])


def test_largest_magnitude(problem):
    chosen = LargestMagnitudeSubnetMask(problem.model, 5).select()
    values = flat(problem.model).abs()
    assert set(chosen.tolist()) == set(values.topk(5).indices.tolist())
    assert chosen.tolist() == sorted(chosen.tolist())
    with pytest.raises(
        ValueError, match=r"n_params_subnet must be an int in \[1, 31\]"
    ):
        LargestMagnitudeSubnetMask(problem.model, 32)


def test_random_is_reproducible(problem):
    first = RandomSubnetMask(problem.model, 6, torch.Generator().manual_seed(3))
    second = RandomSubnetMask(problem.model, 6, torch.Generator().manual_seed(3))
    assert first.select().tolist() == second.select().tolist()
    assert len(set(first.indices.tolist())) == 6


def test_largest_diag_variance(problem):
    diag = Laplace(
        problem.model,
        "classification",
        subset_of_weights="all",
        hessian_structure="diag",
    )
    mask = LargestVarianceDiagLaplaceSubnetMask(problem.model, 4, diag)
    with pytest.raises(ValueError, match=r"needs train_loader"):
        mask.select()
    chosen = mask.select(problem.loader())
    assert set(chosen.tolist()) == set(diag.posterior_variance.topk(4).indices.tolist())


def test_frozen_parameters_are_excluded(problem):
    model = problem.model
    model[0].weight.requires_grad_(False)
    try:
        chosen = ModuleNameSubnetMask(model, ["0"]).select()
        assert chosen.tolist() == [0, 1, 2, 3]  # the bias only, first in the count
        la = Laplace(
            model,
            "classification",
            subset_of_weights="subnetwork",
            hessian_structure="full",
            subnetwork_indices=chosen,
        )
        la.fit(problem.loader())
        assert la.num_params == 4
        assert_close(la.mean_subnet, model[0].bias.detach(), "mean")
    finally:
        model[0].weight.requires_grad_(True)


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_subnetwork_is_a_block_of_the_full_posterior_precision(problem, structure):
    chosen = RandomSubnetMask(
        problem.model, 7, torch.Generator().manual_seed(0)
    ).select()
    everything = Laplace(
        problem.model,
        "classification",
        subset_of_weights="all",
        hessian_structure=structure,
    )
    everything.fit(problem.loader())
    sub = Laplace(
        problem.model,
        "classification",
        subset_of_weights="subnetwork",
        hessian_structure=structure,
        subnetwork_indices=chosen,
    )
    sub.fit(problem.loader())
    full = everything.precision.dense()
    assert_close(sub.precision.dense(), full[chosen][:, chosen], "block")
    assert_close(sub.mean_subnet, flat(problem.model)[chosen], "mean")
    assert_close(sub.mean, flat(problem.model), "all weights, as laplace-torch")


def test_selection_state(problem):
    mask = LargestMagnitudeSubnetMask(problem.model, 5)
    assert mask.n_params_subnet == 5  # fixed in advance for score-based masks
    with pytest.raises(AttributeError, match=r"call select\(\)"):
        _ = mask.indices
    chosen = mask.select()
    assert mask.indices is chosen
    with pytest.raises(ValueError, match="selected already"):
        mask.select()
    names = ParamNameSubnetMask(problem.model, ["2.bias"])
    with pytest.raises(AttributeError):
        _ = names.n_params_subnet
    names.select()
    assert names.n_params_subnet == 3
    assert_close(names.parameter_vector, flat(problem.model), "parameter_vector")


def test_custom_mask_from_a_boolean_vector(problem):
    class EveryOther(SubnetMask):
        def get_subnet_mask(self, train_loader):
            return torch.arange(self.num_params) % 2 == 0

    assert EveryOther(problem.model).select().tolist() == list(range(0, 31, 2))
    mask = EveryOther(problem.model)
    with pytest.raises(ValueError, match="31 zeros and ones"):
        mask.convert_subnet_mask_to_indices(torch.ones(30, dtype=torch.bool))
    with pytest.raises(ValueError, match="31 zeros and ones"):
        mask.convert_subnet_mask_to_indices(torch.full((31,), 2))
    with pytest.raises(ValueError, match=r"must be a torch\.Tensor"):
        mask.convert_subnet_mask_to_indices([1] * 31)


def test_score_based_mask_checks_scores(problem):
    class Short(ScoreBasedSubnetMask):
        def compute_param_scores(self, train_loader):
            return torch.ones(3)

    with pytest.raises(ValueError, match=r"the scores must be \[31\]"):
        Short(problem.model, 2).select()


def test_last_layer_mask(problem):
    found = LastLayerSubnetMask(problem.model)
    with pytest.raises(ValueError, match="needs train_loader"):
        found.select()
    assert found.select(problem.loader()).tolist() == list(range(16, 31))
    named = LastLayerSubnetMask(problem.model, last_layer_name="0")
    assert named.select().tolist() == list(range(16))
    with pytest.raises(KeyError, match="no module '9'"):
        LastLayerSubnetMask(problem.model, last_layer_name="9")


def test_swag_mask_selects_the_largest_iterate_variances(problem):
    mask = LargestVarianceSWAGSubnetMask(
        problem.model, 6, "classification", swag_n_snapshots=3, swag_lr=0.05
    )
    with pytest.raises(ValueError, match="needs train_loader"):
        mask.select()
    chosen = mask.select(problem.loader())
    variances = fit_diagonal_swag_var(
        problem.model,
        problem.loader(),
        torch.nn.CrossEntropyLoss(),
        n_snapshots_total=3,
        lr=0.05,
    )
    assert set(chosen.tolist()) == set(variances.topk(6).indices.tolist())
    with pytest.raises(ValueError, match="'classification' or 'regression'"):
        LargestVarianceSWAGSubnetMask(problem.model, 6, "binary")


def test_subnetwork_samples_all_weights_as_laplace_torch():
    """sample(): [n, P_all], the subnetwork drawn, the rest at the MAP."""
    problem = make_problem("regression")
    chosen = torch.tensor([2, 7, 11, 20])
    la = Laplace(
        problem.model,
        "regression",
        subset_of_weights="subnetwork",
        subnetwork_indices=chosen,
        hessian_structure="full",
    )
    la.fit(problem.loader())
    draws = la.sample(7, generator=torch.Generator().manual_seed(0))
    everything = flat(problem.model)
    assert draws.shape == (7, everything.numel())
    others = torch.ones(everything.numel(), dtype=torch.bool)
    others[chosen] = False
    assert torch.equal(draws[:, others], everything[others].expand(7, -1))
    subnet = la.sample_subnet(7, generator=torch.Generator().manual_seed(0))
    assert_close(draws[:, chosen], subnet, "subnetwork entries")
