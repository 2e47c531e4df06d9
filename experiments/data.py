"""Offline, reproducible data for a Laplace Redux-style study on scikit-learn's digits.

Everything here ships with installed packages or is generated; nothing is
downloaded. Classification uses the 1,797 8x8 digits of ``sklearn.datasets.
load_digits`` with pixels scaled to ``[0, 1]`` (``pixel / 16``). The pixels are
*not* standardized per feature: the shifted and OOD sets below (rotation with zero
fill, inversion ``1 - x``, uniform noise on ``[0, 1]``) are defined in pixel space,
where background is 0 and ink is up to 1.

* :func:`digits_loaders`: a stratified train/val/test split fixed by ``seed``
  (default 1,401 / 126 / 270), as ``[N, 1, 8, 8]`` images or flat ``[N, 64]``.
* :func:`rotate`: dataset shift by rotation (the R-MNIST protocol, 0 to 180 degrees).
* :func:`ood_sets`: out-of-distribution sets derived from the test digits and from
  two other shipped sources (see :data:`OOD_SETS`).
* :func:`gap_toy` and :func:`diabetes_loaders`: regression data.

Models and the MAP trainer are in ``experiments.models``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_diabetes, load_digits, load_sample_images
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

N_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)
ROTATION_ANGLES = tuple(range(0, 181, 15))
"""The rotation angles of the R-MNIST protocol, in degrees."""


class Layout(str, Enum):
    """How digit inputs are shaped."""

    IMAGE = "image"
    """``[N, 1, 8, 8]`` images, for convolutional models."""
    FLAT = "flat"
    """``[N, 64]`` vectors (row-major pixels), for MLPs."""


def to_layout(images: Tensor, layout: Layout | str) -> Tensor:
    """Reshape ``[N, 1, 8, 8]`` images (or ``[N, 64]`` vectors) to ``layout``."""
    layout = Layout(layout)
    if layout is Layout.IMAGE:
        return images.reshape(-1, *IMAGE_SHAPE)
    return images.reshape(len(images), -1)


class Loaders(NamedTuple):
    """Train (shuffled), validation and test loaders over in-memory tensors.

    The train loader shuffles with torch's global generator, so its batch order is
    fixed by ``torch.manual_seed`` (as :func:`experiments.models.train_map` does).
    The tensors are at ``loader.dataset.tensors``.
    """

    train: DataLoader
    val: DataLoader
    test: DataLoader


def _loaders(
    splits: tuple[tuple[Tensor, Tensor], ...], batch_size: int, device: str
) -> Loaders:
    datasets = [TensorDataset(x.to(device), y.to(device)) for x, y in splits]
    return Loaders(
        train=DataLoader(datasets[0], batch_size=batch_size, shuffle=True),
        val=DataLoader(datasets[1], batch_size=batch_size),
        test=DataLoader(datasets[2], batch_size=batch_size),
    )


def _split(
    n: int, seed: int, val_fraction: float, test_fraction: float, stratify=None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of a train/val/test split fixed by ``seed`` (stratified if given)."""
    if not (
        0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1
    ):
        raise ValueError(
            "val_fraction and test_fraction must be positive with a sum below 1, got "
            f"{val_fraction} and {test_fraction}."
        )
    index = np.arange(n)
    labels = None if stratify is None else stratify
    rest, test = train_test_split(
        index, test_size=test_fraction, random_state=seed, stratify=labels
    )
    labels = None if stratify is None else stratify[rest]
    train, val = train_test_split(
        rest,
        test_size=val_fraction / (1 - test_fraction),
        random_state=seed + 1,
        stratify=labels,
    )
    return train, val, test


def digits_tensors() -> tuple[Tensor, Tensor]:
    """All 1,797 digits: ``[N, 1, 8, 8]`` float32 images in ``[0, 1]``, labels."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(data.target, dtype=torch.int64)


def digits_loaders(
    batch_size: int = 64,
    seed: int = 0,
    val_fraction: float = 0.07,
    device: str = "cpu",
    layout: Layout | str = Layout.IMAGE,
    test_fraction: float = 0.15,
) -> Loaders:
    """Digits split into train/val/test by ``seed``, stratified by class.

    Args:
        batch_size: Batch size of all three loaders.
        seed: Fixes the split (the same seed gives the same split everywhere).
        val_fraction: Fraction of all 1,797 digits used for validation.
        device: Device the tensors are placed on.
        layout: ``"image"`` (``[N, 1, 8, 8]``) or ``"flat"`` (``[N, 64]``).
        test_fraction: Fraction of all digits used for testing.

    Returns:
        The loaders; inputs in ``[0, 1]``, labels ``int64`` in ``{0, ..., 9}``. With
        the defaults: 1,401 train, 126 validation and 270 test digits.
    """
    images, labels = digits_tensors()
    inputs = to_layout(images, layout)
    parts = _split(len(labels), seed, val_fraction, test_fraction, labels.numpy())
    splits = tuple((inputs[i], labels[i]) for i in parts)
    return _loaders(splits, batch_size, device)


def rotate(images: Tensor, angle: float) -> Tensor:
    """Rotate images counter-clockwise about their centre, bilinear, zero fill.

    Args:
        images: ``[N, 1, H, W]`` images (or ``[N, 64]`` digits, reshaped to 8x8 and
            back).
        angle: Rotation in degrees.

    Returns:
        Rotated images of the input's shape, dtype and device.
    """
    flat = images.ndim == 2
    x = to_layout(images, Layout.IMAGE) if flat else images
    theta = math.radians(angle)
    cos, sin = math.cos(theta), math.sin(theta)
    # affine_grid maps output to input coordinates (x right, y down): sampling at
    # the inverse rotation turns the content counter-clockwise on screen.
    matrix = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype)
    matrix = matrix.to(x.device).expand(len(x), 2, 3)
    grid = F.affine_grid(matrix, list(x.shape), align_corners=False)
    rotated = F.grid_sample(x, grid, mode="bilinear", align_corners=False)
    return to_layout(rotated, Layout.FLAT) if flat else rotated


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _minmax(x: Tensor) -> Tensor:
    """Scale each sample ``[N, ...]`` to ``[0, 1]`` (constant samples become 0)."""
    flat = x.reshape(len(x), -1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - low) / (high - low).clamp(min=1e-8)).reshape(x.shape)


def uniform_noise(n: int, seed: int) -> Tensor:
    """``[n, 1, 8, 8]`` i.i.d. uniform pixels on ``[0, 1]``."""
    return torch.rand(n, *IMAGE_SHAPE, generator=_generator(seed))


def inverted(images: Tensor) -> Tensor:
    """Photographic negatives ``1 - x`` of ``[N, 1, 8, 8]`` digits."""
    return 1.0 - images


def cropped(images: Tensor, seed: int, size: int = 4) -> Tensor:
    """A random ``size x size`` crop of each digit, zoomed to 8x8 (bilinear)."""
    gen = _generator(seed)
    top, left = torch.randint(0, 9 - size, (2, len(images)), generator=gen).tolist()
    crops = torch.stack(
        [
            img[:, t : t + size, s : s + size]
            for img, t, s in zip(images, top, left, strict=True)
        ]
    )
    return F.interpolate(crops, size=(8, 8), mode="bilinear", align_corners=False)


def shifted(images: Tensor, seed: int, pixels: int = 4) -> Tensor:
    """Each digit translated by ``pixels`` up, down, left or right, zero fill."""
    direction = torch.randint(0, 4, (len(images),), generator=_generator(seed))
    padded = F.pad(images, (pixels, pixels, pixels, pixels))
    offsets = [(0, pixels), (2 * pixels, pixels), (pixels, 0), (pixels, 2 * pixels)]
    out = torch.empty_like(images)
    for d, (row, col) in enumerate(offsets):
        mask = direction == d
        out[mask] = padded[mask, :, row : row + 8, col : col + 8]
    return out


def photo_patches(n: int, seed: int, patch: int = 32) -> Tensor:
    """8x8 patches of scikit-learn's two sample photos (china.jpg, flower.jpg).

    Random ``patch x patch`` crops of the grey-scale photos, average-pooled to 8x8
    and min-max scaled per patch to ``[0, 1]`` (natural-image texture at the
    digits' range).
    """
    photos = torch.tensor(np.stack(load_sample_images().images), dtype=torch.float32)
    grey = photos.mean(dim=-1) / 255.0  # [2, H, W]
    gen = _generator(seed)
    which = torch.randint(0, len(grey), (n,), generator=gen).tolist()
    rows = torch.randint(0, grey.shape[1] - patch + 1, (n,), generator=gen).tolist()
    cols = torch.randint(0, grey.shape[2] - patch + 1, (n,), generator=gen).tolist()
    crops = torch.stack(
        [
            grey[w, r : r + patch, c : c + patch]
            for w, r, c in zip(which, rows, cols, strict=True)
        ]
    ).unsqueeze(1)
    return _minmax(F.avg_pool2d(crops, patch // 8))


def mnist1d_arrays(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``num_samples`` MNIST-1D signals ``[N, 40]`` and labels ``[N]`` (by ``seed``).

    ``mnist1d.data.make_dataset`` draws its 10-class 1-D signals of length 40
    procedurally (no download); its train and test parts are concatenated. It seeds
    numpy's and Python's global generators; their states are restored.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset  # noqa: PLC0415
    except ImportError as error:
        raise ImportError(
            "MNIST-1D needs the mnist1d package: "
            "pip install -e '.[experiments]' (or pip install mnist1d)."
        ) from error

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    np_state, py_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)  # noqa: NPY002
        random.setstate(py_state)
    x = np.concatenate([data["x"], data["x_test"]])
    return x, np.concatenate([data["y"], data["y_test"]])


def mnist1d_images(n: int, seed: int) -> Tensor:
    """MNIST-1D signals (:func:`mnist1d_arrays`) as 8x8 inputs.

    Each signal is linearly resampled to 64 points, min-max scaled to ``[0, 1]`` and
    laid out row-major as 8x8: another data source with the digits' value range and
    number of classes, not an image.
    """
    x, _ = mnist1d_arrays(10 * math.ceil(n / 10), seed)  # 10 classes
    signals = torch.tensor(x[:n])
    resampled = F.interpolate(
        signals.float().unsqueeze(1), size=64, mode="linear", align_corners=True
    )
    return _minmax(resampled).reshape(n, *IMAGE_SHAPE)


OOD_SETS = ("noise", "inverted", "cropped", "shifted", "photos", "mnist1d")
"""Names of the OOD sets of :func:`ood_sets`."""


def ood_sets(test_images: Tensor, seed: int = 0) -> dict[str, Tensor]:
    """Out-of-distribution sets, each with as many samples as ``test_images``.

    Args:
        test_images: ``[N, 1, 8, 8]`` in-distribution test digits in ``[0, 1]`` (or
            ``[N, 64]``; the sets then come flat too).
        seed: Fixes the random sets (noise, crops, shifts, patches, MNIST-1D).

    Returns:
        ``{name: [N, 1, 8, 8]}`` (or ``[N, 64]``) in ``[0, 1]`` on the device of
        ``test_images``, for the names in :data:`OOD_SETS`: uniform ``noise``;
        ``inverted`` test digits; ``cropped`` (a random 4x4 patch zoomed to 8x8)
        and ``shifted`` (4 pixels off-centre) test digits; ``photos``, patches of
        scikit-learn's sample photos; ``mnist1d``, MNIST-1D signals laid out 8x8.
    """
    layout = Layout.FLAT if test_images.ndim == 2 else Layout.IMAGE
    images = to_layout(test_images, Layout.IMAGE).cpu()
    n = len(images)
    sets = {
        "noise": uniform_noise(n, seed),
        "inverted": inverted(images),
        "cropped": cropped(images, seed + 1),
        "shifted": shifted(images, seed + 2),
        "photos": photo_patches(n, seed + 3),
        "mnist1d": mnist1d_images(n, seed + 4),
    }
    device = test_images.device
    return {k: to_layout(v, layout).to(device) for k, v in sets.items()}


TOY_DATA_RANGE = (0.75, 2.0)
"""The gap toy's inputs have ``|x|`` in this range: a gap of width 1.5 at 0."""
TOY_GRID_RANGE = 3.0
"""The gap toy is evaluated on ``[-3, 3]``."""


@dataclass(frozen=True)
class ToyRegression:
    """A 1-D regression toy with a gap in the inputs.

    Attributes:
        x_train: ``[N, 1]`` inputs, uniform on ``[-2, -0.75]`` and ``[0.75, 2]``
            (:data:`TOY_DATA_RANGE`).
        y_train: ``[N, 1]`` noisy targets ``sin(3 x) + noise_std * eps``.
        x_grid: ``[G, 1]`` evaluation inputs on ``[-3, 3]`` (across the gap and
            beyond the data).
        f_grid: ``[G, 1]`` noise-free function values on ``x_grid``.
        y_grid: ``[G, 1]`` noisy test targets on ``x_grid`` (independent noise).
        noise_std: Standard deviation of the observation noise.
    """

    x_train: Tensor
    y_train: Tensor
    x_grid: Tensor
    f_grid: Tensor
    y_grid: Tensor
    noise_std: float

    def regions(self) -> dict[str, Tensor]:
        """Boolean ``[G, 1]`` masks of ``x_grid``: ``data``, ``gap``, ``outside``."""
        x, (low, high) = self.x_grid.abs(), TOY_DATA_RANGE
        return {"data": (x >= low) & (x <= high), "gap": x < low, "outside": x > high}

    def loader(self, batch_size: int = 32) -> DataLoader:
        """A shuffled loader over the training pairs."""
        dataset = TensorDataset(self.x_train, self.y_train)
        return DataLoader(dataset, batch_size=batch_size, shuffle=True)


def gap_toy(
    n_train: int = 150, seed: int = 0, noise_std: float = 0.1, n_grid: int = 241
) -> ToyRegression:
    """Generate the 1-D gap toy (see :class:`ToyRegression`), fixed by ``seed``."""
    gen = _generator(seed)
    low, high = TOY_DATA_RANGE
    side = torch.where(torch.rand(n_train, 1, generator=gen) < 0.5, -1.0, 1.0)
    x = side * (low + (high - low) * torch.rand(n_train, 1, generator=gen))
    y = torch.sin(3 * x) + noise_std * torch.randn(n_train, 1, generator=gen)
    grid = torch.linspace(-TOY_GRID_RANGE, TOY_GRID_RANGE, n_grid).unsqueeze(1)
    f_grid = torch.sin(3 * grid)
    y_grid = f_grid + noise_std * torch.randn(n_grid, 1, generator=gen)
    return ToyRegression(x, y, grid, f_grid, y_grid, noise_std)


class RegressionLoaders(NamedTuple):
    """Loaders of standardized regression data and the target scale to undo it.

    A standardized prediction ``z`` is ``z * y_std + y_mean`` in original units.
    """

    train: DataLoader
    val: DataLoader
    test: DataLoader
    y_mean: float
    y_std: float


def diabetes_loaders(
    batch_size: int = 32,
    seed: int = 0,
    val_fraction: float = 0.1,
    device: str = "cpu",
    test_fraction: float = 0.2,
) -> RegressionLoaders:
    """scikit-learn's diabetes (442 x 10), standardized with training statistics.

    Inputs and targets ``[N, 1]`` are standardized with the mean and standard
    deviation of the training split (fixed by ``seed``), so no test information
    leaks into the scaling.
    """
    data = load_diabetes()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.float32).unsqueeze(1)
    parts = _split(len(y), seed, val_fraction, test_fraction)
    train = parts[0]
    x = (x - x[train].mean(0)) / x[train].std(0)
    y_mean, y_std = y[train].mean().item(), y[train].std().item()
    y = (y - y_mean) / y_std
    splits = tuple((x[i], y[i]) for i in parts)
    return RegressionLoaders(*_loaders(splits, batch_size, device), y_mean, y_std)
