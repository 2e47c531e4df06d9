"""float32 curvature with a float64 accumulation dtype: rank and null space.

A 1-50-50-1 tanh MLP (2,701 weights) is trained on 300 noisy points of ``sin(x)``
(float32, regression, ``MSELoss(reduction="sum")``); its GGN has rank at most 300.
The GGN (``ggn_matrix``) and the ``KFLR`` factors of the float32 model are compared
with those of its float64 copy, without and with ``dtype=torch.float64``:

* relative error: Frobenius norm of the difference over that of the float64 result;
* null space (GGN): the largest |eigenvalue| among the smallest ``P - N C`` (its rank
  is at most ``N C = 300``), divided by the largest eigenvalue;
* most negative eigenvalue over the largest (all these matrices are PSD, so a negative
  eigenvalue is round-off; for the KFLR factors the worst over all factors).

Run: ``python experiments/engine_float32.py`` (about 30 s on a CPU).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from bayescurv import engine


def trained_mlp() -> tuple[nn.Module, Tensor, Tensor]:
    """The float32 model and its data, trained with Adam (fixed seed)."""
    torch.manual_seed(0)
    x = torch.rand(300, 1) * 8 - 4
    y = torch.sin(x) + 0.1 * torch.randn_like(x)
    model = nn.Sequential(
        nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 50), nn.Tanh(), nn.Linear(50, 1)
    )
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(500):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return model, x, y


def null_ratio(matrix: Tensor, null_dim: int) -> float:
    """Largest |eigenvalue| among the ``null_dim`` smallest, over the largest."""
    evals = torch.linalg.eigvalsh(matrix.double())
    return (evals[:null_dim].abs().max() / evals[-1]).item()


def negative_ratio(matrix: Tensor) -> float:
    """Most negative eigenvalue over the largest (0 if none is negative)."""
    evals = torch.linalg.eigvalsh(matrix.double())
    return min(evals[0].item(), 0.0) / evals[-1].item()


def rel(actual: Tensor, expected: Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm()).item()


def main() -> None:
    model, x, y = trained_mlp()
    m64, x64, y64 = copy.deepcopy(model).double(), x.double(), y.double()
    loss = nn.MSELoss(reduction="sum")
    size = sum(p.numel() for p in model.parameters())
    print(f"weights: {size}, data: {len(x)}")
    g64 = engine.ggn_matrix(m64, loss, x64, y64)
    print(f"{'result':24s} {'rel. error':>11s} {'null / max':>11s} {'neg / max':>11s}")
    for label, dtype in [("ggn_matrix", None), ("ggn_matrix(dtype=f64)", F64)]:
        g = engine.ggn_matrix(model, loss, x, y, dtype=dtype)
        null = null_ratio(g, size - len(x))
        print(f"{label:24s} {rel(g, g64):11.1e} {null:11.1e} {negative_ratio(g):11.1e}")
    kw = {"accumulate_grad": False}
    ref = engine.backprop(m64, loss, x64, y64, [engine.KFLR()], **kw)["kflr"]
    for label, dtype in [("KFLR factors", None), ("KFLR(dtype=f64)", F64)]:
        res = engine.backprop(model, loss, x, y, [engine.KFLR(dtype=dtype)], **kw)
        pairs = [
            (got, want)
            for name, factors in ref.items()
            for got, want in zip(res["kflr"][name], factors, strict=True)
        ]
        error = max(rel(got, want) for got, want in pairs)
        negative = min(negative_ratio(got) for got, _ in pairs)
        print(f"{label:24s} {error:11.1e} {'':>11s} {negative:11.1e}")


F64 = torch.float64

if __name__ == "__main__":
    main()
