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
    assert len(set(first.select().tolist())) == 6


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
        assert_close(la.mean, model[0].bias.detach(), "mean")
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
    assert_close(sub.mean, flat(problem.model)[chosen], "mean")
