"""float32 against float64 Laplace on a rank-deficient regression MLP (issue 14).

A tanh MLP 1-50-50-1 (2,701 weights) trained on 300 points of ``sin(x) + 0.1
noise`` has more weights than data x outputs, so its GGN is rank-deficient. The
same weights are fitted in float32 and in float64 (all weights, sigma_noise = 0.1)
for every structure and prior precision; the script prints the evidence of both,
its relative difference, and the largest relative difference of the GLM predictive
variance on 50 test inputs in [-6, 6].

The model and data are :func:`experiments.engine_float32.trained_mlp`'s (the engine's
float32 study uses the same network).

Run: ``python -m experiments.laplace_float32 [structures...]`` (default: full kron
diag lowrank).
"""

from __future__ import annotations

import copy
import sys

import torch

from bayescurv import Laplace
from experiments.engine_float32 import trained_mlp

PRIORS = (1e-6, 1e-3, 1.0, 1e3, 1e6)


def compare(structure: str, prior: float, model, x, y) -> str:
    """One row: evidence in both dtypes, their relative difference, variance's."""
    test = torch.linspace(-6, 6, 50)[:, None]
    results = []
    for dtype in (torch.float32, torch.float64):
        net = copy.deepcopy(model).to(dtype)
        loader = [
            (x[i : i + 100].to(dtype), y[i : i + 100].to(dtype)) for i in (0, 100, 200)
        ]
        la = Laplace(
            net,
            "regression",
            subset_of_weights="all",
            hessian_structure=structure,
            sigma_noise=0.1,
            prior_precision=prior,
            generator=torch.Generator().manual_seed(0),
        )
        la.fit(loader)
        evidence = la.log_marginal_likelihood().item()
        results.append((evidence, la(test.to(dtype))[1].flatten().double()))
    (e32, v32), (e64, v64) = results
    rel = abs(e32 - e64) / abs(e64)
    var = ((v32 - v64).abs() / v64.abs()).max().item()
    return (
        f"{structure:8s} prior {prior:7.0e}  evidence f32 {e32:14.4f}  f64 {e64:14.4f}"
        f"  rel {rel:.1e}  variance rel {var:.1e}"
    )


def main() -> None:
    structures = sys.argv[1:] or ["full", "kron", "diag", "lowrank"]
    model, x, y = trained_mlp()
    print(f"{sum(p.numel() for p in model.parameters())} weights, 300 points")
    for structure in structures:
        for prior in PRIORS:
            print(compare(structure, prior, model, x, y))


if __name__ == "__main__":
    main()
