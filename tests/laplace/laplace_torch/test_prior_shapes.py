"""Prior precision shapes, and the subset-of-data sampler."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayescurv.laplace.laplace_torch.prior_shapes import (
    expand_prior_precision,
    fix_prior_prec_structure,
    parameters_per_layer,
)
from bayescurv.laplace.laplace_torch.subset_of_data import SoDSampler


@pytest.fixture
def model() -> nn.Module:
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    model[0].bias.requires_grad_(False)
    return model


def test_parameters_per_layer(model):
    assert parameters_per_layer(model) == [6, 3, 3, 1]  # frozen tensors count too


def test_expand_prior_precision(model):
    # trainable tensors: 0.weight (6), 1.weight (3), 1.bias (1)
    assert expand_prior_precision(torch.tensor([2.0]), model).tolist() == [2.0] * 10
    layerwise = expand_prior_precision(torch.tensor([1.0, 2.0, 3.0]), model)
    assert layerwise.tolist() == [1.0] * 6 + [2.0] * 3 + [3.0]
    diag = torch.arange(1.0, 11.0)
    assert torch.equal(expand_prior_precision(diag, model), diag)
    with pytest.raises(ValueError, match=r"per-block tensor of shape \[3\]"):
        expand_prior_precision(torch.ones(4), model)
    with pytest.raises(ValueError, match="non-negative"):
        expand_prior_precision(torch.tensor([-1.0]), model)


def test_fix_prior_prec_structure():
    args = {"n_layers": 3, "n_params": 7, "device": "cpu", "dtype": torch.float64}
    scalar = fix_prior_prec_structure(0.5, "scalar", **args)
    assert scalar.shape == (1,)
    assert scalar.dtype == torch.float64
    assert (
        fix_prior_prec_structure(torch.tensor(2.0), "layerwise", **args).tolist()
        == [2.0] * 3
    )
    assert fix_prior_prec_structure(torch.tensor([1.0]), "diag", **args).shape == (7,)
    with pytest.raises(ValueError, match="unknown prior_structure='block'"):
        fix_prior_prec_structure(1.0, "block", **args)
    with pytest.raises(ValueError, match="must be one value"):
        fix_prior_prec_structure(torch.ones(2), "scalar", **args)


def test_sod_sampler():
    sampler = SoDSampler(N=20, M=6, seed=3)
    chosen = list(sampler)
    assert len(sampler) == 6
    assert len(set(chosen)) == 6
    assert chosen == list(sampler) == list(SoDSampler(N=20, M=6, seed=3))
    assert chosen != list(SoDSampler(N=20, M=6, seed=4))
    data = TensorDataset(torch.arange(20.0))
    seen = torch.cat([b[0] for b in DataLoader(data, batch_size=4, sampler=sampler)])
    assert sorted(seen.long().tolist()) == sorted(chosen)
    with pytest.raises(ValueError, match="0 < M <= N"):
        SoDSampler(N=3, M=4)
