"""The empirical NTK from factored rows and as a gpytorch kernel, against J Σ Jᵀ."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bayescurv.engine import reference
from bayescurv.laplace.enums import Likelihood
from bayescurv.laplace.function_space import NTKKernel, encode_rows
from bayescurv.laplace.function_space.roots import output_hessian_root
from bayescurv.laplace.function_space.rows import JacobianRows, ntk, point_blocks
from bayescurv.laplace.likelihoods import LikelihoodModel
from bayescurv.laplace.sources import EngineSource, LastLayerSource, SourceOptions
from tests.conftest import assert_close

VARIANCES = torch.tensor([0.5, 2.0, 1.5, 0.25], dtype=torch.float64)


def conv_model() -> nn.Module:
    """A conv layer (explicit Jacobian rows) before linear ones (factored rows)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)
    ).double()


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def dense_kernel(model, x1, x2, variances) -> torch.Tensor:
    """J(x1) Σ0 J(x2)^T over all rows, sample-major."""
    sizes = [p.numel() for p in model.parameters()]
    diag = torch.repeat_interleave(variances, torch.tensor(sizes))
    j1 = reference.jacobian(model, x1).flatten(0, 1)
    j2 = reference.jacobian(model, x2).flatten(0, 1)
    return (j1 * diag) @ j2.T


def source(model, last_layer=False):
    like = LikelihoodModel(Likelihood.CLASSIFICATION)
    if last_layer:
        return LastLayerSource(model, like, SourceOptions(), str(len(model) - 1))
    return EngineSource(model, like, SourceOptions())


CASES = {
    "mlp": (mlp, (3,)),
    "conv": (conv_model, (1, 6)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rows_kernel_is_j_sigma_jt(case):
    make, shape = CASES[case]
    model = make()
    gen = torch.Generator().manual_seed(1)
    x1 = torch.randn(4, *shape, generator=gen, dtype=torch.float64)
    x2 = torch.randn(3, *shape, generator=gen, dtype=torch.float64)
    src = source(model)
    sizes = src.block_sizes
    (_, jac1), (_, jac2) = (
        next(src.jacobian_segments(x1)),
        next(src.jacobian_segments(x2)),
    )
    rows1, rows2 = (
        JacobianRows.all_rows(jac1, sizes),
        JacobianRows.all_rows(jac2, sizes),
    )
    expected = dense_kernel(model, x1, x2, VARIANCES)
    assert_close(ntk(rows1, rows2, VARIANCES), expected, "kernel")
    blocks = point_blocks(jac1, sizes, VARIANCES)
    own = dense_kernel(model, x1, x1, VARIANCES).reshape(4, 3, 4, 3)
    assert_close(blocks, torch.stack([own[n, :, n] for n in range(4)]), "blocks")


def test_independent_kernel_zeroes_other_outputs():
    model = mlp()
    x = torch.randn(4, 3, dtype=torch.float64)
    src = source(model)
    rows = JacobianRows.all_rows(next(src.jacobian_segments(x))[1], src.block_sizes)
    full = ntk(rows, rows, VARIANCES)
    same = rows.outputs[:, None] == rows.outputs[None, :]
    assert_close(ntk(rows, rows, VARIANCES, independent=True), full * same, "kernel")


def test_last_layer_kernel_is_features_kron_identity():
    model = mlp()
    x = torch.randn(4, 3, dtype=torch.float64)
    src = source(model, last_layer=True)
    rows = JacobianRows.all_rows(next(src.jacobian_segments(x))[1], src.block_sizes)
    variances = VARIANCES[:2]
    with torch.no_grad():
        phi = torch.tanh(model[0](x))
    expected = torch.kron(
        phi @ phi.T * variances[0] + variances[1], torch.eye(3).double()
    )
    assert_close(ntk(rows, rows, variances), expected, "kernel")


@pytest.mark.parametrize("case", list(CASES))
def test_gpytorch_kernel_on_encoded_rows(case):
    make, shape = CASES[case]
    model = make()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, *shape, generator=gen, dtype=torch.float64)
    src = source(model)
    kernel = NTKKernel(src, shape, src.block_sizes, VARIANCES)
    dense = dense_kernel(model, x, x, VARIANCES)
    # rows in any order, with repeated inputs: (x2, c1), (x0, c0), (x2, c2), (x0, c0)
    picks = torch.tensor([[2, 1], [0, 0], [2, 2], [0, 0]])
    rows = encode_rows(x[picks[:, 0]], picks[:, 1])
    flat = picks[:, 0] * 3 + picks[:, 1]
    assert_close(kernel(rows).to_dense(), dense[flat][:, flat], "kernel")
    assert_close(kernel(rows, diag=True), dense[flat, flat], "diagonal")
    everything = encode_rows(x, 3)
    assert_close(kernel(everything, rows).to_dense(), dense[:, flat], "cross")


@pytest.mark.parametrize("kind", ["classification", "regression", "binary"])
@pytest.mark.parametrize("independent", [False, True])
def test_output_hessian_roots(kind, independent):
    like = LikelihoodModel(Likelihood(kind))
    f = torch.randn(5, 3, dtype=torch.float64)
    root = output_hessian_root(like, f, independent)
    full = root if root.ndim == 3 else root.diag_embed()
    hessian = like.output_hessian(f)
    if independent:
        hessian = hessian.diagonal(dim1=-2, dim2=-1).diag_embed()
    assert_close(full @ full.mT, hessian, "R R^T")
