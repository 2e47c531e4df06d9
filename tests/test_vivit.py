"""ViViT: eigenpairs, directional derivatives and Newton steps against dense GGNs."""

from __future__ import annotations

import pytest
import torch

from bayescurv import vivit
from bayescurv.engine import reference
from tests.cases import MODELS, Problem, make_problem
from tests.conftest import assert_close

_BY_NAME = {m.name: m for m in MODELS}
VIVIT_CASES = [
    ("mlp", "ce", "mean"),
    ("cnn", "mse", "sum"),
    ("residual_mlp", "bce", "mean"),
    ("weight_shared", "ce", "sum"),
    ("conv1d_norm", "mse", "mean"),
    ("tokens", "ce", "mean"),
]
VIVIT_IDS = ["-".join(case) for case in VIVIT_CASES]

# Dense eigenvalues below this fraction of the largest count as zero (the GGN's
# numerical rank); far above float64 round-off, far below any genuine eigenvalue here.
RANK_RTOL = 1e-12
# Orthonormality error allowed for e_j, e_k: ORTHO_ATOL * λ_max / sqrt(λ_j λ_k).
ORTHO_ATOL = 1e-13
# Eigenvalues closer than this fraction of the largest are treated as one cluster.
GAP_RTOL = 1e-6
# Monte Carlo: relative Frobenius error of the averaged sampled GGN.
MC_LOOSE_RTOL = 0.15  # 1,000 draws per sample: catches wrong scaling or bias
MC_TIGHT_RTOL = 0.015  # 100,000 draws per sample


@pytest.fixture(scope="module", params=VIVIT_CASES, ids=VIVIT_IDS)
def problem(request: pytest.FixtureRequest) -> Problem:
    name, loss, reduction = request.param
    return make_problem(_BY_NAME[name], loss, reduction)


def _args(p: Problem) -> tuple:
    return (p.model, p.loss_func, p.inputs, p.targets)


def _flat(p: Problem, vectors: dict[str, torch.Tensor]) -> torch.Tensor:
    """``name -> [k, *p]`` as ``[k, P]`` in ``named_parameters`` order."""
    names = reference.trainable_params(p.model)
    return torch.cat([vectors[name].flatten(1) for name in names], dim=1)


def _dense_spectrum(ggn: torch.Tensor) -> torch.Tensor:
    values = torch.linalg.eigvalsh(ggn).flip(0)
    return values[values > RANK_RTOL * values[0]]


def _gradient(p: Problem) -> torch.Tensor:
    loss = p.loss_func(p.model(p.inputs), p.targets)
    names = reference.trainable_params(p.model)
    params = dict(p.model.named_parameters())
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    return torch.cat([g.flatten() for g in grads])


def test_all_eigenpairs_reconstruct_the_ggn(problem: Problem):
    ggn = reference.ggn(*_args(problem))
    values, vectors = vivit.ggn_eigen(*_args(problem))
    flat = _flat(problem, vectors)
    assert values.shape == (flat.shape[0],)
    assert (values[:-1] >= values[1:]).all(), "eigenvalues not descending"
    assert values.numel() == _dense_spectrum(ggn).numel(), "numerical rank"
    # e_k = V u_k / √λ_k is accurate to about eps·λ_max/λ_k
    gram_error = (flat @ flat.T - torch.eye(values.numel(), dtype=flat.dtype)).abs()
    allowed = ORTHO_ATOL * values[0] / (values.unsqueeze(1) * values).sqrt()
    assert (gram_error <= allowed).all(), "eigenvectors not orthonormal"
    assert_close(flat.T @ (values.unsqueeze(1) * flat), ggn, "Σ λ e eᵀ")


def test_top_eigenspace_matches_dense(problem: Problem):
    ggn = reference.ggn(*_args(problem))
    dense_values, dense_vectors = torch.linalg.eigh(ggn)
    dense_values, dense_vectors = dense_values.flip(0), dense_vectors.flip(1)
    gaps = dense_values[:-1] - dense_values[1:] > GAP_RTOL * dense_values[0]
    k = max(i + 1 for i in range(3) if gaps[i])  # top cluster boundary, k <= 3
    values, vectors = vivit.ggn_eigen(*_args(problem), k=k)
    assert_close(values, dense_values[:k], "top-k eigenvalues")
    flat = _flat(problem, vectors)
    top = dense_vectors[:, :k]
    # projectors, not vectors: invariant to signs and to rotations within clusters
    assert_close(flat.T @ flat, top @ top.T, "top-k projector")


def test_k_beyond_rank_returns_the_rank(problem: Problem):
    rank = _dense_spectrum(reference.ggn(*_args(problem))).numel()
    values, vectors = vivit.ggn_eigen(*_args(problem), k=10_000)
    assert values.numel() == rank
    assert all(v.shape[0] == rank for v in vectors.values())


def test_directional_derivatives_against_dense(problem: Problem):
    dd = vivit.directional_derivatives(*_args(problem), k=4)
    flat = _flat(problem, dd.eigenvectors)
    grads = reference.per_sample_gradients(*_args(problem))
    individual = torch.cat([g.flatten(1) for g in grads.values()], dim=1)
    n = individual.shape[0]
    blocks = reference.per_sample_ggn(*_args(problem))
    gammas = n * individual @ flat.T
    lambdas = n * torch.einsum("kp,npq,kq->nk", flat, blocks, flat)
    assert_close(dd.gammas, gammas, "gammas")
    assert_close(dd.lambdas, lambdas, "lambdas")
    assert_close(dd.gamma_mean, gammas.mean(0), "gamma mean")
    assert_close(dd.gamma_variance, gammas.var(0), "gamma variance")
    assert_close(dd.lambda_mean, dd.eigenvalues, "lambda mean = eigenvalues")
    assert_close(dd.lambda_variance, lambdas.var(0), "lambda variance")
    assert_close(dd.gamma_mean, flat @ _gradient(problem), "gamma mean = <g, e>")


def test_subsampled_ggn_and_curvatures(problem: Problem):
    subset = [2, 0]
    blocks = reference.per_sample_ggn(*_args(problem))
    n = blocks.shape[0]
    estimate = n / len(subset) * blocks[subset].sum(0)
    dd = vivit.directional_derivatives(*_args(problem), subsampling=subset)
    flat = _flat(problem, dd.eigenvectors)
    assert_close(flat.T @ (dd.eigenvalues.unsqueeze(1) * flat), estimate, "G_S")
    lambdas = n * torch.einsum("kp,npq,kq->nk", flat, blocks[subset], flat)
    assert_close(dd.lambdas, lambdas, "subsampled lambdas (in subset order)")
    assert dd.gammas.shape == (n, flat.shape[0]), "slopes use the whole batch"


@pytest.mark.parametrize("damping", [0.1, "per_direction"])
def test_newton_step_against_dense_solve(problem: Problem, damping):
    dd = vivit.directional_derivatives(*_args(problem), k=3)
    k = dd.eigenvalues.numel()
    delta = torch.linspace(0.01, 1.0, k, dtype=torch.float64)
    if damping != "per_direction":
        delta = torch.full((k,), damping, dtype=torch.float64)
    step = vivit.newton_step(dd, delta if damping == "per_direction" else damping)
    flat = _flat(problem, dd.eigenvectors)
    ggn = reference.ggn(*_args(problem))
    # minimizer of g·Δ + ½ Δᵀ(G + D)Δ over Δ = Eᵀc, D = Σ δ_k e_k e_kᵀ
    damped = flat @ ggn @ flat.T + torch.diag(delta)
    expected = -flat.T @ torch.linalg.solve(damped, flat @ _gradient(problem))
    assert_close(
        _flat(problem, {n: s.unsqueeze(0) for n, s in step.items()})[0],
        expected,
        "Newton step",
    )


def test_grads_are_left_untouched(problem: Problem):
    sentinel = {
        name: torch.full_like(p, 7.0) for name, p in problem.model.named_parameters()
    }
    for name, p in problem.model.named_parameters():
        p.grad = sentinel[name].clone()
    vivit.directional_derivatives(*_args(problem), k=2, subsampling=[1])
    vivit.ggn_eigen(*_args(problem), k=2)
    for name, p in problem.model.named_parameters():
        assert torch.equal(p.grad, sentinel[name]), name
    problem.model.zero_grad(set_to_none=True)


def test_mc_is_reproducible_with_a_generator():
    p = make_problem(_BY_NAME["mlp"], "ce", "mean")

    def run(seed: int) -> vivit.DirectionalDerivatives:
        gen = torch.Generator().manual_seed(seed)
        return vivit.directional_derivatives(*_args(p), mc_samples=3, generator=gen)

    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first.eigenvalues, again.eigenvalues)
    assert torch.equal(first.lambdas, again.lambdas)
    assert not torch.allclose(first.eigenvalues[:1], other.eigenvalues[:1])


def _mc_ggn_error(loss: str, draws: int, per_call: int) -> float:
    """Relative error of the average of ``Σ λ e eᵀ`` over Monte Carlo calls."""
    p = make_problem(_BY_NAME["mlp"], loss, "mean")
    gen = torch.Generator().manual_seed(3)
    exact = reference.ggn(*_args(p))
    total = torch.zeros_like(exact)
    calls = draws // per_call
    for _ in range(calls):
        values, vectors = vivit.ggn_eigen(*_args(p), mc_samples=per_call, generator=gen)
        flat = _flat(p, vectors)
        total += flat.T @ (values.unsqueeze(1) * flat)
    return ((total / calls - exact).norm() / exact.norm()).item()


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_mc_eigenpairs_converge_in_expectation_loose(loss: str):
    assert _mc_ggn_error(loss, draws=1000, per_call=50) < MC_LOOSE_RTOL


@pytest.mark.montecarlo
@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_mc_eigenpairs_converge_in_expectation_tight(loss: str):
    assert _mc_ggn_error(loss, draws=100_000, per_call=100) < MC_TIGHT_RTOL


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k must be a positive integer"),
        ({"k": 1.5}, "k must be a positive integer"),
        ({"k": True}, "k must be a positive integer"),
        ({"mc_samples": -1}, "mc_samples must be a non-negative integer"),
        ({"mc_samples": 2.0}, "mc_samples must be a non-negative integer"),
        ({"subsampling": []}, "non-empty 1-D sequence"),
        ({"subsampling": [[0]]}, "non-empty 1-D sequence"),
        ({"subsampling": [0.5]}, "non-empty 1-D sequence"),
        ({"subsampling": [4]}, r"must lie in \[0, 4\)"),
        ({"subsampling": [-1]}, r"must lie in \[0, 4\)"),
        ({"subsampling": [1, 1]}, "duplicate indices"),
    ],
)
def test_invalid_options_raise(kwargs, match):
    p = make_problem(_BY_NAME["mlp"], "ce", "mean")
    with pytest.raises(ValueError, match=match):
        vivit.ggn_eigen(*_args(p), **kwargs)
    with pytest.raises(ValueError, match=match):
        vivit.directional_derivatives(*_args(p), **kwargs)


@pytest.mark.parametrize(
    ("damping", "match"),
    [
        (-0.1, "finite and non-negative"),
        (float("nan"), "finite and non-negative"),
        (torch.ones(5), r"shape \(2,\)"),
        (torch.ones(2, 1), r"shape \(2,\)"),
    ],
)
def test_invalid_damping_raises(damping, match):
    p = make_problem(_BY_NAME["mlp"], "ce", "mean")
    dd = vivit.directional_derivatives(*_args(p), k=2)
    with pytest.raises(ValueError, match=match):
        vivit.newton_step(dd, damping)
