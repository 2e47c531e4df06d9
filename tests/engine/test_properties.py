"""Property-based tests: random small models never give a silently wrong answer.

Hypothesis draws models (Linear, Conv2d, LayerNorm, activations, residual blocks,
sequence inputs), batch sizes, dtypes, losses and reductions, and sometimes a mistake
that breaks per-sample structure (an op that mixes samples, a layer applied to a
transposed batch). Every extension must then either match the dense ``torch.func``
reference (of a float64 copy of the model) or raise one of the engine's own errors;
with a mistake and more than one sample it must raise.

The default run draws a bounded, derandomized set of examples; the ``slow`` marker
runs many more.
"""

from __future__ import annotations

import copy
import traceback
from dataclasses import dataclass

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from bayescurv import engine
from bayescurv.engine import reference
from bayescurv.engine.memory import MemoryBudgetError
from tests.conftest import PROPERTY_SETTINGS

ACTIVATIONS = [nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.ELU]
EXTENSIONS = [
    engine.BatchGrad(),
    engine.SumGradSquared(),
    engine.BatchDotGrad(),
    engine.DiagGGNExact(),
    engine.BatchDiagGGNExact(),
    engine.SqrtGGNExact(),
    engine.Jacobian(),
    engine.KFLR(),
]
OPTIONAL = engine.DiagHessian()  # refuses folded batch axes: may raise on its own
# the engine's own, deliberate errors (raised from bayescurv, with a message)
CLEAR_ERRORS = (ValueError, NotImplementedError, TypeError, MemoryBudgetError)


class MixSamples(nn.Module):
    """A mistake: subtracts the batch mean (samples interact)."""

    def forward(self, x: Tensor) -> Tensor:
        return x - x.mean(0, keepdim=True)


class Residual(nn.Module):
    def __init__(self, width: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.inner = nn.Linear(width, width)
        self.act = act()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.act(self.inner(x))


class TransposedLinear(nn.Module):
    """A mistake: a Linear applied with the batch on axis 1 (``[T, N, d]``)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x.transpose(0, 1)).transpose(0, 1)


class Folded(nn.Module):
    """Extra axis folded into the batch: ``[N, k, d]`` -> ``[N k, d]`` -> ``[N, k o]``.

    ``interleaved`` folds after a transpose (row ``j N + n`` of sample ``n``): a
    mistake when ``N > 1`` and ``k > 1``.
    """

    def __init__(self, inner: nn.Module, interleaved: bool) -> None:
        super().__init__()
        self.inner = inner
        self.interleaved = interleaved

    def forward(self, x: Tensor) -> Tensor:
        n, k = x.shape[:2]
        if self.interleaved:
            h = self.inner(x.transpose(0, 1).reshape(n * k, -1))
            return h.reshape(k, n, -1).transpose(0, 1).reshape(n, -1)
        return self.inner(x.reshape(n * k, -1)).reshape(n, -1)


@dataclass
class Case:
    model: nn.Module
    inputs: Tensor
    loss: nn.Module
    targets: Tensor
    mistake: bool
    dtype: torch.dtype


@st.composite
def hidden_layers(draw, width: int, kind: str) -> tuple[list[nn.Module], bool]:
    """A few width-preserving blocks, maybe a mistake (they follow a first layer)."""
    layers: list[nn.Module] = []
    mistake = False
    for _ in range(draw(st.integers(1, 3))):
        block = draw(st.sampled_from(["linear", "act", "norm", "residual", "mistake"]))
        act = draw(st.sampled_from(ACTIVATIONS))
        if block == "linear":
            layers += [nn.Linear(width, width, bias=draw(st.booleans())), act()]
        elif block == "act":
            layers.append(act())
        elif block == "norm":
            layers.append(nn.LayerNorm(width))
        elif block == "residual":
            layers.append(Residual(width, act))
        else:  # after the model's first layer, which has parameters
            mistake = True
            transposed = kind == "sequence" and draw(st.booleans())
            layers.append(TransposedLinear(width) if transposed else MixSamples())
    return layers, mistake


@st.composite
def cases(draw) -> Case:
    kind = draw(st.sampled_from(["vector", "sequence", "image", "folded"]))
    n = draw(st.sampled_from([1, 2, 3, 5]))
    width, outputs = draw(st.integers(2, 4)), draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    if kind == "image":
        channels, kernel = draw(st.integers(1, 3)), draw(st.integers(1, 2))
        conv = nn.Conv2d(2, channels, kernel, padding=draw(st.integers(0, 1)))
        side = conv(torch.zeros(1, 2, 3, 3)).shape[-1]
        hidden, mistake = draw(hidden_layers(width, kind))
        act = draw(st.sampled_from(ACTIVATIONS))()
        squeeze = nn.Linear(channels * side * side, width)
        layers = [conv, act, nn.Flatten(), squeeze, *hidden]
        shape, features = (n, 2, 3, 3), width
    elif kind == "folded":
        positions = draw(st.integers(1, 3))
        hidden, mistake = draw(hidden_layers(width, kind))
        interleaved = draw(st.booleans())
        mistake = mistake or (interleaved and positions > 1)
        inner = nn.Sequential(nn.Linear(width, width), *hidden)
        layers = [Folded(inner, interleaved)]
        shape, features = (n, positions, width), width * positions
    else:
        positions = draw(st.sampled_from([n, 2])) if kind == "sequence" else 1
        hidden, mistake = draw(hidden_layers(width, kind))
        layers = [nn.Linear(width, width), *hidden]
        if kind == "sequence":
            layers.append(nn.Flatten())
        shape = (n, positions, width) if kind == "sequence" else (n, width)
        features = width * positions
    model = nn.Sequential(*layers, nn.Linear(features, outputs))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(shape, generator=gen, dtype=dtype)
    loss_name = draw(st.sampled_from(["mse", "ce", "bce"]))
    reduction = draw(st.sampled_from(["mean", "sum"]))
    if loss_name == "ce":
        loss = nn.CrossEntropyLoss(reduction=reduction)
        targets = torch.randint(0, outputs, (n,), generator=gen)
    elif loss_name == "bce":
        loss = nn.BCEWithLogitsLoss(reduction=reduction)
        targets = torch.rand(n, outputs, generator=gen, dtype=dtype)
    else:
        loss = nn.MSELoss(reduction=reduction)
        targets = torch.randn(n, outputs, generator=gen, dtype=dtype)
    return Case(model.to(dtype), inputs, loss, targets, mistake, dtype)


def _is_clear(error: BaseException) -> bool:
    """One of the engine's error types, raised by bayescurv itself, with a message."""
    frames = traceback.extract_tb(error.__traceback__)
    return (
        isinstance(error, CLEAR_ERRORS)
        and bool(str(error))
        and "bayescurv" in frames[-1].filename
    )


def _close(actual: Tensor, expected: Tensor, scale: float, what: str) -> None:
    """Named tolerances: float64 1e-7 relative; float32 1e-3 of ``scale``.

    ``scale`` is the quantity's largest entry over all parameters: float32 round-off
    of the forward pass is relative to the whole computation, not to each entry.
    """
    if actual.dtype == torch.float64:
        rtol, atol = 1e-7, 1e-9 * max(scale, 1.0)
    else:
        rtol, atol = 1e-3, 1e-3 * max(scale, 1e-6)
    torch.testing.assert_close(
        actual.double(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}"
    )


def _scale(tensors) -> float:
    return max((t.abs().max().item() for t in tensors if t.numel()), default=0.0)


def _run(case: Case):
    """The engine's results, or the error it raised."""
    model, x, loss, y = case.model, case.inputs, case.loss, case.targets
    kw = {"accumulate_grad": False}
    try:
        res = engine.backprop(model, loss, x, y, EXTENSIONS, **kw)
        dense = engine.ggn_matrix(model, loss, x, y)
    except Exception as error:  # the property is about every error
        return None, None, error
    try:
        hessian = engine.backprop(model, loss, x, y, [OPTIONAL], **kw)
        res.quantities.update(hessian.quantities)
    except Exception as error:  # a clear refusal of DiagHessian alone is fine
        if not _is_clear(error):
            return None, None, error
    return res, dense, None


def _check(case: Case) -> None:
    res, dense, error = _run(case)
    event("compared" if error is None else f"{type(error).__name__}: {error!s:.40}")
    if error is not None:
        assert _is_clear(error), f"unclear error: {error!r}"
        return
    assert not (case.mistake and case.inputs.shape[0] > 1), "mistake unnoticed"
    y = case.targets
    _compare(
        res,
        dense,
        copy.deepcopy(case.model).double(),
        case.loss,
        case.inputs.double(),
        y.double() if y.is_floating_point() else y,
    )


def _compare(res, dense, m64, loss, x, y) -> None:
    names = [n for n, p in m64.named_parameters() if p.requires_grad]
    grads = reference.per_sample_gradients(m64, loss, x, y)
    blocks = reference.per_sample_ggn(m64, loss, x, y)
    diag = reference.split_vector(m64, torch.diagonal(blocks, dim1=1, dim2=2))
    jac = reference.jacobian(m64, x)  # [N, C, P]
    flat_jac = torch.cat(
        [res["jacobian"][n].flatten(start_dim=2) for n in names], dim=-1
    ).movedim(0, 1)
    _close(flat_jac, jac, _scale([jac]), "jacobian")
    ggn = reference.ggn(m64, loss, x, y)
    _close(dense, ggn, _scale([ggn]), "ggn_matrix")
    flat = {n: g.flatten(1) for n, g in grads.items()}
    expected = {
        "grad_batch": grads,
        "sum_grad_squared": {n: g.square().sum(0) for n, g in grads.items()},
        "batch_dot": {n: f @ f.T for n, f in flat.items()},
        "diag_ggn_exact": {n: d.sum(0) for n, d in diag.items()},
        "diag_ggn_exact_batch": diag,
    }
    if "diag_h" in res:
        hess = torch.diagonal(reference.param_hessian(m64, loss, x, y))
        expected["diag_h"] = reference.split_vector(m64, hess)
    for field, values in expected.items():
        scale = _scale(values.values())
        for name in names:
            _close(res[field][name], values[name], scale, f"{field} {name}")
    for name in names:
        for factor in res["kflr"][name]:
            assert torch.isfinite(factor).all()
            if factor.dim() == 2:
                _close(factor, factor.mT.double(), _scale([factor]), f"kflr {name}")
    sqrt = res["sqrt_ggn_exact"]
    cols = next(iter(sqrt.values())).shape[0]
    root = torch.cat([sqrt[n].reshape(cols, x.shape[0], -1) for n in names], -1)
    gram = torch.einsum("cnp,cnq->npq", root, root)
    _close(gram, blocks, _scale([blocks]), "per-sample Gram of sqrt_ggn_exact")


FAST = PROPERTY_SETTINGS


@FAST
@given(case=cases())
def test_random_models_match_the_references_or_raise_clearly(case):
    _check(case)


@pytest.mark.slow
@settings(FAST, max_examples=200)  # derandomized too: CI runs it
@given(case=cases())
def test_random_models_many_examples(case):
    _check(case)
