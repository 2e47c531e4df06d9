"""Curvature-matrix products against dense ``torch.func``/autograd references."""

from __future__ import annotations

import pytest
import torch
from scipy.sparse import identity
from scipy.sparse.linalg import LinearOperator, aslinearoperator, cg, eigsh
from torch import nn

from bayescurv import engine
from bayescurv.engine import reference
from tests.cases import (
    CASE_IDS,
    CASES,
    MODELS,
    Problem,
    make_loader_problem,
    make_problem,
)
from tests.conftest import assert_close

PRODUCTS = {
    "ggn": (engine.ggn_vector_product, reference.ggn),
    "hessian": (engine.hessian_vector_product, reference.param_hessian),
    "ef": (engine.empirical_fisher_vector_product, reference.empirical_fisher),
}
OPERATORS = {
    "ggn": engine.GGNOperator,
    "hessian": engine.HessianOperator,
    "ef": engine.EFOperator,
}
BLOCK = 3  # vectors per block

# Monte Carlo GGN products: relative error of G~ V against G V for a block V
MC_LOOSE = (20_000, 0.05)  # (draws, tolerance): fast; errors are ~0.01
MC_TIGHT = (2_000_000, 0.01)


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _vectors(model: nn.Module, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(k, _num_params(model), generator=gen, dtype=torch.float64)


@pytest.fixture(scope="module")
def dense(problem: Problem) -> dict[str, torch.Tensor]:
    """The dense GGN, Hessian and empirical Fisher of one problem."""
    args = (problem.model, problem.loss_func, problem.inputs, problem.targets)
    return {name: ref(*args) for name, (_, ref) in PRODUCTS.items()}


@pytest.mark.parametrize("kind", list(PRODUCTS))
def test_single_vector(problem: Problem, dense: dict, kind: str):
    product, _ = PRODUCTS[kind]
    v = _vectors(problem.model, 1)[0]
    result = product(
        problem.model, problem.loss_func, problem.inputs, problem.targets, v
    )
    assert result.shape == v.shape
    assert_close(result, dense[kind] @ v, f"{kind} @ v")


@pytest.mark.parametrize("kind", list(PRODUCTS))
def test_block(problem: Problem, dense: dict, kind: str):
    product, _ = PRODUCTS[kind]
    vs = _vectors(problem.model, BLOCK)
    result = product(
        problem.model, problem.loss_func, problem.inputs, problem.targets, vs
    )
    assert_close(result, vs @ dense[kind].T, f"{kind} @ block")


def test_layouts_agree():
    """dict, list and flat layouts (single and block) give the same numbers."""
    prob = make_problem(MODELS[1], "ce", "mean")
    model = prob.model
    args = (model, prob.loss_func, prob.inputs, prob.targets)
    vs = _vectors(model, BLOCK)
    split = reference.split_vector(model, vs)
    flat = engine.ggn_vector_product(*args, vs)
    as_dict = engine.ggn_vector_product(*args, split)
    as_list = engine.ggn_vector_product(*args, list(split.values()))
    single = engine.ggn_vector_product(*args, {k: v[1] for k, v in split.items()})
    assert list(as_dict) == [n for n, _ in model.named_parameters()]
    for i, (name, value) in enumerate(reference.split_vector(model, flat).items()):
        assert torch.equal(as_dict[name], value)
        assert torch.equal(as_list[i], value)
        assert_close(single[name], value[1], f"single vector {name}")


@pytest.mark.parametrize(("model_case", "loss", "reduction"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kind", list(PRODUCTS))
def test_operator_over_uneven_batches(model_case, loss, reduction, kind):
    """The operator is the curvature of the loss of the whole data set."""
    lp = make_loader_problem(model_case, loss, reduction)
    op = OPERATORS[kind](lp.model, lp.loss_func, lp.batches)
    expected = PRODUCTS[kind][1](lp.model, lp.loss_func, lp.inputs, lp.targets)
    vs = _vectors(lp.model, 2)
    assert op.shape == expected.shape
    assert_close(op @ vs, vs @ expected.T, f"{kind} operator @ block")


@pytest.mark.parametrize("kind", list(PRODUCTS))
def test_operator_mean_with_class_weights_and_ignored_targets(kind):
    lp = make_loader_problem(MODELS[0], "ce", "mean")
    targets = lp.targets.clone()
    targets[[0, 6]] = -100  # ignored, in different batches
    loss = nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0]).double())
    batches = list(
        zip(lp.inputs.split([5, 4, 2, 1]), targets.split([5, 4, 2, 1]), strict=True)
    )
    op = OPERATORS[kind](lp.model, loss, batches)
    expected = PRODUCTS[kind][1](lp.model, loss, lp.inputs, targets)
    assert_close(op.to_dense(chunk_size=7), expected, f"{kind} dense")


def test_operator_scipy_view():
    lp = make_loader_problem(MODELS[0], "mse", "mean")
    op = engine.GGNOperator(lp.model, lp.loss_func, lp.batches)
    expected = reference.ggn(lp.model, lp.loss_func, lp.inputs, lp.targets)
    linop = op.to_scipy()
    evals = eigsh(linop, k=3, which="LA", return_eigenvectors=False)
    top = torch.linalg.eigvalsh(expected)[-3:]
    assert_close(torch.as_tensor(sorted(evals)), top, "top eigenvalues")
    rhs = torch.ones(op.shape[0], dtype=torch.float64)
    damped = expected + torch.eye(op.shape[0], dtype=torch.float64)
    # solve (G + I) x = 1 with CG through the operator
    shifted = linop + _identity(op.shape[0])
    x, info = cg(shifted, rhs.numpy(), rtol=1e-12, maxiter=500)
    assert info == 0
    assert_close(torch.as_tensor(x), torch.linalg.solve(damped, rhs), "cg solution")


def _identity(size: int) -> LinearOperator:
    return aslinearoperator(identity(size))


def _mc_error(product_mc, exact: torch.Tensor) -> float:
    return ((product_mc - exact).norm() / exact.norm()).item()


@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
@pytest.mark.parametrize(
    "model_case", [MODELS[0], MODELS[2], MODELS[-1]], ids=lambda m: m.name
)
def test_mc_ggn_converges_loose(model_case, loss):
    p = make_problem(model_case, loss, "mean")
    args = (p.model, p.loss_func, p.inputs, p.targets)
    vs = _vectors(p.model, BLOCK)
    draws, tol = MC_LOOSE
    gen = torch.Generator().manual_seed(2)
    mc = engine.ggn_vector_product(*args, vs, mc_samples=draws, generator=gen)
    assert _mc_error(mc, engine.ggn_vector_product(*args, vs)) < tol


@pytest.mark.montecarlo
@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
@pytest.mark.parametrize("model_case", MODELS, ids=lambda m: m.name)
def test_mc_ggn_converges_tight(model_case, loss):
    p = make_problem(model_case, loss, "sum")
    args = (p.model, p.loss_func, p.inputs, p.targets)
    vs = _vectors(p.model, BLOCK)
    draws, tol = MC_TIGHT
    gen = torch.Generator().manual_seed(3)
    mc = engine.ggn_vector_product(*args, vs, mc_samples=draws, generator=gen)
    assert _mc_error(mc, engine.ggn_vector_product(*args, vs)) < tol


def test_mc_ggn_is_reproducible_with_a_generator():
    p = make_problem(MODELS[0], "ce", "mean")
    args = (p.model, p.loss_func, p.inputs, p.targets)
    v = _vectors(p.model, 1)[0]

    def draw(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return engine.ggn_vector_product(*args, v, mc_samples=2, generator=gen)

    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))


def test_mc_ggn_operator_is_one_fixed_psd_matrix():
    lp = make_loader_problem(MODELS[0], "ce", "mean")
    gen = torch.Generator().manual_seed(4)
    op = engine.GGNOperator(
        lp.model, lp.loss_func, lp.batches, mc_samples=1, generator=gen
    )
    dense = op.to_dense(chunk_size=10)  # several passes see the same draws
    assert_close(dense, dense.T, "symmetry")
    assert torch.linalg.eigvalsh(dense).min() > -1e-12
    vs = _vectors(lp.model, 2)
    assert_close(op @ vs, vs @ dense, "products match the dense matrix")
    again = engine.GGNOperator(
        lp.model,
        lp.loss_func,
        lp.batches,
        mc_samples=1,
        generator=torch.Generator().manual_seed(4),
    )
    assert_close(again.to_dense(), dense, "same seed, same matrix")
    # rank <= one sampled column per sample (12 samples)
    assert torch.linalg.matrix_rank(dense) <= 12
    exact = reference.ggn(lp.model, lp.loss_func, lp.inputs, lp.targets)
    assert not torch.allclose(dense, exact)


def test_mc_ggn_operator_converges():
    lp = make_loader_problem(MODELS[0], "bce", "sum")
    op = engine.GGNOperator(
        lp.model,
        lp.loss_func,
        lp.batches,
        mc_samples=MC_LOOSE[0],
        generator=torch.Generator().manual_seed(5),
    )
    exact = reference.ggn(lp.model, lp.loss_func, lp.inputs, lp.targets)
    vs = _vectors(lp.model, BLOCK)
    assert _mc_error(op @ vs, vs @ exact) < MC_LOOSE[1]


# ---------------------------------------------------------------- error paths


@pytest.fixture
def small() -> Problem:
    return make_problem(MODELS[0], "ce", "mean")


def _ggn(p: Problem, vector, **kwargs):
    return engine.ggn_vector_product(
        p.model, p.loss_func, p.inputs, p.targets, vector, **kwargs
    )


def _named(p: Problem) -> dict[str, torch.Tensor]:
    return {n: torch.zeros_like(q) for n, q in p.model.named_parameters()}


def test_wrong_shape_names_the_parameter(small):
    vec = _named(small)
    vec["2.weight"] = torch.zeros(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"vector\['2.weight'\] has shape \(4, 3\)"):
        _ggn(small, vec)


def test_missing_and_unknown_keys(small):
    vec = _named(small)
    del vec["0.bias"]
    vec["bogus"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing \['0.bias'\].*unknown.*\['bogus'\]"):
        _ggn(small, vec)


def test_frozen_parameter_is_not_part_of_the_vector(small):
    small.model[0].bias.requires_grad_(False)
    vec = _named(small)
    with pytest.raises(ValueError, match=r"unknown or frozen \['0.bias'\]"):
        _ggn(small, vec)
    del vec["0.bias"]
    assert "0.bias" not in _ggn(small, vec)


def test_list_of_wrong_length(small):
    with pytest.raises(ValueError, match="vector has 3 tensors; the model has 4"):
        _ggn(small, list(_named(small).values())[:3])


def test_flat_vector_of_wrong_size(small):
    with pytest.raises(ValueError, match=r"expected \[P\] or \[K, P\] with P = 39"):
        _ggn(small, torch.zeros(38, dtype=torch.float64))


def test_mixed_block_sizes(small):
    vec = {n: v.expand(2, *v.shape) for n, v in _named(small).items()}
    vec["0.bias"] = torch.zeros(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="mixes single vectors and blocks"):
        _ggn(small, vec)


def test_integer_vector_and_wrong_type(small):
    with pytest.raises(TypeError, match="must be floating-point"):
        _ggn(small, torch.zeros(39, dtype=torch.long))
    with pytest.raises(TypeError, match="must be a dict name -> tensor"):
        _ggn(small, 3.0)


def test_bad_mc_arguments(small):
    v = torch.zeros(39, dtype=torch.float64)
    with pytest.raises(ValueError, match="mc_samples must be a positive integer"):
        _ggn(small, v, mc_samples=0)
    with pytest.raises(ValueError, match="generator is only used with mc_samples"):
        _ggn(small, v, generator=torch.Generator())


def test_empirical_fisher_needs_independent_samples():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    with pytest.raises(ValueError, match="BatchNorm1d at '1' is in train mode"):
        engine.empirical_fisher_vector_product(
            model, nn.CrossEntropyLoss(), x, y, torch.zeros(34)
        )


def test_unsupported_loss_and_target_mismatch(small):
    v = torch.zeros(39, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="Loss L1Loss is not supported"):
        engine.hessian_vector_product(
            small.model, nn.L1Loss(), small.inputs, small.targets, v
        )
    with pytest.raises(ValueError, match="class-index target shape"):
        engine.hessian_vector_product(
            small.model, small.loss_func, small.inputs, small.targets[:2], v
        )


def test_operator_data_errors(small):
    batches = [(small.inputs, small.targets)]
    with pytest.raises(ValueError, match="data yielded no batches"):
        engine.GGNOperator(small.model, small.loss_func, []) @ torch.zeros(39)
    with pytest.raises(TypeError, match="must be re-iterable"):
        engine.GGNOperator(small.model, small.loss_func, iter(batches))
    with pytest.raises(
        ValueError, match=r"\(inputs, targets\) pair, got tuple of length 3"
    ):
        engine.HessianOperator(
            small.model, small.loss_func, [(*batches[0], None)]
        ) @ torch.zeros(39)
    with pytest.raises(ValueError, match="reduction='none'"):
        engine.EFOperator(small.model, nn.MSELoss(reduction="none"), batches)


def test_operator_mean_of_fully_ignored_data(small):
    targets = torch.full_like(small.targets, -100)
    op = engine.GGNOperator(small.model, small.loss_func, [(small.inputs, targets)])
    with pytest.raises(ValueError, match="mean normalizer of the data set is 0"):
        op @ torch.zeros(39, dtype=torch.float64)


def test_model_without_trainable_parameters(small):
    small.model.requires_grad_(False)
    with pytest.raises(ValueError, match="Sequential has no trainable parameters"):
        _ggn(small, torch.zeros(39))
