"""laplace-torch's module paths under bayescurv.compat.laplace re-export bayescurv."""

from __future__ import annotations

import importlib

import pytest

from bayescurv import laplace as bl
from bayescurv.compat.laplace import KronLLLaplace, Laplace
from bayescurv.compat.laplace.curvature import AsdlHessian, BackPackGGN
from bayescurv.compat.laplace.utils import (
    FeatureExtractor,
    Kron,
    LastLayerSubnetMask,
    RunningNLLMetric,
)
from bayescurv.laplace import function_space, subnetwork
from bayescurv.laplace.laplace_torch import backends, matrix

MODULES = [
    "",
    ".baselaplace",
    ".lllaplace",
    ".subnetlaplace",
    ".laplace",
    ".marglik_training",
    ".utils",
    ".utils.matrix",
    ".utils.feature_extractor",
    ".utils.subnetmask",
    ".utils.metrics",
    ".utils.utils",
    ".utils.enums",
    ".utils.swag",
    ".curvature",
    ".curvature.curvature",
    ".curvature.backpack",
    ".curvature.asdl",
    ".curvature.curvlinops",
    ".curvature.asdfghjkl",
]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p or "laplace")
def test_every_exported_name_is_bayescurvs(path):
    module = importlib.import_module("bayescurv.compat.laplace" + path)
    for name in module.__all__:
        value = getattr(module, name)
        assert getattr(value, "__module__", "").startswith("bayescurv."), name


def test_same_objects_as_the_laplace_layer():
    assert Laplace is bl.Laplace
    assert KronLLLaplace is bl.KronLLLaplace
    assert BackPackGGN is backends.BackPackGGN
    assert AsdlHessian is backends.AsdlHessian
    assert Kron is matrix.Kron
    assert LastLayerSubnetMask is subnetwork.LastLayerSubnetMask
    assert (
        FeatureExtractor.__module__
        == "bayescurv.laplace.laplace_torch.feature_extractor"
    )
    assert RunningNLLMetric.__module__ == "bayescurv.laplace.tune.validation"


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("", "FunctionalLaplace"),
        ("", "FunctionalLLLaplace"),
        ("", "FunctionalApproximation"),
        (".baselaplace", "FunctionalLaplace"),
        (".lllaplace", "FunctionalLLLaplace"),
        (".utils", "FunctionalApproximation"),
        (".utils.enums", "FunctionalApproximation"),
    ],
)
def test_function_space_names_at_laplace_torch_paths(path, name):
    module = importlib.import_module("bayescurv.compat.laplace" + path)
    assert getattr(module, name) is getattr(function_space, name)
