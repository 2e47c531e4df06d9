r"""Property-based tests of the Laplace API: a dense float64 match or a clear error.

Hypothesis draws small MLPs (depth, widths, bias, activation), the likelihood, the
model's dtype, the data size and how a loader cuts it into batches (a list of pairs,
a ``DataLoader`` or dict batches, with empty batches and class targets of -100 mixed
in), the subset, the structure and the prior precision. A fit must then

* give the posterior precision of a dense ``torch.func`` GGN of a float64 copy of
  the model on the data without the skipped samples (``full``: the matrix,
  ``diag``: its diagonal);
* give the GLM variance :math:`J \Lambda^{-1} J^\top` with the reference Jacobian;
* not depend on the batching (every structure, ``kron`` included);
* or raise a ``ValueError``/``TypeError`` when the draw holds a NaN input.

The default run draws a bounded, derandomized set of examples; the ``slow`` marker
runs many more.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from bayescurv import Laplace
from bayescurv.engine import reference
from tests.conftest import PROPERTY_SETTINGS
from tests.laplace.conftest import positions, unit_loss

ACTIVATIONS = [nn.Tanh, nn.Sigmoid, nn.ELU]
TOLERANCES = {torch.float64: (1e-7, 1e-9), torch.float32: (2e-3, 2e-4)}


@dataclass
class Case:
    """One drawn problem and how it is fed to ``fit``."""

    likelihood: str
    model: nn.Module
    x: Tensor
    y: Tensor
    keep: Tensor  # samples that count (targets other than -100)
    cuts: list[int]  # batch sizes (0: an empty batch)
    loader: str
    subset: str
    structure: str
    prior: float
    nan: bool

    def batches(self) -> object:
        x = self.x.clone()
        if self.nan:
            x[-1, 0] = float("nan")
        if self.loader == "dataloader":
            return DataLoader(TensorDataset(x, self.y), batch_size=self.cuts[0])
        out, start = [], 0
        for size in self.cuts:
            xb, yb = x[start : start + size], self.y[start : start + size]
            out.append(
                {"input_ids": xb, "labels": yb} if self.loader == "dict" else (xb, yb)
            )
            start += size
        return out


class DictInput(nn.Module):
    """Takes the dict batch whole (as laplace-torch passes it)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> Tensor:
        return self.model(batch["input_ids"])


@st.composite
def cases(draw: st.DrawFn) -> Case:
    likelihood = draw(st.sampled_from(["classification", "regression", "binary"]))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    d_in = draw(st.integers(1, 4))
    widths = draw(st.lists(st.integers(1, 5), min_size=0, max_size=2))
    outputs = draw(st.integers(2 if likelihood == "classification" else 1, 3))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    layers, width = [], d_in
    for hidden in widths:
        layers += [nn.Linear(width, hidden), draw(st.sampled_from(ACTIVATIONS))()]
        width = hidden
    layers.append(nn.Linear(width, outputs, bias=draw(st.booleans())))
    model = nn.Sequential(*layers).to(dtype).eval()
    n = draw(st.integers(1, 9))
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, d_in, generator=gen, dtype=dtype)
    if likelihood == "classification":
        y = torch.randint(0, outputs, (n,), generator=gen)
        ignored = draw(st.lists(st.integers(0, n - 1), max_size=2))
        y[ignored] = -100
    elif likelihood == "binary":
        y = torch.randint(0, 2, (n, outputs), generator=gen).to(dtype)
    else:
        y = torch.randn(n, outputs, generator=gen, dtype=dtype)
    loader = draw(st.sampled_from(["list", "dataloader", "dict"]))
    if loader == "dataloader":
        cuts = [draw(st.integers(1, n))]
    else:
        cuts = draw(st.lists(st.integers(0, n), min_size=1, max_size=4))
        cuts = _partition(cuts, n)
    return Case(
        likelihood,
        DictInput(model) if loader == "dict" else model,
        x,
        y,
        y != -100 if likelihood == "classification" else torch.ones(n, dtype=bool),
        cuts,
        loader,
        draw(st.sampled_from(["all", "last_layer"])),
        draw(st.sampled_from(["full", "diag", "kron"])),
        draw(st.sampled_from([1e-2, 1.0, 30.0])),
        draw(st.booleans()) and draw(st.booleans()),  # NaN in a quarter of the draws
    )


def _partition(sizes: list[int], n: int) -> list[int]:
    """Batch sizes summing to ``n`` (zeros kept as empty batches)."""
    out, left = [], n
    for size in sizes:
        take = min(size, left)
        out.append(take)
        left -= take
    if left:
        out.append(left)
    return out


def _inner(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, DictInput) else model


def _reference_precision(case: Case) -> Tensor:
    """Dense GGN + prior of the subset, float64, on the samples that count."""
    model = copy.deepcopy(_inner(case.model)).double()
    x, y = case.x[case.keep].double(), case.y[case.keep]
    y = y.double() if y.is_floating_point() else y
    loss, factor = unit_loss(case.likelihood)
    ggn = factor * reference.ggn(model, loss, x, y)
    if case.subset == "last_layer":
        last = str(len(model) - 1)
        index = positions(model, [f"{last}.weight", f"{last}.bias"])
        ggn = ggn[index][:, index]
    return ggn + case.prior * torch.eye(len(ggn), dtype=ggn.dtype)


def _reference_variance(case: Case, precision: Tensor) -> Tensor:
    r""":math:`J \Lambda^{-1} J^\top` per sample with the reference Jacobian."""
    model = copy.deepcopy(_inner(case.model)).double()
    jac = reference.jacobian(model, case.x.double())  # [N, C, P_all]
    if case.subset == "last_layer":
        last = str(len(model) - 1)
        jac = jac[..., positions(model, [f"{last}.weight", f"{last}.bias"])]
    return jac @ torch.linalg.solve(precision, jac.mT)


def _fit(case: Case, batches: object) -> Laplace:
    la = Laplace(
        case.model,
        case.likelihood,
        case.subset,
        case.structure,
        prior_precision=case.prior,
    )
    la.fit(batches)
    return la


def _close(actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str) -> None:
    rtol, atol = TOLERANCES[dtype]
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.double(),
        expected.double(),
        rtol=rtol,
        atol=atol * max(scale, 1.0),
        msg=lambda m: f"{what}: {m}",
    )


def _check(case: Case) -> None:
    dtype = case.x.dtype
    if case.nan:
        with pytest.raises(ValueError, match=r"contains NaN or inf"):
            _fit(case, case.batches())
        return
    if not bool(case.keep.any()):
        with pytest.raises(ValueError, match=r"no batches with samples"):
            _fit(case, case.batches())
        return
    la = _fit(case, case.batches())
    assert la.n_data == int(case.keep.sum())
    precision = _reference_precision(case)
    if case.structure == "full":
        _close(la.posterior_precision, precision, dtype, "full precision")
    elif case.structure == "diag":
        _close(la.posterior_precision, precision.diagonal(), dtype, "diag precision")
    whole = [(case.x[case.keep], case.y[case.keep])]
    if case.loader == "dict":
        whole = [{"input_ids": x, "labels": y} for x, y in whole]
    one_batch = _fit(case, whole)
    _close(la.posterior_variance, one_batch.posterior_variance, dtype, "batching")
    _close(
        la.log_marginal_likelihood(),
        one_batch.log_marginal_likelihood(),
        dtype,
        "batching: evidence",
    )
    if case.structure == "full":
        x = {"input_ids": case.x} if case.loader == "dict" else case.x
        variance = la.glm_moments(x)[1]
        _close(variance, _reference_variance(case, precision), dtype, "GLM variance")


FAST = settings(PROPERTY_SETTINGS, max_examples=30)


@FAST
@given(case=cases())
def test_random_posteriors_match_the_dense_reference_or_raise(case):
    _check(case)


@pytest.mark.slow
@settings(FAST, max_examples=300)
@given(case=cases())
def test_random_posteriors_many_examples(case):
    _check(case)
