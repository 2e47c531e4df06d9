"""Fitting: batching, accumulation, dict batches, temperature, state, sampling."""

from __future__ import annotations

import importlib
import io

import pytest
import torch
from torch import nn

from bayescurv import Laplace
from bayescurv.engine.pool import POOL, sweep
from tests.conftest import assert_close
from tests.curvature.conformance import LOOSE_SAMPLES, Z_MAX, covariance_zscores
from tests.laplace.conftest import make_problem

STRUCTURES = ["full", "diag", "kron", "lowrank"]
SUBSETS = ["all", "last_layer"]


def fitted(problem, subset, structure, loader=None, **kwargs):
    la = Laplace(
        problem.model,
        problem.likelihood,
        subset_of_weights=subset,
        hessian_structure=structure,
        **kwargs,
    )
    la.fit(problem.loader() if loader is None else loader)
    return la


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("subset", SUBSETS)
def test_batching_does_not_matter(subset, structure):
    """One batch or uneven batches give the same posterior (kron: A is a mean)."""
    problem = make_problem("classification")
    whole = fitted(problem, subset, structure, [(problem.x, problem.y)])
    batched = fitted(problem, subset, structure)
    assert_close(batched.precision.dense(), whole.precision.dense(), "Λ")
    assert_close(batched.loss, whole.loss, "loss")
    assert batched.n_data == whole.n_data == len(problem.x)


@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
@pytest.mark.parametrize("subset", SUBSETS)
def test_override_false_adds_to_the_earlier_fit(subset, structure):
    problem = make_problem("regression")
    loader = problem.loader()
    whole = fitted(problem, subset, structure, loader)
    la = fitted(problem, subset, structure, loader[:1])
    la.fit(loader[1:], override=False)
    assert_close(la.precision.dense(), whole.precision.dense(), "Λ")
    assert_close(la.log_marginal_likelihood(), whole.log_marginal_likelihood(), "ev")
    la.fit(loader)  # override=True starts afresh
    assert_close(la.precision.dense(), whole.precision.dense(), "Λ")


class DictModel(torch.nn.Module):
    """Reads its input from a batch dict, as Hugging Face models do."""

    def __init__(self, inner: torch.nn.Module, key: str = "input_ids") -> None:
        super().__init__()
        self.inner, self.key = inner, key

    def forward(self, batch: dict) -> torch.Tensor:
        return self.inner(batch[self.key])


@pytest.mark.parametrize(
    ("subset", "key"), [("all", "input_ids"), ("last_layer", "x"), ("all", "x")]
)
def test_dict_batches_equal_tuple_batches(subset, key):
    problem = make_problem("classification")
    model = DictModel(problem.model, key)
    dicts = [{key: x, "labels": y, "note": "ignored"} for x, y in problem.loader()]
    la = Laplace(
        model,
        "classification",
        subset_of_weights=subset,
        hessian_structure="full",
        dict_key_x=key,
    )
    la.fit(dicts, progress_bar=True)
    reference = fitted(problem, subset, "full")
    assert_close(la.precision.dense(), reference.precision.dense(), "Λ")
    assert_close(la({key: problem.x}), reference(problem.x), "predictive")


def test_temperature_scales_the_data_term():
    problem = make_problem("classification")
    cold = fitted(problem, "last_layer", "full", temperature=0.5, prior_precision=2.0)
    plain = fitted(problem, "last_layer", "full", prior_precision=2.0)
    eye = torch.eye(plain.num_params, dtype=torch.float64)
    expected = 2 * (plain.precision.dense() - 2 * eye) + 2 * eye
    assert_close(cold.precision.dense(), expected, "Λ at T = 1/2")
    assert_close(cold.log_likelihood, 2 * plain.log_likelihood, "tempered log lik")


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("subset", SUBSETS)
def test_state_dict_round_trip(subset, structure, decomposition_sizes):
    problem = make_problem("regression")
    la = fitted(
        problem,
        subset,
        structure,
        sigma_noise=0.7,
        prior_precision=torch.tensor([0.5, 2.0, 1.0, 3.0]) if subset == "all" else 1.5,
    )
    expected = la.log_marginal_likelihood()
    buffer = io.BytesIO()
    torch.save(la.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = Laplace(
        problem.model,
        "regression",
        subset_of_weights=subset,
        hessian_structure=structure,
    )
    decomposition_sizes.clear()
    fresh.load_state_dict(state)
    assert_close(fresh.log_marginal_likelihood(), expected, "evidence")
    if structure == "kron":  # the saved eigenbases are reused
        assert decomposition_sizes == []
    assert_close(fresh.sigma_noise, la.sigma_noise, "sigma")
    assert_close(fresh.prior_precision, la.prior_precision, "prior")
    assert_close(fresh.posterior_variance, la.posterior_variance, "variance")
    assert_close(fresh(problem.x)[1], la(problem.x)[1], "predictive variance")
    fresh.fit(problem.loader()[:1], override=structure == "lowrank")  # usable


@pytest.mark.parametrize("structure", STRUCTURES)
def test_samples_have_the_posterior_covariance(structure):
    problem = make_problem("binary")
    la = fitted(problem, "all", structure, prior_precision=0.8)
    gen = torch.Generator().manual_seed(0)
    draws = la.sample(LOOSE_SAMPLES, generator=gen)
    mean_z, cov_z = covariance_zscores(draws - la.mean, la.posterior_covariance)
    assert mean_z < Z_MAX
    assert cov_z < Z_MAX
    again = la.sample(3, generator=torch.Generator().manual_seed(1))
    assert_close(
        again, la.sample(3, generator=torch.Generator().manual_seed(1)), "seed"
    )


def test_fit_leaves_gradients_and_flags_alone():
    problem = make_problem("classification")
    grads = [torch.full_like(p, 3.0) for p in problem.model.parameters()]
    for p, g in zip(problem.model.parameters(), grads, strict=True):
        p.grad = g
    problem.model[0].bias.requires_grad_(False)
    try:
        for structure in STRUCTURES:
            la = fitted(problem, "all", structure)
            assert la.num_params == sum(
                p.numel() for p in problem.model.parameters() if p.requires_grad
            )
            la(problem.x)
        for p, g in zip(problem.model.parameters(), grads, strict=True):
            assert p.grad is g
        assert not problem.model[0].bias.requires_grad
        assert problem.model[0].weight.requires_grad
    finally:
        problem.model[0].bias.requires_grad_(True)
        for p in problem.model.parameters():
            p.grad = None


class _Residual(torch.nn.Module):
    """Not an nn.Sequential: the engine probes its samples."""

    def __init__(self, mix: bool = False) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(3, 3)
        self.head = torch.nn.Linear(3, 2)
        self.mix = mix

    def forward(self, x):
        h = x + torch.tanh(self.inner(x))
        if self.mix:  # couples the samples: the probe must catch it
            h = h - h.mean(0)
        return self.head(h)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_samples_are_probed_once_per_configuration(monkeypatch, structure):
    """One probe for a fit over many batches and later predictions of that layout."""
    engine_backprop = importlib.import_module("bayescurv.engine.backprop")
    calls = []
    probe = engine_backprop.check_separable
    monkeypatch.setattr(
        engine_backprop,
        "check_separable",
        lambda *args: calls.append(1) or probe(*args),
    )
    torch.manual_seed(0)
    model = _Residual().double()
    x = torch.randn(12, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (12,))
    la = Laplace(model, "classification", "all", structure)
    la.fit([(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])])
    la(x[:5])
    la(x[5:])
    assert len(calls) == 1
    la(x[:5, None, :].expand(5, 2, 3))  # another per-sample shape: probed again
    assert len(calls) == 2


def test_a_model_mixing_samples_raises_at_every_fit():
    """A failed probe is not remembered: the next fit raises again."""
    model = _Residual(mix=True).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (8,))
    la = Laplace(model, "classification", "all", "kron")
    for _ in range(2):
        with pytest.raises(ValueError, match="mixes samples"):
            la.fit([(x, y)])


def test_fit_hands_back_the_engines_pooled_memory():
    """NOTE [The fit hands back the engine's pooled memory]: nothing stays pooled."""
    with sweep():
        held = POOL.empty((1 << 20,), torch.float32, "cpu")  # 4 MB, pooled
    del held  # free, but kept for the next calls
    assert POOL.nbytes >= 4 << 20
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    Laplace(model, "classification", "all", "kron").fit([(x, y)])
    assert POOL.nbytes == 0
