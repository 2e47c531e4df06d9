"""The recipe study's pieces: data sets, baselines, metrics and targets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from experiments import baselines, benchmarks, models, recipe_report, study_recipe

FAST = ("digits", "breast_cancer", "diabetes", "friedman", "gap_toy")
"""Benchmarks built in every run (MNIST-1D generation takes a few seconds)."""


@pytest.mark.parametrize("name", FAST)
def test_benchmark_splits_shift_and_ood(name):
    bench = benchmarks.BENCHMARKS[name](0)
    x_train, y_train = bench.train.dataset.tensors
    x_val, _ = bench.val.dataset.tensors
    (x_test, y_test), (x_shift, y_shift) = bench.test, bench.shift
    assert x_train.shape[1:] == x_val.shape[1:] == x_test.shape[1:]
    assert x_shift.shape[1:] == bench.ood.shape[1:] == x_test.shape[1:]
    assert len(y_shift) == len(x_shift)
    assert x_test[0].numel() == bench.n_inputs
    for tensor in (x_train, x_test, x_shift, bench.ood):
        assert bool(tensor.isfinite().all())
    if bench.task == "classification":
        assert set(y_train.unique().tolist()) == set(range(bench.n_outputs))
        assert torch.equal(y_shift, y_test)
    else:
        assert bench.n_outputs == 1
        assert y_train.shape == (len(x_train), 1)


def test_split_fractions_are_disjoint_and_cover_everything():
    labels = np.arange(200) % 4
    train, val, test = benchmarks.split_indices(200, seed=3, stratify=labels)
    assert (len(train), len(val), len(test)) == (120, 30, 50)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(200))
    assert sorted(np.bincount(labels[test]).tolist()) == [12, 12, 13, 13]  # stratified


@pytest.mark.parametrize("name", ["breast_cancer", "diabetes"])
def test_tabular_scaling_uses_training_statistics_only(name):
    bench = benchmarks.BENCHMARKS[name](1)
    x_train, y_train = bench.train.dataset.tensors
    torch.testing.assert_close(x_train.mean(0), torch.zeros(x_train.shape[1]))
    torch.testing.assert_close(x_train.std(0), torch.ones(x_train.shape[1]))
    if bench.task == "regression":
        assert abs(y_train.mean().item()) < 1e-5
    again = benchmarks.BENCHMARKS[name](1)
    assert torch.equal(again.test[0], bench.test[0])
    other = benchmarks.BENCHMARKS[name](2)
    assert not torch.equal(other.test[0], bench.test[0])


def test_mnist1d_noise_is_seeded_and_adds_noise():
    x = torch.zeros(4, 1, 40)
    noisy = benchmarks.mnist1d_noise(x, seed=0)
    assert torch.equal(noisy, benchmarks.mnist1d_noise(x, seed=0))
    assert 0.4 < noisy.std().item() < 1.0  # smoothed 1.5 (about 0.56) and 0.25 iid


@pytest.mark.parametrize("input_shape", [(1, 8, 8), (1, 40)], ids=["2d", "1d"])
@pytest.mark.parametrize("build", [models.small_cnn, models.small_resnet])
def test_conv_nets_take_images_and_signals(build, input_shape):
    net = build(3, 0, input_shape).eval()
    assert net(torch.zeros(2, *input_shape)).shape == (2, 3)
    again = build(3, 0, input_shape)
    for a, b in zip(net.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)


def test_temperature_scaling_recovers_a_known_temperature():
    gen = torch.Generator().manual_seed(0)
    true_logits = 2 * torch.randn(4000, 5, generator=gen)
    y = torch.multinomial(true_logits.softmax(-1), 1, generator=gen).squeeze(1)
    model = _Fixed(3 * true_logits)  # three times too confident
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.arange(4000), y), batch_size=4000
    )
    predict, temperature = baselines.temperature_scaled(model, loader, "classification")
    assert temperature == pytest.approx(3.0, rel=0.1)
    torch.testing.assert_close(
        predict(torch.arange(3)), (true_logits[:3] * 3 / temperature).softmax(-1)
    )


class _Fixed(nn.Module):
    """Returns row ``i`` of a fixed table for input ``i``."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.table[index]


def test_regression_ensemble_is_the_mixture():
    members = [_Fixed(torch.zeros(3, 1)), _Fixed(torch.full((3, 1), 2.0))]
    mean, var = baselines.ensemble(members, "regression", [1.0, 1.0])(torch.arange(3))
    torch.testing.assert_close(mean, torch.ones(3, 1))
    torch.testing.assert_close(var, torch.full((3, 1), 2.0))  # 1 + spread 1


def _bench(task: str) -> benchmarks.Benchmark:
    x = torch.arange(6)
    y = torch.tensor([0, 1, 0, 1, 0, 1]) if task == "classification" else None
    y = y if y is not None else torch.zeros(6, 1)
    return benchmarks.Benchmark(
        name="toy", task=task, train=None, val=None, test=(x[:4], y[:4]),
        shift=(x[:4], y[:4]), ood=x[4:], n_inputs=1, n_outputs=2, shift_name="",
        ood_name="",
    )  # fmt: skip


def test_evaluate_classification_metrics():
    table = torch.tensor(
        [[0.9, 0.1], [0.2, 0.8], [0.9, 0.1], [0.2, 0.8]] + [[0.5, 0.5]] * 2
    )
    result = study_recipe.evaluate(lambda i: table[i], _bench("classification"))
    assert result["accuracy"] == 1
    assert result["NLL"] == pytest.approx(-(math.log(0.9) + math.log(0.8)) / 2)
    assert result["OOD AUROC"] == 1


def test_evaluate_regression_metrics():
    def predict(i):
        return torch.zeros(len(i), 1), torch.where(i[:, None] < 4, 1.0, 4.0)

    result = study_recipe.evaluate(predict, _bench("regression"))
    assert result["RMSE"] == 0
    assert result["NLL"] == pytest.approx(0.5 * math.log(2 * math.pi))
    assert result["OOD AUROC"] == 1  # larger std on the OOD inputs


def _run(**recipe) -> dict:
    base = {"accuracy": 0.97, "NLL": 0.10, "shift NLL": 8.0, "OOD AUROC": 0.80}
    scaled = base | {"NLL": 0.09, "shift NLL": 9.0, "OOD AUROC": 0.81}
    return {"MAP": base, "MAP + temperature": scaled, "recipe": base | recipe}


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        ({"NLL": 0.099, "shift NLL": 4.0, "OOD AUROC": 0.82}, [True] * 4),
        ({"accuracy": 0.964, "NLL": 0.099, "shift NLL": 4.0, "OOD AUROC": 0.82},
         [False, True, True, True]),
        ({"NLL": 0.1, "shift NLL": 4.1, "OOD AUROC": 0.81},
         [True, False, False, False]),
    ],
    ids=["all", "accuracy", "three"],
)  # fmt: skip
def test_classification_targets(recipe, expected):
    assert recipe_report.targets(_run(**recipe), "classification") == expected


def test_provenance_names_the_commit_of_every_setups_runs():
    done = {
        "a": {"runs": [{"commit": "abc"}, {"commit": "abc"}]},
        "b": {"runs": [{"commit": "abc"}, {}]},
    }
    lines = recipe_report.provenance(done).splitlines()
    assert "- commit abc: a, b" in lines
    assert "- commit unrecorded: b" in lines


def test_code_commit_is_this_checkouts_head():
    commit = study_recipe.code_commit()
    assert commit.split("+")[0] not in ("", "unknown")
