"""KFAC: its average over many draws is KFLR; reproducible with a generator."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bayescurv import engine
from tests.cases import MODELS, make_problem
from tests.conftest import assert_close
from tests.engine.kron_helpers import APPROXES

MC_MODELS = [m for m in MODELS if m.name in ("mlp", "cnn", "conv1d_norm", "tokens")]
MC_CASES = [(m, loss) for m in MC_MODELS for loss in ("ce", "mse", "bce")]
MC_IDS = [f"{m.name}-{loss}" for m, loss in MC_CASES]

# Relative error of all sampled factors (norm of the difference over the exact norm)
LOOSE_RTOL = 0.15  # 4,000 draws: fast, catches wrong scaling or bias
TIGHT_RTOL = 0.015  # 400,000 draws


def _sampled_index(model: nn.Module) -> dict[str, int]:
    """Position of the sampled factor ``B`` in each parameter's list."""
    return {
        f"{mod_name}.{local}" if mod_name else local: int(
            isinstance(module, nn.Embedding)
        )
        for mod_name, module in model.named_modules()
        for local, _ in module.named_parameters(recurse=False)
    }


def _kfac_vs_kflr(model_case, loss: str, approx: str, draws: int, chunks: int) -> float:
    p = make_problem(model_case, loss, "mean")
    model = p.model
    args = (model, p.loss_func, p.inputs, p.targets)
    exact = engine.backprop(*args, [engine.KFLR(kfac_approx=approx)])["kflr"]
    gen = torch.Generator().manual_seed(1)
    ext = engine.KFAC(mc_samples=draws // chunks, kfac_approx=approx)
    total: dict[str, torch.Tensor] = {}
    for _ in range(chunks):
        kfac = engine.backprop(*args, [ext], generator=gen)["kfac"]
        for name, factors in kfac.items():
            for i, (f, e) in enumerate(zip(factors, exact[name], strict=True)):
                if i != _sampled_index(model)[name]:
                    assert_close(f, e, f"unsampled factor {i} of {name}")
            b = factors[_sampled_index(model)[name]]
            total[name] = total[name] + b if name in total else b
    diff = sum(
        (total[k] / chunks - exact[k][i]).square().sum()
        for k, i in _sampled_index(model).items()
    )
    norm = sum(exact[k][i].square().sum() for k, i in _sampled_index(model).items())
    return (diff / norm).sqrt().item()


# the fast run: every loss, every model, both approximations, not all combinations
LOOSE = [
    ("mlp", "ce", "expand"),
    ("mlp", "mse", "reduce"),
    ("mlp", "bce", "expand"),
    ("cnn", "ce", "expand"),
    ("cnn", "bce", "reduce"),
    ("conv1d_norm", "mse", "expand"),
    ("tokens", "ce", "reduce"),
    ("tokens", "bce", "expand"),
]


@pytest.mark.parametrize(
    ("model_case", "loss", "approx"),
    [(next(m for m in MC_MODELS if m.name == name), *rest) for name, *rest in LOOSE],
    ids=["-".join(case) for case in LOOSE],
)
def test_kfac_converges_to_kflr_loose(model_case, loss, approx):
    assert _kfac_vs_kflr(model_case, loss, approx, draws=4000, chunks=1) < LOOSE_RTOL


@pytest.mark.montecarlo
@pytest.mark.parametrize("approx", APPROXES)
@pytest.mark.parametrize(("model_case", "loss"), MC_CASES, ids=MC_IDS)
def test_kfac_converges_to_kflr_tight(model_case, loss, approx):
    err = _kfac_vs_kflr(model_case, loss, approx, draws=400_000, chunks=20)
    assert err < TIGHT_RTOL


def test_kfac_is_reproducible_with_a_generator():
    p = make_problem(MODELS[0], "ce", "mean")
    args = (p.model, p.loss_func, p.inputs, p.targets)

    def run(seed: int) -> dict:
        gen = torch.Generator().manual_seed(seed)
        res = engine.backprop(*args, [engine.KFAC(mc_samples=2)], generator=gen)
        return res["kfac"]

    first, again, other = run(0), run(0), run(1)
    for name, factors in first.items():
        torch.testing.assert_close(again[name][0], factors[0], rtol=0, atol=0)
    assert not torch.allclose(other["0.weight"][0], first["0.weight"][0])


def test_kfac_divides_by_the_number_of_samples():
    """``B`` averages the M draws (it does not sum them): E[B] = 2 N I here."""
    p = make_problem(MODELS[0], "mse", "sum")
    args = (p.model, p.loss_func, p.inputs, p.targets)
    gen = torch.Generator().manual_seed(3)
    many = engine.backprop(*args, [engine.KFAC(mc_samples=50)], generator=gen)["kfac"]
    b = many["2.bias"][0]
    # MSE with sum reduction: E[B] of the output bias is 2 N I
    eye = torch.eye(b.shape[0], dtype=b.dtype)
    assert torch.linalg.matrix_norm(b / (2 * p.inputs.shape[0]) - eye) < 0.5
