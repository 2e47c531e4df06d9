"""Crossover of the two ways a convolution's squared per-sample vectors are summed.

For convolution shapes of ResNet-18 on CIFAR-sized inputs (``experiments/resnet.py``,
batch 16) and of the 3C3D net (batch 64), times ``Reduction.SUM_SQUARED`` (or
``--reduction batch_squared``) of ``V`` random columns two ways, on one thread (CPU
time):

* ``vectors``: the per-sample weight vectors ``[V, N, C_out, C_in K]`` from one
  batched matmul, squared in place and summed (``ConvRule.reduce`` on a call whose
  output size it is not told, so it cannot take a closed form);
* ``pairs``: the location-pair expansion of
  :func:`bayescurv.engine.rules.conv_squares.squared_sums`.

and prints the ratio ``pairs / vectors`` next to the choice the cost model of
NOTE [When location pairs beat per-sample vectors] makes (``pairs_cheaper``), so
a wrong choice shows as a ratio above 1 with ``choice = pairs`` (or below 1 with
``vectors``). Run: ``OMP_NUM_THREADS=1 python -m experiments.conv_squares`` from the
repository root.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from bayescurv.engine.extensions import Reduction
from bayescurv.engine.rules import ConvRule, LayerCall
from bayescurv.engine.rules.conv import unfold_input
from bayescurv.engine.rules.conv_squares import pairs_cheaper, squared_sums

# (name, C_in, C_out, kernel, stride, padding, input side, batch)
SHAPES = [
    ("rn18.conv1", 3, 64, 7, 2, 3, 32, 16),
    ("rn18.layer1", 64, 64, 3, 1, 1, 8, 16),
    ("rn18.layer2.0.conv1", 64, 128, 3, 2, 1, 8, 16),
    ("rn18.layer2.conv2", 128, 128, 3, 1, 1, 4, 16),
    ("rn18.layer2.down", 64, 128, 1, 2, 0, 8, 16),
    ("rn18.layer3.0.conv1", 128, 256, 3, 2, 1, 4, 16),
    ("rn18.layer3.conv2", 256, 256, 3, 1, 1, 2, 16),
    ("rn18.layer4.0.conv1", 256, 512, 3, 2, 1, 2, 16),
    ("rn18.layer4.conv2", 512, 512, 3, 1, 1, 1, 16),
    ("rn18.layer4.down", 256, 512, 1, 2, 0, 2, 16),
    ("3c3d.conv2", 64, 96, 3, 1, 0, 14, 64),
    ("3c3d.conv3", 96, 128, 3, 1, 1, 6, 64),
]

# Shapes the cost model was not fitted on (a check, not a fit): a WideResNet-16-4 and
# a MobileNet-style depthwise-separable net on CIFAR-sized inputs, batch 32.
# (name, C_in, C_out, kernel, stride, padding, input side, batch, groups)
HELDOUT = [
    ("wrn16-4.block1", 64, 64, 3, 1, 1, 32, 32, 1),
    ("wrn16-4.block2.0", 64, 128, 3, 2, 1, 32, 32, 1),
    ("wrn16-4.block2", 128, 128, 3, 1, 1, 16, 32, 1),
    ("wrn16-4.block3.0", 128, 256, 3, 2, 1, 16, 32, 1),
    ("wrn16-4.block3", 256, 256, 3, 1, 1, 8, 32, 1),
    ("mobilenet.dw32", 32, 32, 3, 1, 1, 32, 32, 32),
    ("mobilenet.pw32", 32, 64, 1, 1, 0, 32, 32, 1),
    ("mobilenet.dw8", 256, 256, 3, 1, 1, 8, 32, 256),
    ("mobilenet.pw8", 256, 256, 1, 1, 0, 8, 32, 1),
    ("mobilenet.dw2", 1024, 1024, 3, 1, 1, 2, 32, 1024),
    ("mobilenet.pw2", 1024, 1024, 1, 1, 0, 2, 32, 1),
]


def cpu_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median CPU time of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def compare(
    conv: nn.Conv2d, side: int, batch: int, v: int, red: Reduction, repeats: int
) -> tuple[float, float, int]:
    """CPU seconds of both forms and the number of output locations."""
    x = torch.randn(batch, conv.in_channels, side, side)
    with torch.no_grad():
        out = conv(x)
    cols = torch.randn(v, *out.shape)
    patches = unfold_input(conv, x)
    call = LayerCall((x,))
    rule = ConvRule()
    squared = {red}
    length = out[0, 0].numel()
    flat = cols.reshape(v, batch, conv.out_channels, length)
    vectors = cpu_seconds(lambda: rule.reduce(conv, call, cols, squared), repeats)
    if length > MAX_PAIRS_LENGTH:  # O(L^2) pairs: minutes per call, never chosen
        return vectors, float("nan"), length
    pairs = cpu_seconds(
        lambda: squared_sums(patches, flat, conv.groups, squared, 2**30), repeats
    )
    return vectors, pairs, length


MAX_PAIRS_LENGTH = 128
"""Output locations above which the pair form is not timed (6-11 s per call at 256,
75 s at 1,024 locations: a WideResNet's 16x16 and 32x32 maps)."""


def main(argv: list[str] | None = None) -> None:
    """Print one row per (shape, columns)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--columns", default="1,2,4,10")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--shapes",
        choices=["fitted", "heldout"],
        default="fitted",
        help="the shapes the cost model was fitted on, or held-out architectures",
    )
    parser.add_argument(
        "--reduction",
        choices=[Reduction.SUM_SQUARED.value, Reduction.BATCH_SQUARED.value],
        default=Reduction.SUM_SQUARED.value,
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    red = Reduction(args.reduction)
    many = red == Reduction.BATCH_SQUARED
    print(f"{'layer':22} {'L':>4} {'V':>3} {'vectors ms':>10} {'pairs ms':>9} ratio")
    shapes = HELDOUT if args.shapes == "heldout" else [(*s, 1) for s in SHAPES]
    for name, c_in, c_out, kernel, stride, padding, side, batch, groups in shapes:
        conv = nn.Conv2d(
            c_in, c_out, kernel, stride, padding=padding, groups=groups, bias=False
        )
        for v in (int(c) for c in args.columns.split(",")):
            vectors, pairs, length = compare(conv, side, batch, v, red, args.repeats)
            rest = conv.weight[0].numel() * groups  # as ConvRule passes it
            cheaper = pairs_cheaper(v, c_out, rest, length, groups, many)
            choice = "pairs" if cheaper else "vectors"
            print(
                f"{name:22} {length:4d} {v:3d} {vectors * 1e3:10.1f} "
                f"{pairs * 1e3:9.1f} {pairs / vectors:5.2f} choice={choice}"
            )


if __name__ == "__main__":
    main()
