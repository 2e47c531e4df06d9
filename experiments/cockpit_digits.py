"""Cockpit on scikit-learn's digits: a badly chosen and a good learning rate.

Trains the same small CNN (two conv + max-pool blocks, a linear head) on the 8x8
digits (1,500 training images, the rest held out) with plain SGD twice: with a
learning rate that is far too large and with a good one, each watched by a Cockpit
with every instrument of the ``full`` preset, and writes both dashboards:

* ``docs/results/cockpit_digits_bad_lr.png``
* ``docs/results/cockpit_digits_good_lr.png``

``docs/cockpit.md`` explains what they show. Runs offline (the digits ship with
scikit-learn) in well under two minutes on two cores.

Run: ``python -m experiments.cockpit_digits``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from bayescurv import cockpit as ck

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
RUNS = {"bad_lr": 2.0, "good_lr": 0.2}  # learning rates
EPOCHS = 12
BATCH_SIZE = 64
NUM_TRAIN = 1500


def digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Images ``[N, 1, 8, 8]`` in [0, 1] and labels, split into train and test."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:NUM_TRAIN], order[NUM_TRAIN:]
    return images[train], labels[train], images[test], labels[test]


def cnn() -> nn.Module:
    """A small CNN for 8x8 images: 80 + 1,168 + 650 = 1,898 parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 2 * 2, 10),
    )


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train(name: str, lr: float) -> Path:
    """One training run with the Cockpit; returns the dashboard's path."""
    x_train, y_train, x_test, y_test = digits()
    torch.manual_seed(0)
    model = cnn()
    loss_func = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    instruments = ck.preset_instruments(
        "full", first_order_interval=2, curvature_interval=10
    )
    cockpit = ck.Cockpit(
        model,
        loss_func,
        instruments,
        optimizer=optimizer,
        generator=torch.Generator().manual_seed(0),
    )
    batches = torch.Generator().manual_seed(1)
    for _ in range(EPOCHS):
        order = torch.randperm(NUM_TRAIN, generator=batches)
        for start in range(0, NUM_TRAIN - BATCH_SIZE + 1, BATCH_SIZE):
            index = order[start : start + BATCH_SIZE]
            with cockpit.step(x_train[index], y_train[index]):
                optimizer.step()
    train_acc = accuracy(model, x_train, y_train)
    test_acc = accuracy(model, x_test, y_test)
    title = (
        f"digits CNN, SGD lr={lr} ({name.replace('_', ' ')}): "
        f"train accuracy {train_acc:.1%}, test accuracy {test_acc:.1%}"
    )
    print(f"{name}: {cockpit.steps_taken} steps, {title}")
    return cockpit.plot(RESULTS / f"cockpit_digits_{name}.png", title=title)


def main() -> None:
    # the tensors are tiny: a second thread only adds synchronization overhead
    torch.set_num_threads(1)
    start = time.perf_counter()
    for name, lr in RUNS.items():
        print(f"wrote {train(name, lr)}")
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
