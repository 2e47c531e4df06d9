"""Small seeded models for the digits study and a fast, seeded MAP trainer.

* :func:`mlp` (e.g. ``mlp(64, 100, 10)``, ``mlp(64, 50, 10)``), :func:`small_cnn`
  and :func:`small_resnet` (BatchNorm) for 8x8 digits or 1-D signals; their
  initialization is fixed by ``seed``.
* :func:`train_map`: Adam with (coupled) weight decay, i.e. the MAP estimate under a
  Gaussian prior (see its docstring for the prior precision this corresponds to).
* :func:`predict_probs`: softmax probabilities of a trained classifier.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader


def _seeded(build, seed: int) -> nn.Module:
    """Build a module with torch's global generator seeded, then restore it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def mlp(*widths: int, seed: int = 0) -> nn.Sequential:
    """A ReLU MLP with the given layer widths, flattening its input first.

    Args:
        *widths: Input, hidden and output sizes, e.g. ``64, 100, 10`` for one hidden
            layer of 100 units. At least two.
        seed: Fixes the initialization.

    Returns:
        ``Flatten, Linear, ReLU, ..., Linear`` (the last layer is linear, so it is
        the one a last-layer Laplace approximation treats). Accepts ``[N, 1, 8, 8]``
        and ``[N, 64]`` inputs alike.
    """
    if len(widths) < 2:
        raise ValueError(f"mlp needs at least two widths (in, out), got {widths}.")

    def build() -> nn.Sequential:
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in itertools.pairwise(widths):
            if len(layers) > 1:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(fan_in, fan_out))
        return nn.Sequential(*layers)

    return _seeded(build, seed)


_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d}
_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
_AVG = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d}


def _spatial_dim(input_shape: tuple[int, ...]) -> int:
    if len(input_shape) - 1 not in _CONV:
        raise ValueError(
            f"input_shape must be (channels, length) or (channels, height, width), "
            f"got {input_shape}."
        )
    return len(input_shape) - 1


def small_cnn(
    n_classes: int = 10, seed: int = 0, input_shape: tuple[int, ...] = (1, 8, 8)
) -> nn.Sequential:
    """Two 3x3 conv + max-pool stages and a two-layer head.

    ``8x8 -> 16@4x4 -> 32@2x2 -> 64 -> n_classes`` for digits (about 15k
    parameters); a 1-D ``input_shape`` ``(channels, length)`` gives the same net with
    ``Conv1d`` (kernel 3) and ``MaxPool1d``.

    Args:
        n_classes: Output size.
        seed: Fixes the initialization.
        input_shape: ``(channels, height, width)`` or ``(channels, length)``; every
            spatial size divisible by 4.
    """
    dim = _spatial_dim(input_shape)
    conv, pool = _CONV[dim], _POOL[dim]
    features = 32 * math.prod(size // 4 for size in input_shape[1:])

    def build() -> nn.Sequential:
        return nn.Sequential(
            conv(input_shape[0], 16, 3, padding=1),
            nn.ReLU(),
            pool(2),
            conv(16, 32, 3, padding=1),
            nn.ReLU(),
            pool(2),
            nn.Flatten(),
            nn.Linear(features, 64),
            nn.ReLU(),
            nn.Linear(64, n_classes),
        )

    return _seeded(build, seed)


class ResidualBlock(nn.Module):
    """``relu(x + bn(conv(relu(bn(conv(x))))))`` at a fixed width (He et al., 2016).

    Args:
        channels: Input and output channels.
        dim: Spatial dimensions (1 or 2).
    """

    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        conv, norm = _CONV[dim], _NORM[dim]
        self.body = nn.Sequential(
            conv(channels, channels, 3, padding=1, bias=False),
            norm(channels),
            nn.ReLU(),
            conv(channels, channels, 3, padding=1, bias=False),
            norm(channels),
        )

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return torch.relu(x + self.body(x))


def small_resnet(
    n_classes: int = 10, seed: int = 0, input_shape: tuple[int, ...] = (1, 8, 8)
) -> nn.Sequential:
    """A small ResNet with BatchNorm: two stages of one residual block each.

    ``conv-BN-ReLU (16) -> block(16) -> max-pool -> conv-BN-ReLU (32) -> block(32)
    -> global average pool -> linear`` (about 28k parameters for digits). Train it in
    train mode; predict and fit Laplace approximations in eval mode (the BatchNorm
    statistics are then fixed, so samples do not interact).

    Args:
        n_classes: Output size.
        seed: Fixes the initialization.
        input_shape: ``(channels, height, width)`` or ``(channels, length)``.
    """
    dim = _spatial_dim(input_shape)
    conv, norm = _CONV[dim], _NORM[dim]

    def build() -> nn.Sequential:
        return nn.Sequential(
            conv(input_shape[0], 16, 3, padding=1, bias=False),
            norm(16),
            nn.ReLU(),
            ResidualBlock(16, dim),
            _POOL[dim](2),
            conv(16, 32, 3, padding=1, bias=False),
            norm(32),
            nn.ReLU(),
            ResidualBlock(32, dim),
            _AVG[dim](1),
            nn.Flatten(),
            nn.Linear(32, n_classes),
        )

    return _seeded(build, seed)


def train_map(
    model: nn.Module,
    train_loader: DataLoader,
    *,
    epochs: int = 100,
    lr: float = 1e-3,
    weight_decay: float = 5e-4,
    seed: int = 0,
    loss_func: nn.Module | None = None,
) -> nn.Module:
    r"""Train to the MAP estimate with Adam and weight decay; deterministic in ``seed``.

    Adam's (coupled) weight decay :math:`\delta` adds :math:`\delta \theta` to the
    gradient of the mean loss, so training minimizes

    .. math::
        \frac{1}{N} \sum_n \ell(f_\theta(x_n), y_n) + \frac{\delta}{2} \|\theta\|^2 ,

    the negative log posterior divided by :math:`N` under a Gaussian prior of
    precision :math:`N \delta` (for cross-entropy; for MSE the likelihood's noise
    scale enters too). Batch order is drawn from torch's global generator, seeded
    with ``seed`` inside a ``fork_rng`` block, so the caller's random state is left
    untouched and the result depends only on the model, the data and ``seed``.

    Args:
        model: The model to train in place.
        train_loader: Yields ``(inputs, targets)``; if it shuffles, it must use the
            global generator (as the loaders of ``experiments.data`` do).
        epochs: Passes over the training data.
        lr: Adam learning rate.
        weight_decay: :math:`\delta`, coupled L2 weight decay.
        seed: Fixes the batch order.
        loss_func: Mean-reduced loss. Default ``nn.CrossEntropyLoss()``.

    Returns:
        The trained model, in eval mode.
    """
    loss_func = nn.CrossEntropyLoss() if loss_func is None else loss_func
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(epochs):
            for inputs, targets in train_loader:
                optimizer.zero_grad()
                loss_func(model(inputs), targets).backward()
                optimizer.step()
    return model.eval()


@torch.no_grad()
def predict_probs(model: nn.Module, inputs: Tensor, batch_size: int = 1024) -> Tensor:
    """Softmax probabilities ``[N, C]`` of ``model`` (in eval mode) on ``inputs``."""
    model.eval()
    chunks = [model(x).softmax(dim=-1) for x in torch.split(inputs, batch_size)]
    return torch.cat(chunks)
