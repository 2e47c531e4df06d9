"""Benchmark: engine extensions on the newer layers, hand rules vs. the generic rule.

Models (synthetic data, ``nn.CrossEntropyLoss(reduction="mean")``, C = 10 classes):

* ``decoder``: Linear to ``[16, 4, 4]``, two ``ConvTranspose2d`` (stride 2), head;
* ``attention``: RMSNorm + ``MultiheadAttention`` (4 heads, sequence first) + MLP
  on ``[N, 16, 32]``;
* ``lstm`` / ``gru``: two-layer recurrent classifier on ``[N, 20, 16]``, hidden 32.

Each time is the median over ``--repeats`` calls (after one warm-up) divided by the
median of a plain gradient step (forward + ``loss.backward()``) measured alternately
in the same run. ``generic`` registers :class:`bayescurv.engine.GenericRule` for the
model's hand-ruled layers (not possible for attention: ``MultiheadAttention`` uses
``out_proj``'s parameters without calling it; for LSTM/GRU ``torch.func.vmap`` cannot
run the fused kernels per sample), showing what a hand rule saves.

Run: ``python experiments/bench_layers.py`` (``--quick`` for a smoke test).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from bayescurv import engine

C = 10
EXTENSIONS = {
    "BatchGrad": engine.BatchGrad,
    "DiagGGNExact": engine.DiagGGNExact,
    "DiagGGNMC": engine.DiagGGNMC,
    "BatchDiagGGNExact": engine.BatchDiagGGNExact,
}


class Decoder(nn.Module):
    """Linear, then two stride-2 transposed convolutions, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(32, 16 * 4 * 4)
        self.up1 = nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)
        self.head = nn.Linear(4 * 16 * 16, C)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        h = torch.relu(self.lin(x)).reshape(-1, 16, 4, 4)
        h = torch.relu(self.up2(torch.relu(self.up1(h))))
        return self.head(h.flatten(1))


class Attention(nn.Module):
    """One pre-norm attention block (sequence-first attention) and a head."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 4)
        self.mlp = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))
        self.head = nn.Linear(dim, C)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        h = self.norm(x).transpose(0, 1)
        h = x + self.attn(h, h, h, need_weights=False)[0].transpose(0, 1)
        return self.head((h + self.mlp(h)).mean(1))


class Recurrent(nn.Module):
    """Two-layer recurrent classifier from the last time step."""

    def __init__(self, cls: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cls(16, 32, num_layers=2, batch_first=True)
        self.head = nn.Linear(32, C)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.head(self.rnn(x)[0][:, -1])


_Spec = tuple[Callable[[], nn.Module], tuple[int, ...], dict[type, engine.LayerRule]]
MODELS: dict[str, _Spec] = {
    "decoder": (
        Decoder,
        (32,),
        {nn.Linear: engine.GenericRule(), nn.ConvTranspose2d: engine.GenericRule()},
    ),
    "attention": (Attention, (16, 32), {}),
    "lstm": (lambda: Recurrent(nn.LSTM), (20, 16), {}),
    "gru": (lambda: Recurrent(nn.GRU), (20, 16), {}),
}


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(name: str, batch: int, repeats: int) -> None:
    """Print one row per extension: hand-rule and generic-rule time ratios."""
    make, shape, generic_for = MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    x, y = torch.randn(batch, *shape), torch.randint(0, C, (batch,))
    loss_func = nn.CrossEntropyLoss()

    def gradient() -> None:
        model.zero_grad()
        loss_func(model(x), y).backward()

    base = median_seconds(gradient, repeats)
    for ext_name, ext in EXTENSIONS.items():
        ratios = []
        for generic in (False, True):
            if generic and not generic_for:
                ratios.append("n/a")
                continue
            saved = {cls: engine.rules.get_rule(cls) for cls in generic_for}
            if generic:
                for cls, rule in generic_for.items():
                    engine.register_rule(cls, rule, overwrite=True)
            try:
                t = median_seconds(
                    lambda ext=ext: engine.backprop(model, loss_func, x, y, [ext()]),
                    repeats,
                )
            finally:
                for cls, rule in saved.items():
                    engine.register_rule(cls, rule, overwrite=True)
            ratios.append(f"{t / base:.2f}")
        print(f"{name:<10}{ext_name:<19}{ratios[0]:>10}{ratios[1]:>10}", flush=True)
    print(f"{'':<10}(gradient step: batch {batch}, {1e3 * base:.1f} ms)")


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch", type=int, default=None, help="default 64")
    parser.add_argument("--repeats", type=int, default=None, help="default 5")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    batch = args.batch or (4 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 5)
    print(f"ratios to a gradient step; threads {torch.get_num_threads()}")
    print(f"{'model':<10}{'extension':<19}{'hand':>10}{'generic':>10}")
    for name in args.models.split(","):
        bench(name, batch, repeats)


if __name__ == "__main__":
    main()
