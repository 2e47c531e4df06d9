"""Small seeded models for the digits study and a fast, seeded MAP trainer.

* :func:`mlp` (e.g. ``mlp(64, 100, 10)``, ``mlp(64, 50, 10)``) and :func:`small_cnn`
  for 8x8 digits; their initialization is fixed by ``seed``.
* :func:`train_map`: Adam with (coupled) weight decay, i.e. the MAP estimate under a
  Gaussian prior (see its docstring for the prior precision this corresponds to).
* :func:`predict_probs`: softmax probabilities of a trained classifier.
"""

from __future__ import annotations

import itertools

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


def small_cnn(n_classes: int = 10, seed: int = 0) -> nn.Sequential:
    """Two 3x3 conv + max-pool stages and a two-layer head for ``[N, 1, 8, 8]``.

    ``8x8 -> 16@4x4 -> 32@2x2 -> 64 -> n_classes`` (about 15k parameters).

    Args:
        n_classes: Output size.
        seed: Fixes the initialization.
    """

    def build() -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 2 * 2, 64),
            nn.ReLU(),
            nn.Linear(64, n_classes),
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
