"""The data sets of the recipe study, each with a shifted and an OOD test set.

Everything ships with installed packages or is generated; nothing is downloaded.
Every data set is split 60 / 15 / 25 % into train / validation / test by the study
seed (stratified by class for classification). Tabular inputs and regression targets
are standardized with the training split's mean and standard deviation, so no test
information leaks into the scaling; regression NLLs are in standardized units.

Classification (``Benchmark.task == "classification"``):

* ``digits``: scikit-learn's 1,797 8x8 digits ``[N, 1, 8, 8]`` in ``[0, 1]``.
  Shift: the test digits rotated by 60 degrees. OOD: uniform noise images and
  inverted test digits ``1 - x``, half each.
* ``mnist1d``: 4,000 MNIST-1D signals ``[N, 1, 40]`` (``mnist1d`` generates them
  procedurally, seed 0). Shift: the two noise types MNIST-1D is made with, larger:
  correlated noise (white noise of std 1.5 smoothed by a Gaussian filter of width 2,
  std about 0.56) plus i.i.d. noise of std 0.25. OOD: standard normal signals and
  negated test signals ``-x``, half each.
* ``breast_cancer``: scikit-learn's 569 x 30 tumour features, 2 classes. Shift:
  Gaussian noise of one training standard deviation added to every feature. OOD:
  standard normal inputs scaled by 4 (four times the data's spread).

Regression (``task == "regression"``, targets ``[N, 1]``):

* ``diabetes`` (442 x 10) and ``friedman`` (scikit-learn's ``make_friedman1``, 1,000
  x 10, noise 1, ``random_state=0``): shift and OOD as for ``breast_cancer``.
* ``gap_toy``: ``sin(3 x)`` plus noise 0.1 on ``|x|`` in ``[0.75, 2]``
  (:func:`experiments.data.gap_toy`, 300 points). Shift: the grid inside the gap
  ``|x| < 0.75`` with noisy targets. OOD: the grid outside the data, ``|x| > 2``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import gaussian_filter1d
from sklearn.datasets import (
    load_breast_cancer,
    load_diabetes,
    make_friedman1,
)
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from experiments import data

FRACTIONS = (0.6, 0.15, 0.25)
"""Train, validation and test fractions."""
BATCH_SIZE = 64
FEATURE_NOISE = 1.0
"""Std of the feature noise of the tabular shift, in training standard deviations."""
OOD_SCALE = 4.0
"""The tabular OOD inputs are standard normal times this."""
MNIST1D_SAMPLES = 4000
MNIST1D_NOISE = (1.5, 2.0, 0.25)
"""MNIST-1D shift: correlated noise std (before smoothing), filter width, iid std."""


@dataclass(frozen=True)
class Benchmark:
    """One data set of the study, split, with its shifted and OOD inputs.

    Attributes:
        name: Data set name.
        task: ``"classification"`` or ``"regression"``.
        train: Shuffled training loader (batches of :data:`BATCH_SIZE`).
        val: Validation loader (one batch).
        test: Test inputs ``[N, ...]`` and targets (``[N]`` classes, ``[N, 1]``).
        shift: Shifted inputs and their targets.
        ood: Out-of-distribution inputs ``[M, ...]``.
        n_inputs: Input features per sample (channels x length for signals).
        n_outputs: Classes, or 1 for regression.
        shift_name: What the shift is, for tables.
        ood_name: What the OOD inputs are, for tables.
    """

    name: str
    task: str
    train: DataLoader
    val: DataLoader
    test: tuple[Tensor, Tensor]
    shift: tuple[Tensor, Tensor]
    ood: Tensor
    n_inputs: int
    n_outputs: int
    shift_name: str
    ood_name: str


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def split_indices(
    n: int, seed: int, stratify: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train, validation and test indices (:data:`FRACTIONS`), fixed by ``seed``."""
    _, val_fraction, test_fraction = FRACTIONS
    rest, test = train_test_split(
        np.arange(n), test_size=test_fraction, random_state=seed, stratify=stratify
    )
    train, val = train_test_split(
        rest,
        test_size=val_fraction / (1 - test_fraction),
        random_state=seed + 1,
        stratify=None if stratify is None else stratify[rest],
    )
    return train, val, test


def _loaders(x: Tensor, y: Tensor, train: np.ndarray, val: np.ndarray):
    train_set = TensorDataset(x[train], y[train])
    return (
        DataLoader(train_set, batch_size=BATCH_SIZE, shuffle=True),
        DataLoader(TensorDataset(x[val], y[val]), batch_size=len(val)),
    )


def _standardize(x: Tensor, train: np.ndarray) -> Tensor:
    return (x - x[train].mean(0)) / x[train].std(0)


def _benchmark(name: str, x: Tensor, y: Tensor, seed: int, shifted, ood, **info):
    """Split, then derive the shifted and OOD inputs from the test split."""
    classes = None if y.is_floating_point() else y.numpy()
    train, val, test = split_indices(len(y), seed, classes)
    train_loader, val_loader = _loaders(x, y, train, val)
    x_test, y_test = x[test], y[test]
    return Benchmark(
        name=name,
        task="classification" if classes is not None else "regression",
        train=train_loader,
        val=val_loader,
        test=(x_test, y_test),
        shift=(shifted(x_test), y_test),
        ood=ood(x_test),
        n_inputs=x[0].numel(),
        n_outputs=int(y.max()) + 1 if classes is not None else 1,
        **info,
    )


def digits(seed: int) -> Benchmark:
    """scikit-learn's digits; shift: rotation by 60°; OOD: noise + inverted."""
    images, labels = data.digits_tensors()

    def ood(x: Tensor) -> Tensor:
        half = len(x) // 2
        noise = data.uniform_noise(half, seed)
        return torch.cat([noise, data.inverted(x[: len(x) - half])])

    return _benchmark(
        "digits", images, labels, seed, lambda x: data.rotate(x, 60), ood,
        shift_name="rotated 60°", ood_name="uniform noise + inverted digits",
    )  # fmt: skip


@functools.cache
def mnist1d_tensors() -> tuple[Tensor, Tensor]:
    """:data:`MNIST1D_SAMPLES` MNIST-1D signals ``[N, 1, 40]`` (seed 0) and labels."""
    x, y = data.mnist1d_arrays(MNIST1D_SAMPLES, 0)
    return torch.tensor(x, dtype=torch.float32).unsqueeze(1), torch.tensor(y)


def mnist1d_noise(x: Tensor, seed: int) -> Tensor:
    """``x`` ``[N, 1, L]`` plus MNIST-1D's two noise types (:data:`MNIST1D_NOISE`)."""
    corr_std, width, iid_std = MNIST1D_NOISE
    gen = _generator(seed)
    white = corr_std * torch.randn(x.shape, generator=gen)
    smooth = torch.tensor(gaussian_filter1d(white.numpy(), width, axis=-1))
    return x + smooth.float() + iid_std * torch.randn(x.shape, generator=gen)


def mnist1d(seed: int) -> Benchmark:
    """MNIST-1D; shift: more of its own noise; OOD: Gaussian signals + negated."""
    x, y = mnist1d_tensors()

    def ood(x_test: Tensor) -> Tensor:
        half = len(x_test) // 2
        noise = torch.randn(half, *x_test.shape[1:], generator=_generator(seed))
        return torch.cat([noise, -x_test[: len(x_test) - half]])

    return _benchmark(
        "mnist1d", x, y, seed, lambda x_test: mnist1d_noise(x_test, seed), ood,
        shift_name="extra correlated + iid noise",
        ood_name="Gaussian signals + negated signals",
    )  # fmt: skip


def _tabular(
    name: str, x: np.ndarray, y: np.ndarray, seed: int, regression: bool
) -> Benchmark:
    """Standardized features; shift: feature noise; OOD: scaled normal inputs."""
    x = torch.tensor(x, dtype=torch.float32)
    if regression:
        y = torch.tensor(y, dtype=torch.float32).unsqueeze(1)
    else:
        y = torch.tensor(y, dtype=torch.int64)
    classes = None if regression else y.numpy()
    train = split_indices(len(y), seed, classes)[0]
    x = _standardize(x, train)
    if regression:
        y = _standardize(y, train)

    def shifted(x_test: Tensor) -> Tensor:
        noise = torch.randn(x_test.shape, generator=_generator(seed))
        return x_test + FEATURE_NOISE * noise

    def ood(x_test: Tensor) -> Tensor:
        return OOD_SCALE * torch.randn(x_test.shape, generator=_generator(seed + 1))

    return _benchmark(
        name, x, y, seed, shifted, ood,
        shift_name=f"feature noise ({FEATURE_NOISE:g} std)",
        ood_name=f"normal inputs x {OOD_SCALE:g}",
    )  # fmt: skip


def breast_cancer(seed: int) -> Benchmark:
    """scikit-learn's breast cancer (569 x 30, 2 classes)."""
    loaded = load_breast_cancer()
    return _tabular("breast_cancer", loaded.data, loaded.target, seed, False)


def diabetes(seed: int) -> Benchmark:
    """scikit-learn's diabetes (442 x 10)."""
    loaded = load_diabetes()
    return _tabular("diabetes", loaded.data, loaded.target, seed, True)


def friedman(seed: int) -> Benchmark:
    """scikit-learn's Friedman #1 (1,000 x 10, noise 1, ``random_state=0``)."""
    x, y = make_friedman1(n_samples=1000, n_features=10, noise=1.0, random_state=0)
    return _tabular("friedman", x, y, seed, True)


def gap_toy(seed: int) -> Benchmark:
    """The 1-D gap toy; shift: the gap; OOD: beyond the data."""
    toy = data.gap_toy(n_train=300, seed=seed)
    regions = {k: v.squeeze(1) for k, v in toy.regions().items()}
    train, val, test = split_indices(len(toy.y_train), seed)
    train_loader, val_loader = _loaders(toy.x_train, toy.y_train, train, val)
    gap = regions["gap"]
    return Benchmark(
        name="gap_toy",
        task="regression",
        train=train_loader,
        val=val_loader,
        test=(toy.x_train[test], toy.y_train[test]),
        shift=(toy.x_grid[gap], toy.y_grid[gap]),
        ood=toy.x_grid[regions["outside"]],
        n_inputs=1,
        n_outputs=1,
        shift_name="the gap |x| < 0.75",
        ood_name="beyond the data, |x| > 2",
    )


BENCHMARKS: dict[str, Callable[[int], Benchmark]] = {
    "digits": digits,
    "mnist1d": mnist1d,
    "breast_cancer": breast_cancer,
    "diabetes": diabetes,
    "friedman": friedman,
    "gap_toy": gap_toy,
}
"""Every data set of the study by name: ``seed -> Benchmark``."""
