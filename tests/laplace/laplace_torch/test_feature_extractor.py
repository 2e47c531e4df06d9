"""FeatureExtractor: the last layer's input features next to the model output."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from bayescurv.laplace.laplace_torch.feature_extractor import FeatureExtractor
from tests.conftest import assert_close

F64 = torch.float64


class Branchy(nn.Module):
    """Modules registered out of call order; the head is not the last registered."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(5, 3)
        self.body = nn.Sequential(
            nn.Conv2d(2, 5, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )
        self.unused = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x).flatten(1))


def per_token_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()


def test_finds_the_last_called_linear():
    torch.manual_seed(0)
    model = Branchy().double().eval()
    x = torch.randn(3, 2, 6, 6, dtype=F64)
    extractor = FeatureExtractor(model)
    assert extractor.last_layer is None
    out, phi = extractor.forward_with_features(x)
    assert extractor.last_layer_name == "head"
    assert extractor.last_layer is model.head
    assert_close(out, model(x), "output")
    assert_close(phi, model.body(x).flatten(1), "features")
    assert torch.equal(extractor.last_layer(phi), out)
    # not a registered submodule: the parameters are the model's, listed once
    assert [n for n, _ in extractor.named_parameters()] == [
        "model." + n for n, _ in model.named_parameters()
    ]


@pytest.mark.parametrize(
    ("reduction", "expected"),
    [
        ("pick_first", lambda h: h[:, 0, 0]),
        ("pick_last", lambda h: h[:, -1, -1]),
        ("average", lambda h: h.mean((1, 2))),
        (lambda h, x: h.amax((1, 2)), lambda h: h.amax((1, 2))),
        (None, lambda h: h),
    ],
    ids=["pick_first", "pick_last", "average", "function", "none"],
)
def test_feature_reduction(reduction, expected):
    torch.manual_seed(0)
    model = per_token_model()
    x = torch.randn(5, 3, 2, 4, dtype=F64)  # [N, T1, T2, in]
    extractor = FeatureExtractor(model, feature_reduction=reduction)
    out, phi = extractor.forward_with_features(x)
    hidden = torch.tanh(model[0](x))
    assert_close(phi, expected(hidden), "reduced features")
    assert_close(out, model(x), "the output is not reduced")


def test_named_last_layer_and_backprop():
    torch.manual_seed(0)
    model = per_token_model()
    extractor = FeatureExtractor(model, last_layer_name="2", enable_backprop=True)
    x = torch.randn(4, 4, dtype=F64, requires_grad=True)
    _, phi = extractor.forward_with_features(x)
    (grad,) = torch.autograd.grad(phi.sum(), x)
    x_ref = x.detach().requires_grad_(True)
    (expected,) = torch.autograd.grad(torch.tanh(model[0](x_ref)).sum(), x_ref)
    assert_close(grad, expected, "d features / d x")
    _, detached = FeatureExtractor(model).forward_with_features(x)
    assert not detached.requires_grad


def test_errors():
    model = per_token_model()
    with pytest.raises(KeyError, match="no module 'head'"):
        FeatureExtractor(model, last_layer_name="head")
    with pytest.raises(ValueError, match="is a Tanh; use a model with a linear last"):
        FeatureExtractor(model, last_layer_name="1")
    with pytest.raises(ValueError, match="unknown feature_reduction='max'"):
        FeatureExtractor(model, feature_reduction="max")
    softmax = nn.Sequential(nn.Linear(4, 2), nn.Softmax(-1)).double()
    with pytest.raises(ValueError, match=r"not the output of its last nn\.Linear '0'"):
        FeatureExtractor(softmax)(torch.randn(3, 4, dtype=F64))
    extractor = FeatureExtractor(model, last_layer_name="2")
    with pytest.raises(ValueError, match="already known"):
        extractor.find_last_layer(torch.randn(3, 4, dtype=F64))
