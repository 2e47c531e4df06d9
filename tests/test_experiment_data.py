"""Quick sanity checks of the experiments' data and models (shapes, determinism)."""

from __future__ import annotations

import math

import pytest
import torch

from experiments import data, evaluation, models


@pytest.fixture(scope="module")
def loaders() -> data.Loaders:
    return data.digits_loaders(batch_size=128, seed=0)


def test_digits_split_sizes_ranges_and_disjointness(loaders):
    sizes = [len(loader.dataset) for loader in loaders]
    assert sizes == [1401, 126, 270]
    train_x, train_y = loaders.train.dataset.tensors
    assert train_x.shape == (1401, 1, 8, 8)
    assert train_x.min() == 0
    assert train_x.max() == 1
    assert set(train_y.unique().tolist()) == set(range(10))
    rows = [
        {tuple(x.flatten().tolist()) for x in loader.dataset.tensors[0]}
        for loader in loaders
    ]
    # load_digits contains a few duplicate images; splits may share only those
    assert len(rows[0] & rows[2]) <= 2
    assert len(rows[1] & rows[2]) <= 2


def test_digits_split_is_fixed_by_seed(loaders):
    again = data.digits_loaders(batch_size=128, seed=0, layout="flat")
    other = data.digits_loaders(batch_size=128, seed=1)
    test_x = loaders.test.dataset.tensors[0]
    flat_x, flat_y = again.test.dataset.tensors
    assert flat_x.shape == (270, 64)
    assert torch.equal(flat_x, test_x.reshape(270, 64))
    assert torch.equal(flat_y, loaders.test.dataset.tensors[1])
    assert not torch.equal(other.test.dataset.tensors[0], test_x)


def test_split_fractions_are_validated():
    with pytest.raises(ValueError, match="val_fraction and test_fraction"):
        data.digits_loaders(val_fraction=0.5, test_fraction=0.5)


def test_rotation(loaders):
    images = loaders.test.dataset.tensors[0][:16]
    torch.testing.assert_close(data.rotate(images, 0), images)
    # 90 degrees maps the 8x8 pixel centres onto each other: exactly rot90
    quarter = torch.rot90(images, k=1, dims=(2, 3))
    torch.testing.assert_close(data.rotate(images, 90), quarter, atol=1e-5, rtol=0)
    flat = data.rotate(images.reshape(16, 64), 45)
    torch.testing.assert_close(flat, data.rotate(images, 45).reshape(16, 64))


def test_derived_ood_sets_shapes_ranges_and_determinism(loaders):
    images = loaders.test.dataset.tensors[0][:20]
    derived = {
        "noise": data.uniform_noise(20, seed=0),
        "inverted": data.inverted(images),
        "cropped": data.cropped(images, seed=0),
        "shifted": data.shifted(images, seed=0),
        "photos": data.photo_patches(20, seed=0),
    }
    for name, images_out in derived.items():
        assert images_out.shape == (20, 1, 8, 8), name
        assert images_out.min() >= 0, name
        assert images_out.max() <= 1, name
    assert torch.equal(data.photo_patches(20, seed=0), derived["photos"])
    assert not torch.equal(data.cropped(images, seed=1), derived["cropped"])
    # each shifted digit is its original moved 4 pixels in one direction, zero fill
    moves = torch.stack(
        [
            torch.nn.functional.pad(images, pad)[..., rows, cols]
            for pad, rows, cols in [
                ((0, 0, 4, 0), slice(0, 8), slice(None)),  # down
                ((0, 0, 0, 4), slice(4, 12), slice(None)),  # up
                ((4, 0, 0, 0), slice(None), slice(0, 8)),  # right
                ((0, 4, 0, 0), slice(None), slice(4, 12)),  # left
            ]
        ]
    )
    matches = (moves == derived["shifted"]).flatten(2).all(-1)  # [4, 20]
    assert (matches.sum(0) >= 1).all()


def test_mnist1d_images_are_generated_offline_and_reproducibly():
    pytest.importorskip("mnist1d")
    state = torch.get_rng_state()
    first = data.mnist1d_images(25, seed=3)
    assert first.shape == (25, 1, 8, 8)
    assert torch.equal(first, data.mnist1d_images(25, seed=3))
    assert torch.equal(torch.get_rng_state(), state)


def test_regression_data():
    toy = data.gap_toy(n_train=50, seed=0)
    assert toy.x_train.shape == toy.y_train.shape == (50, 1)
    low, high = data.TOY_DATA_RANGE
    assert (toy.x_train.abs() >= low).all()
    assert (toy.x_train.abs() <= high).all()
    masks = toy.regions()
    assert (sum(m.int() for m in masks.values()) == 1).all()  # a partition
    assert masks["gap"].any()
    assert masks["outside"].any()
    assert torch.equal(data.gap_toy(n_train=50, seed=0).y_train, toy.y_train)
    diabetes = data.diabetes_loaders(seed=0)
    x, y = diabetes.train.dataset.tensors
    assert x.shape[1] == 10
    assert y.shape[1] == 1
    torch.testing.assert_close(y.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(0), torch.ones(10))


def test_models_and_train_map_are_seeded(loaders):
    x, y = loaders.val.dataset.tensors[0][:64], loaders.val.dataset.tensors[1][:64]
    small = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True
    )
    runs = [
        models.train_map(models.mlp(64, 20, 10, seed=1), small, epochs=1, seed=5)
        for _ in range(2)
    ]
    assert all(
        torch.equal(a, b) for a, b in zip(*(r.parameters() for r in runs), strict=True)
    )
    probs = models.predict_probs(runs[0], x)
    assert probs.shape == (64, 10)
    torch.testing.assert_close(probs.sum(1), torch.ones(64))
    assert models.small_cnn()(x[:3]).shape == (3, 10)
    with pytest.raises(ValueError, match="at least two widths"):
        models.mlp(64)


def test_evaluation_protocol_on_a_constant_predictive(loaders):
    pytest.importorskip("mnist1d")
    sets = evaluation.evaluation_sets(loaders, seed=0)
    assert set(sets.ood) == {*data.OOD_SETS, evaluation.POOLED}
    assert len(sets.ood[evaluation.POOLED]) == 2 * len(sets.test[1])

    def uniform(x: torch.Tensor) -> torch.Tensor:
        return torch.full((len(x), 10), 0.1)

    result = evaluation.evaluate_classifier(uniform, sets)
    assert result["in/NLL"] == pytest.approx(math.log(10))
    # one bin holds everything: ECE = |accuracy - 0.1| (float32 confidence)
    expected_ece = abs(result["rot/90/accuracy"] - 0.1)
    assert result["rot/90/ECE"] == pytest.approx(expected_ece, abs=1e-6)
    # every score ties: AUROC is chance, and all OOD samples pass the threshold
    assert result["ood/photos/AUROC MSP"] == 0.5
    assert result["ood/noise+inverted/FPR@95 -H"] == 1.0
