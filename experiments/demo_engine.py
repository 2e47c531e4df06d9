"""Demo: the engine's quantities for a small CNN on scikit-learn's digits.

Trains a small CNN for a few epochs on the 8x8 digits (shipped with scikit-learn, no
download), then computes every engine extension on one batch and prints its cost
relative to a plain gradient step (forward + ``loss.backward()``), measured in the
same run (median of several repeats), and a one-line summary of each result.

Run: ``python experiments/demo_engine.py`` (flags ``--epochs``, ``--repeats``,
``--batch-size``; the README's demo, ``experiments/demo.py``, is the Laplace study)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn

from bayescurv import engine

EXTENSIONS = [
    engine.BatchGrad(),
    engine.BatchL2Grad(),
    engine.SumGradSquared(),
    engine.Variance(),
    engine.BatchDotGrad(),
    engine.DiagGGNMC(),
    engine.DiagGGNExact(),
    engine.BatchDiagGGNExact(),
    engine.SqrtGGNMC(),
    engine.SqrtGGNExact(),
]


def digits(device: torch.device) -> tuple[Tensor, Tensor]:
    """Digits as ``[N, 1, 8, 8]`` images in [0, 1] and labels ``[N]``."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    return x.to(device), y.to(device)


def small_cnn() -> nn.Module:
    """Two conv layers with pooling and a linear head."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 2 * 2, 10),
    )


def train(model: nn.Module, x: Tensor, y: Tensor, epochs: int) -> float:
    """A few epochs of Adam; returns the final training accuracy."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_func = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            loss_func(model(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall-clock seconds of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    """Train, then print each extension's cost relative to a gradient step."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, y = digits(device)
    model = small_cnn().to(device)
    acc = train(model, x, y, args.epochs)
    print(f"small CNN on digits ({len(x)} images): train accuracy {acc:.3f}")
    loss_func = nn.CrossEntropyLoss()
    xb, yb = x[: args.batch_size], y[: args.batch_size]

    def gradient_step() -> None:
        model.zero_grad()
        loss_func(model(xb), yb).backward()

    base = median_time(gradient_step, args.repeats)
    print(f"gradient step on a batch of {len(xb)}: {1e3 * base:.2f} ms\n")
    print(f"{'extension':<22}{'savefield':<24}{'cost / gradient step':>20}  result")
    for ext in EXTENSIONS:

        def run(ext: engine.Extension = ext) -> engine.BackpropResult:
            model.zero_grad()
            return engine.backprop(model, loss_func, xb, yb, [ext])

        ratio = median_time(run, args.repeats) / base
        values = run()[ext.savefield]
        total = sum(v.abs().sum().item() for v in values.values())
        shape = tuple(values["0.weight"].shape)
        print(
            f"{type(ext).__name__:<22}{ext.savefield:<24}{ratio:>20.2f}  "
            f"0.weight {shape}, sum |.| {total:.3g}"
        )


if __name__ == "__main__":
    main()
