r"""Crossover of the two orders of the Kronecker predictive's positional contraction.

A layer applied at ``T`` positions (a convolution's patches, a sequence) contributes
:math:`\sum_{o,i} w_{oi} (\sum_t h_{cto} b_{ti})^2` to the variance of output ``c``
(NOTE [Kronecker variance of a layer applied at T positions] in
``bayescurv/laplace/sources/jacobians.py``). It is computed through the ``[C, out,
in]`` rows or through the symmetric position pairs. This script times both on
random float32 tensors, one thread (CPU time, median of ``--repeats``), and prints
the ratio ``pairs / rows`` next to the choice of ``_contraction_costs``, so a wrong
choice shows as a ratio above 1 with ``choice = pairs`` (or below 1 with ``rows``).

``--shapes fitted`` are the cases ``ROWS_ENTRY_COST`` was chosen on (ResNet-18 on
CIFAR-sized inputs and neighbours); ``--shapes heldout`` are architectures it was
not chosen on (a WideResNet-16-4, a VGG-style net, transformer blocks). Run:
``OMP_NUM_THREADS=1 python -m experiments.kron_contractions`` from the repository
root.
"""

from __future__ import annotations

import argparse
import functools

import torch

from bayescurv.laplace.sources.jacobians import _contraction_costs, _paired, _rows
from experiments.conv_squares import cpu_seconds

# (name, T, in, out, C, samples)
FITTED = [
    ("rn18.layer1", 64, 576, 64, 10, 16),
    ("rn18.layer2", 16, 1152, 128, 10, 16),
    ("rn18.layer3", 4, 2304, 256, 10, 16),
    ("t9", 9, 576, 64, 10, 16),
    ("t16", 16, 576, 64, 10, 16),
    ("t25", 25, 576, 64, 10, 16),
    ("t30", 30, 576, 64, 10, 16),
    ("t36", 36, 576, 64, 10, 16),
    ("t49", 49, 576, 64, 10, 16),
    ("t25 wide", 25, 1152, 128, 10, 16),
    ("t30 wide", 30, 1152, 128, 10, 16),
    ("t36 wide", 36, 1152, 128, 10, 16),
    ("t25 narrow", 25, 288, 32, 10, 16),
    ("t36 narrow", 36, 288, 32, 10, 16),
    ("c100 t16", 16, 1152, 128, 100, 8),
    ("c100 t36", 36, 576, 64, 100, 8),
    ("c100 t64", 64, 576, 64, 100, 8),
]

HELDOUT = [
    ("wrn16-4.block3 8x8", 64, 2304, 256, 10, 8),
    ("wrn16-4.block2 16x16", 256, 1152, 128, 10, 4),
    ("wrn16-4.block3.0 8x8", 64, 1152, 256, 10, 8),
    ("vgg 4x4", 16, 4608, 512, 10, 4),
    ("vgg 2x2", 4, 4608, 512, 10, 4),
    ("attn 32 tokens", 32, 256, 768, 2, 16),
    ("mlp 32 tokens", 32, 1024, 256, 2, 16),
    ("attn 8 tokens", 8, 256, 768, 2, 16),
    ("attn 128 tokens", 128, 256, 256, 2, 8),
]


def main(argv: list[str] | None = None) -> None:
    """Print one row per (case, variances or covariances)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", choices=["fitted", "heldout"], default="fitted")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    print(
        f"{'case':22} {'T':>4} {'in':>5} {'out':>4} {'C':>4} {'form':>5} "
        f"{'rows ms':>8} {'pairs ms':>8} ratio choice"
    )
    right = total = 0
    for name, positions, width, out, classes, samples in (
        HELDOUT if args.shapes == "heldout" else FITTED
    ):
        inputs = torch.randn(samples, positions, width)
        grads = torch.randn(samples, classes, positions, out)
        weights = torch.rand(out, width)
        for diagonal in (True, False):
            tensors = (inputs, grads, weights, diagonal)
            rows = cpu_seconds(functools.partial(_rows, *tensors), args.repeats)
            pairs = cpu_seconds(functools.partial(_paired, *tensors), args.repeats)
            cost = _contraction_costs(positions, classes, out, width, diagonal)
            choice = "pairs" if cost[0] < cost[1] else "rows"
            right += (pairs < rows) == (choice == "pairs")
            total += 1
            form = "var" if diagonal else "cov"
            print(
                f"{name:22} {positions:4d} {width:5d} {out:4d} {classes:4d} {form:>5} "
                f"{rows * 1e3:8.1f} {pairs * 1e3:8.1f} {pairs / rows:5.2f} {choice}"
            )
    print(f"the faster order chosen in {right} of {total} cases")


if __name__ == "__main__":
    main()
