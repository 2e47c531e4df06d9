"""Bad input and unsupported BackPACK features raise clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bayescurv.compat.backpack import backpack, extend
from bayescurv.compat.backpack import extensions as ext
from tests.cases import Problem
from tests.compat.conftest import fresh, run_backpack


def test_extension_class_instead_of_instance():
    with pytest.raises(ValueError, match=r"class BatchGrad: write BatchGrad\(\)"):
        backpack(ext.BatchGrad)


def test_foreign_extension():
    with pytest.raises(ValueError, match=r"bayescurv\.compat\.backpack\.extensions"):
        backpack(object())


def test_duplicate_savefields():
    with pytest.raises(ValueError, match="same savefield"):
        backpack(ext.GGNMP(), ext.HMP(savefield="ggnmp"))


def test_custom_module_extensions_point_to_rules():
    with pytest.warns(UserWarning, match="register_rule"):
        ext.BatchGrad().set_module_extension(nn.Linear, object())


def test_hbp_points_to_kfac():
    with pytest.raises(NotImplementedError, match="KFAC"):
        ext.HBP("exact", "sqrt", "x")


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ext.PCHMP(modify="square"), "modify"),
        (lambda: ext.DiagGGNMC(mc_samples=0), "mc_samples"),
        (lambda: ext.BatchGrad(subsampling=[]), "subsampling"),
        (lambda: ext.SqrtGGNExact(subsampling=[0.5]), "subsampling"),
        (lambda: ext.GGNMP(savefield="not valid"), "savefield"),
    ],
    ids=["modify", "mc_samples", "empty-subsampling", "float-index", "savefield"],
)
def test_bad_arguments(make, match: str):
    with pytest.raises(ValueError, match=match):
        make()


def test_extend_needs_a_module():
    with pytest.raises(TypeError, match=r"nn\.Module"):
        extend(lambda x: x)


def test_subsampling_outside_the_batch():
    with pytest.raises(IndexError, match=r"\[9\]"):
        run_backpack(fresh("mlp"), [ext.BatchGrad(subsampling=[0, 9])])


def test_second_order_needs_an_extended_loss():
    p = fresh("mlp")
    model = extend(copy.deepcopy(p.model))
    loss = nn.CrossEntropyLoss()(model(p.inputs), p.targets)
    with backpack(ext.DiagGGNExact()), pytest.raises(ValueError, match="need the loss"):
        loss.backward()


def test_second_order_needs_the_output_itself():
    p = fresh("mlp")
    model, loss_func = extend(copy.deepcopy(p.model)), extend(nn.CrossEntropyLoss())
    loss = loss_func(2 * model(p.inputs), p.targets)
    with backpack(ext.KFLR()), pytest.raises(ValueError, match="directly"):
        loss.backward()


def test_unsupported_loss_is_named():
    p = fresh("mlp")
    model, loss_func = extend(copy.deepcopy(p.model)), extend(nn.NLLLoss())
    log_probs = nn.Sequential(model, nn.LogSoftmax(dim=1))
    extend(log_probs)
    loss = loss_func(log_probs(p.inputs), p.targets)
    with backpack(ext.BatchGrad()):  # first order: any scalar works
        loss.backward(retain_graph=True)
    assert model[0].weight.grad_batch.shape == (4, 4, 5)
    loss = loss_func(model(p.inputs), p.targets)
    with backpack(ext.DiagGGNExact()), pytest.raises(Exception, match="NLLLoss"):
        loss.backward()


def test_kfra_beyond_chains_is_named():
    with pytest.raises(NotImplementedError, match="KFRA"):
        run_backpack(fresh("cnn"), [ext.KFRA()])


def test_pchmp_needs_elementwise_activations():
    p = fresh("tokens")
    model = run_backpack(p, [ext.PCHMP()])
    weight = model.out.weight
    with pytest.raises(NotImplementedError, match="LayerNorm"):
        weight.pchmp(torch.zeros(1, *weight.shape, dtype=weight.dtype))


def test_pchmp_rejects_inplace_smooth_activations():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.ELU(inplace=True), nn.Linear(3, 2)).double()
    x, y = torch.randn(4, 2, dtype=torch.float64), torch.randint(0, 2, (4,))
    model = run_backpack(Problem(net, nn.CrossEntropyLoss(), x, y), [ext.PCHMP()])
    with pytest.raises(NotImplementedError, match="inplace=False"):
        model[0].bias.pchmp(torch.zeros(1, 3, dtype=torch.float64))


@pytest.mark.parametrize(
    ("vectors", "error"),
    [
        (torch.zeros(4, 5), ValueError),  # no leading axis
        (torch.zeros(1, 5, 4), ValueError),  # wrong shape
        (torch.zeros(1, 4, 5, dtype=torch.long), TypeError),
    ],
    ids=["no-leading-axis", "shape", "dtype"],
)
def test_product_input(vectors: torch.Tensor, error: type[Exception]):
    p = fresh("mlp")
    model = run_backpack(p, [ext.GGNMP()])
    with pytest.raises(error, match=r"\[K, \*\(4, 5\)\]"):
        model[0].weight.ggnmp(vectors)
