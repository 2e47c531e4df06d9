"""DiagHessian and BatchDiagHessian against reverse-over-reverse dense references."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from bayescurv import engine
from bayescurv.engine import reference
from bayescurv.engine.extensions import Reduction
from bayescurv.engine.hessian import DiagAccumulator
from bayescurv.engine.hessian.chain import as_chain
from bayescurv.engine.hessian.graph import graph_diag_hessian
from bayescurv.engine.recording import find_layers, record_calls
from tests.cases import MODELS, ModelCase, Problem, make_problem
from tests.conftest import assert_close

HESSIAN = [engine.DiagHessian(), engine.BatchDiagHessian()]
CHAINS = {"mlp", "cnn", "conv3d_bn"}  # case-table models that are nn.Sequential chains


def _run(p: Problem, extensions=None, **kwargs) -> engine.BackpropResult:
    p.model.zero_grad()
    return engine.backprop(
        p.model, p.loss_func, p.inputs, p.targets, extensions or HESSIAN, **kwargs
    )


def _check_against_reference(p: Problem, res: engine.BackpropResult) -> None:
    args = (p.model, p.loss_func, p.inputs, p.targets)
    diag = reference.split_vector(
        p.model, torch.diagonal(reference.param_hessian(*args))
    )
    per_sample = reference.per_sample_hessian_diagonals(*args)
    for name, expected in diag.items():
        assert_close(res["diag_h"][name], expected, f"diag_h {name}")
        assert_close(
            res["diag_h_batch"][name], per_sample[name], f"diag_h_batch {name}"
        )


def test_hessian_diagonals(problem: Problem):
    _check_against_reference(problem, _run(problem))


@pytest.mark.parametrize("model_case", MODELS, ids=lambda m: m.name)
def test_chain_detection(model_case):
    """Both code paths are exercised by the case table."""
    p = make_problem(model_case, "ce", "sum")
    layers = find_layers(p.model)
    with record_calls(layers, safe=True) as records:
        p.model(p.inputs)
    assert (as_chain(p.model, records) is not None) == (model_case.name in CHAINS)


@pytest.mark.parametrize(
    "model_case", [m for m in MODELS if m.name in CHAINS], ids=lambda m: m.name
)
def test_chain_equals_graph_path(model_case):
    p = make_problem(model_case, "bce", "mean")
    res = _run(p)
    layers = find_layers(p.model)
    acc = DiagAccumulator({Reduction.SUM_SQUARED, Reduction.BATCH_SQUARED}, 2**30)
    graph_diag_hessian(p.model, layers, (p.inputs,), p.loss_func, p.targets, acc)
    names = {param: name for name, param in p.model.named_parameters()}
    for param, value in acc.values[Reduction.SUM_SQUARED].items():
        assert_close(res["diag_h"][names[param]], value, names[param])
    for param, value in acc.values[Reduction.BATCH_SQUARED].items():
        assert_close(res["diag_h_batch"][names[param]], value, names[param])


def _smooth_chain() -> nn.Module:
    """Every kind of chain module, several smooth non-linearities in a row."""
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1),
        nn.ELU(),
        nn.AvgPool1d(2),
        nn.Softplus(beta=2.0),
        nn.Flatten(),
        nn.Linear(3 * 4, 6),
        nn.Tanh(),
        nn.Dropout(0.5),  # eval mode: the identity
        nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.SiLU()),
        nn.Linear(5, 4, bias=False),
        nn.Sigmoid(),
        nn.Mish(),
        nn.Linear(4, 3),
        nn.LeakyReLU(0.1),
        nn.Linear(3, 3),
    )


@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_smooth_chain(loss):
    case = ModelCase("smooth", _smooth_chain, MODELS[6].make_input)
    p = make_problem(case, loss, "mean")
    assert as_chain(p.model, _records(p)) is not None
    _check_against_reference(p, _run(p))


def _records(p: Problem):
    with record_calls(find_layers(p.model), safe=True) as records:
        p.model(p.inputs)
    return records


@pytest.mark.parametrize(
    ("model_case", "budget"),
    [(MODELS[0], 64), (MODELS[2], 800), (MODELS[5], 800)],
    ids=["chain", "graph", "shared"],
)
def test_chunking_does_not_change_results(model_case, budget):
    """Budgets that force one column (or parameter entry) per chunk."""
    p = make_problem(model_case, "ce", "sum")
    full = _run(p)
    chunked = _run(p, memory_budget=budget)
    for field in ("diag_h", "diag_h_batch"):
        for name, value in full[field].items():
            assert_close(chunked[field][name], value, f"{field} {name}")


def test_together_with_other_extensions():
    p = make_problem(MODELS[2], "ce", "mean")
    res = _run(p, [engine.BatchGrad(), *HESSIAN, engine.DiagGGNExact()])
    alone = _run(p, [engine.BatchGrad(), engine.DiagGGNExact()])
    _check_against_reference(p, res)
    for field in ("grad_batch", "diag_ggn_exact"):
        for name, value in alone[field].items():
            assert torch.equal(res[field][name], value)


def test_relu_network_hessian_is_its_ggn():
    """Piecewise-linear networks have no residual terms: diag_h == diag_ggn_exact."""
    p = make_problem(MODELS[1], "ce", "mean")
    res = _run(p, [engine.DiagHessian(), engine.DiagGGNExact()])
    for name, value in res["diag_ggn_exact"].items():
        assert_close(res["diag_h"][name], value, name)
    # but a sigmoid network's Hessian diagonal is not its GGN diagonal
    q = make_problem(MODELS[7], "ce", "mean")
    res = _run(q, [engine.DiagHessian(), engine.DiagGGNExact()])
    assert not torch.allclose(
        res["diag_h"]["0.weight"], res["diag_ggn_exact"]["0.weight"]
    )


class TiedEmbedding(nn.Module):
    """Embedding weight reused by the output projection (one Parameter, two modules)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 4, padding_idx=0)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(self.embed(tokens)))).permute(0, 2, 1)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_tied_embedding_is_exact(reduction):
    torch.manual_seed(0)
    model = TiedEmbedding().double()
    tokens = torch.randint(0, 6, (3, 4))
    targets = torch.randint(0, 6, (3, 4))
    p = Problem(model, nn.CrossEntropyLoss(reduction=reduction), tokens, targets)
    _check_against_reference(p, _run(p))


class Exp(nn.Module):
    """``x * exp(w)``: not linear in its parameter."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-0.5, 0.5, size))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.w.exp()


class ExpRule(engine.LayerRule):
    def per_sample(self, module, inputs, grad_output):
        return {"w": grad_output * (inputs[0] * module.w.exp())}


def test_layer_not_linear_in_its_parameters():
    engine.register_rule(Exp, ExpRule(), overwrite=True)
    case = ModelCase(
        "exp",
        lambda: nn.Sequential(nn.Linear(5, 4), Exp(4), nn.Tanh(), nn.Linear(4, 3)),
        MODELS[0].make_input,
    )
    p = make_problem(case, "mse", "sum")
    assert as_chain(p.model, _records(p)) is None  # Exp is no chain module
    _check_against_reference(p, _run(p))


def test_frozen_layer_inside_a_chain():
    p = make_problem(MODELS[1], "bce", "sum")
    p.model[2].requires_grad_(False)
    res = _run(p)
    assert "2.weight" not in res["diag_h"]
    _check_against_reference(p, res)


def test_dropout_in_train_mode_raises():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.2), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="Dropout at '1' is in train mode"):
        engine.backprop(
            model,
            nn.CrossEntropyLoss(),
            torch.randn(5, 3),
            torch.randint(0, 2, (5,)),
            [engine.DiagHessian()],
        )


def test_graph_path_memory_guard():
    p = make_problem(MODELS[2], "ce", "sum")  # residual MLP: the graph path
    with pytest.raises(
        ValueError, match=r"Hessians w.r.t. the output of Linear.*\[4, 5, 5\]"
    ):
        _run(p, memory_budget=100)


def test_piecewise_linear_chains_use_the_ggn_columns(monkeypatch):
    """NOTE [Piecewise-linear chains]: no chain walker, the dense Hessian's diagonal."""
    chain_module = __import__("bayescurv.engine.hessian", fromlist=["x"])

    def walker(*args):
        raise AssertionError("the chain walker ran")

    monkeypatch.setattr(chain_module, "chain_diag_hessian", walker)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(12, 4),
        nn.LeakyReLU(0.1),
        nn.Linear(4, 3),
    ).double()
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    p = Problem(model, nn.CrossEntropyLoss(), x, y)
    exts = [engine.DiagHessian(), engine.BatchDiagHessian()]
    _check_against_reference(p, engine.backprop(model, p.loss_func, x, y, exts))
