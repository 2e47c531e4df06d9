"""Bad input raises a clear error naming the problem."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bayescurv import engine
from bayescurv.engine import recording


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.lin(x) * self.scale


class Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.w


X, Y = torch.randn(4, 3), torch.randint(0, 2, (4,))


def _run(model, loss=None, x=X, y=Y, exts=None):
    loss = nn.CrossEntropyLoss() if loss is None else loss
    return engine.backprop(model, loss, x, y, exts or [engine.BatchGrad()])


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Forget which classes already got the generic-rule warning."""
    monkeypatch.setattr(recording, "_WARNED", set())


@pytest.mark.usefixtures("fresh_warnings")
def test_layer_without_rule_warns_naming_class_and_parameter():
    model = nn.Sequential(Custom(), nn.Linear(3, 2))
    with pytest.warns(
        UserWarning, match=r"Layer Custom at '0'.*\['w'\].*register_rule"
    ):
        res = _run(model)
    assert res["grad_batch"]["0.w"].shape == (4, 3)


@pytest.mark.usefixtures("fresh_warnings")
def test_parameter_on_the_model_itself_is_named():
    with pytest.warns(UserWarning, match=r"Layer Scaled \(the model.*\['scale'\]"):
        _run(Scaled())


class BatchCentered(nn.Module):
    """Subtracts the batch mean: samples interact, per-sample quantities undefined."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return (x - x.mean(0)) * self.w


def test_generic_rule_rejects_interacting_samples():
    model = nn.Sequential(BatchCentered(), nn.Linear(3, 2))
    with (
        pytest.warns(UserWarning, match="BatchCentered"),
        pytest.raises(
            ValueError, match=r"BatchCentered for its rule does not reproduce"
        ),
    ):
        _run(model)


def test_frozen_unsupported_layer_needs_no_rule():
    model = nn.Sequential(Custom(), nn.Linear(3, 2))
    model[0].w.requires_grad_(False)
    res = _run(model)
    assert set(res["grad_batch"]) == {"1.weight", "1.bias"}


@pytest.mark.parametrize("cls", [nn.BatchNorm1d])
def test_batchnorm_in_train_mode_raises(cls):
    model = nn.Sequential(nn.Linear(3, 4), cls(4), nn.Linear(4, 2))
    with pytest.raises(
        ValueError, match=r"BatchNorm1d.*couples the samples.*model\.eval"
    ):
        _run(model.train())


def test_batchnorm_without_running_stats_raises_in_eval():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        _run(model.eval(), y=torch.randint(0, 4, (4,)))


def test_unsupported_loss():
    with pytest.raises(NotImplementedError, match="Loss NLLLoss is not supported"):
        _run(nn.Linear(3, 2), loss=nn.NLLLoss())


def test_unsupported_reduction():
    with pytest.raises(ValueError, match=r"reduction='none'"):
        _run(nn.Linear(3, 2), loss=nn.CrossEntropyLoss(reduction="none"))


@pytest.mark.parametrize(
    ("loss", "target", "match"),
    [
        (
            nn.CrossEntropyLoss(),
            torch.randint(0, 2, (4, 1)),
            "class-index target shape",
        ),
        (
            nn.CrossEntropyLoss(),
            torch.ones(4, dtype=torch.bool),
            "integer class indices",
        ),
        (nn.CrossEntropyLoss(), torch.rand(4, 3), "probability target shape"),
        (nn.MSELoss(), torch.randn(4), r"target shape \(4,\) does not match"),
        (nn.MSELoss(), torch.ones(4, 2, dtype=torch.long), "floating-point target"),
        (nn.BCEWithLogitsLoss(), torch.randn(4, 1), "BCEWithLogitsLoss target shape"),
        (nn.BCEWithLogitsLoss(), torch.ones(4, 2, dtype=torch.long), "floating-point"),
    ],
)
def test_mismatched_targets(loss, target, match):
    with pytest.raises(ValueError, match=match):
        _run(nn.Linear(3, 2), loss=loss, y=target)


def test_nan_in_output_is_named():
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="model output contains NaN or inf"):
        _run(model)


def test_nan_in_inputs_and_targets():
    x = X.clone()
    x[0, 0] = float("inf")
    with pytest.raises(ValueError, match="inputs contains NaN or inf"):
        _run(nn.Linear(3, 2), x=x)
    y = torch.randn(4, 2)
    y[1, 1] = float("nan")
    with pytest.raises(ValueError, match="targets contains NaN or inf"):
        _run(nn.Linear(3, 2), loss=nn.MSELoss(), y=y)


def test_extension_class_instead_of_instance():
    with pytest.raises(TypeError, match="did you pass the class"):
        _run(nn.Linear(3, 2), exts=[engine.BatchGrad])


def test_duplicate_extension():
    with pytest.raises(ValueError, match="requested twice"):
        _run(nn.Linear(3, 2), exts=[engine.BatchGrad(), engine.BatchGrad()])


def test_no_trainable_parameters():
    model = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        _run(model)


def test_batch_not_leading():
    class Transposed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(x.T).T

    with pytest.raises(ValueError, match="batch on the leading axis"):
        _run(Transposed(), x=torch.randn(4, 4), y=torch.randint(0, 4, (2,)))


def test_embedding_scale_grad_by_freq_raises():
    model = nn.Sequential(nn.Embedding(5, 2, scale_grad_by_freq=True), nn.Flatten())
    with pytest.raises(ValueError, match="scale_grad_by_freq"):
        _run(model, x=torch.randint(0, 5, (4, 1)))


def test_unknown_savefield():
    res = _run(nn.Linear(3, 2))
    with pytest.raises(KeyError, match="No quantity 'diag_ggn_exact'"):
        res["diag_ggn_exact"]


def test_register_rule_refuses_silent_overwrite():
    with pytest.raises(ValueError, match="already registered"):
        engine.register_rule(nn.Linear, engine.rules.LinearRule())
    with pytest.raises(TypeError, match="LayerRule instance"):
        engine.register_rule(Custom, object())


# ------------------------------------------------------- generic rule: what raises
class WithChild(nn.Module):
    """Owns a parameter and runs a parameter-free child (dropout or batch norm)."""

    def __init__(self, child: nn.Module) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))
        self.child = child

    def forward(self, x):
        return self.child(x * self.w)


@pytest.mark.filterwarnings("ignore:Layer WithChild")
@pytest.mark.parametrize(
    ("child", "match"),
    [
        (nn.Dropout(0.5), r"WithChild contains Dropout in train mode.*model\.eval"),
        (
            nn.BatchNorm1d(3, affine=False),
            r"WithChild contains BatchNorm1d normalizing with batch statistics",
        ),
    ],
    ids=["dropout", "batchnorm"],
)
def test_generic_rule_rejects_random_or_coupled_children(child, match):
    model = nn.Sequential(WithChild(child), nn.Linear(3, 2)).train()
    with pytest.raises(ValueError, match=match):
        _run(model)


class Transposing(nn.Module):
    """Returns its output with the batch on the trailing axis."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(features))

    def forward(self, x):
        return (x * self.w).T


class Untranspose(nn.Module):
    def forward(self, x):
        return x.T


@pytest.mark.filterwarnings("ignore:Layer Transposing")
def test_generic_rule_output_batch_axis_differs():
    model = nn.Sequential(Transposing(3), Untranspose(), nn.Linear(3, 2))
    with pytest.raises(
        ValueError, match="Transposing at '0' produced an output of shape"
    ):
        _run(model)
    # as many features as samples: the sample-separability probe tells
    square = nn.Sequential(Transposing(4), Untranspose(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"Transposing at '0': row \d+ of its output"):
        _run(square, x=torch.randn(4, 4))


class ItemScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.w * float(x.abs().max())


@pytest.mark.filterwarnings("ignore:Layer ItemScale")
def test_generic_rule_names_layer_vmap_cannot_handle():
    with pytest.raises(
        RuntimeError, match=r"generic rule cannot evaluate ItemScale one sample"
    ):
        _run(nn.Sequential(ItemScale(), nn.Linear(3, 2)))


class UsesChildWeight(nn.Module):
    """Uses its child's weight without calling the child."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 2)

    def forward(self, x):
        return torch.nn.functional.linear(torch.tanh(x), self.proj.weight)


def test_parameters_used_without_calling_their_module():
    with pytest.raises(ValueError, match=r"\['weight'\] of Linear.*never called"):
        _run(UsesChildWeight())


class TwoBatchSizes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.w, self.w.expand(2, 3)


def test_tuple_outputs_with_different_batch_sizes():
    model = nn.Sequential(TwoBatchSizes())
    engine.register_rule(TwoBatchSizes, engine.GenericRule())
    with pytest.raises(
        ValueError, match=r"outputs of TwoBatchSizes disagree.*\[2, 4\]"
    ):
        _run(model)


class NoGrad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x):
        with torch.no_grad():
            return x * self.w


def test_layer_output_without_gradient():
    engine.register_rule(NoGrad, engine.GenericRule())
    model = nn.Sequential(nn.Linear(3, 3), NoGrad(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="NoGrad returned no tensor that depends"):
        _run(model)


# ------------------------------------------------- attention and recurrent layers
class SelfAttention(nn.Module):
    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 2, **kwargs)

    def forward(self, x):
        return self.mha(x, x, x)[0].flatten(1)[:, :2]


def test_attention_dropout_in_train_mode():
    model = SelfAttention(dropout=0.1, batch_first=True).train()
    with pytest.raises(ValueError, match=r"MultiheadAttention\(dropout=0.1\).*eval"):
        _run(model, x=torch.randn(4, 3, 4))


def test_attention_unbatched_query():
    with pytest.raises(ValueError, match="MultiheadAttention was called on an unbat"):
        _run(SelfAttention(), x=torch.randn(4, 4))


class Recurrent(nn.Module):
    def __init__(self, packed: bool = False, **kwargs) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 2, batch_first=True, **kwargs)
        self.packed = packed

    def forward(self, x):
        if self.packed:
            lengths = torch.full((x.shape[0],), x.shape[1])
            x = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True)
        return self.rnn(x)[1][-1]


@pytest.mark.parametrize(
    ("model", "x", "match"),
    [
        (
            Recurrent(num_layers=2, dropout=0.2),
            torch.randn(4, 5, 3),
            r"GRU\(dropout=0.2\) in train mode",
        ),
        (Recurrent(packed=True), torch.randn(4, 5, 3), "packed sequences"),
        (Recurrent(), torch.randn(5, 3), "GRU was called on an unbatched input"),
    ],
    ids=["dropout", "packed", "unbatched"],
)
def test_recurrent_errors(model, x, match):
    with pytest.raises(ValueError, match=match):
        _run(model.train(), x=x)
