"""Hand-written rules for more layers and the generic rule, against dense references.

Every layer configuration runs all exact extensions through
:func:`tests.engine.checks.check_exact_extensions` (first-order quantities, GGN
diagonals, per-sample GGN diagonals, the GGN square root) in float64.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn

from bayescurv import engine
from bayescurv.engine import recording, reference
from bayescurv.engine.rules import conv as conv_rule
from tests.cases import MODELS, make_problem
from tests.conftest import assert_close
from tests.engine.checks import EXACT, check_exact_extensions

N = 3
C = 3


def _rand(*shape: int) -> Callable[[torch.Generator], Tensor]:
    return lambda gen: torch.randn(*shape, generator=gen, dtype=torch.float64)


def _run(model: nn.Module, make_input: Callable[[torch.Generator], Tensor]) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = model.double().eval()
    x = make_input(gen)
    y = torch.randint(0, C, (N,), generator=gen)
    check_exact_extensions(model, nn.CrossEntropyLoss(), x, y)


def _headed(layer: nn.Module, numel: int) -> nn.Module:
    return nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.Linear(numel, C))


# ---------------------------------------------------------------- transposed conv
DECONV = {
    "1d-stride-padding-output_padding": (
        nn.ConvTranspose1d(2, 4, 3, stride=2, padding=1, output_padding=1),
        4 * 10,
        _rand(N, 2, 5),
    ),
    "2d-groups-dilation": (
        nn.ConvTranspose2d(
            4, 2, (2, 3), stride=(2, 1), padding=(0, 1), dilation=(1, 2), groups=2
        ),
        2 * 6 * 5,
        _rand(N, 4, 3, 3),
    ),
    "2d-output_padding-over-stride": (
        nn.ConvTranspose2d(1, 2, 3, dilation=2, output_padding=1),
        2 * 8 * 8,
        _rand(N, 1, 3, 3),
    ),
    "3d-no-bias": (
        nn.ConvTranspose3d(2, 2, 2, stride=2, bias=False),
        2 * 4 * 4 * 4,
        _rand(N, 2, 2, 2, 2),
    ),
}


@pytest.mark.parametrize("name", DECONV)
def test_conv_transpose(name):
    layer, numel, make_input = DECONV[name]
    _run(_headed(layer, numel), make_input)


class SizedDeconv(nn.Module):
    """Calls the transposed convolution with an explicit ``output_size``."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 2, 3, stride=2)
        self.head = nn.Linear(2 * 8 * 8, C)

    def forward(self, x):
        return self.head(torch.tanh(self.up(x, output_size=[8, 8])).flatten(1))


def test_conv_transpose_with_output_size():
    _run(SizedDeconv(), _rand(N, 2, 3, 3))


# ---------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize(
    ("layer", "make_input"),
    [
        (nn.RMSNorm([4]), _rand(N, 5, 4)),
        (nn.RMSNorm((2, 3), eps=1e-3), _rand(N, 2, 3)),
    ],
    ids=["last-dim-default-eps", "two-dims"],
)
def test_rms_norm(layer, make_input):
    numel = make_input(torch.Generator())[0].numel()
    _run(nn.Sequential(layer, nn.Flatten(), nn.Linear(numel, C)), make_input)


# ------------------------------------------------------------ multi-head attention
class Attend(nn.Module):
    """Attention on ``[N, T, 4]``; optionally uses the attention weights downstream.

    Keys/values come from a Linear of the input (``kdim``/``vdim`` sized), the
    key-padding mask from the input values (so that it is per sample).
    """

    def __init__(
        self, weights: str = "", cross: bool = False, masks: str = "", **kwargs
    ) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 2, **kwargs)
        self.batch_first = kwargs.get("batch_first", False)
        self.weights, self.cross, self.masks = weights, cross, masks
        extra = kwargs.get("add_bias_kv", False) + kwargs.get("add_zero_attn", False)
        keys = (7 if cross else 5) + extra
        self.to_k = nn.Linear(4, kwargs.get("kdim") or 4)
        self.to_v = nn.Linear(4, kwargs.get("vdim") or 4)
        self.head = nn.Linear(5 * 4, C)
        heads = 2 if weights == "per_head" else 1
        self.weights_head = nn.Linear(heads * 5 * keys, C)

    def forward(self, x):
        src = torch.cat([x, x[:, :2]], 1) if self.cross else x
        q, k, v = x, self.to_k(src), self.to_v(src)
        if not self.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        kwargs = {}
        if self.masks:
            kwargs = _masks(src, self.masks)
        out, weights = self.mha(
            q,
            k,
            v,
            need_weights=bool(self.weights),
            average_attn_weights=self.weights != "per_head",
            **kwargs,
        )
        if not self.batch_first:
            out = out.transpose(0, 1)
        result = self.head(out.flatten(1))
        return (
            result + self.weights_head(weights.flatten(1)) if self.weights else result
        )


def _masks(src: Tensor, kind: str) -> dict[str, Tensor]:
    """Key-padding mask from the input values (per sample) and a fixed attn mask."""
    padded = torch.zeros(src.shape[:2], dtype=torch.bool)
    padded[:, 1:4] = src[:, 1:4, 0] > 0.5  # keys 0 and 4 are never padded
    if kind == "bool":
        banned = torch.ones(5, src.shape[1], dtype=torch.bool).triu(2)
        return {"key_padding_mask": padded, "attn_mask": banned}
    gen = torch.Generator().manual_seed(0)
    bias = torch.randn(5, src.shape[1], generator=gen, dtype=src.dtype)
    return {"key_padding_mask": -3.0 * padded.to(src.dtype), "attn_mask": bias}


class CausalAttend(nn.Module):
    """Self-attention with a boolean 3-D causal mask ``[N * H, T, T]``."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(5 * 4, C)

    def forward(self, x):
        causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
        mask = causal.expand(x.shape[0] * 2, 5, 5)
        out, _ = self.mha(x, x, x, attn_mask=mask, need_weights=False)
        return self.head(out.flatten(1))


ATTENTION = {
    "batch_first": lambda: Attend(batch_first=True),
    "seq_first-weights": lambda: Attend(weights="mean"),
    "cross-kdim-vdim-per_head_weights": lambda: Attend(
        weights="per_head", cross=True, kdim=3, vdim=2, batch_first=True
    ),
    "float-masks": lambda: Attend(weights="mean", masks="float"),
    "bias_kv-zero_attn-no_bias-bool-masks": lambda: Attend(
        weights="mean", masks="bool", add_bias_kv=True, add_zero_attn=True, bias=False
    ),
    "causal-3d-bool-mask": CausalAttend,
}


@pytest.mark.parametrize("name", ATTENTION)
def test_multihead_attention(name):
    _run(ATTENTION[name](), _rand(N, 5, 4))


# -------------------------------------------------------------- recurrent layers
class Sequence(nn.Module):
    """A recurrent layer on ``[N, T, 3]`` classified from all of its outputs.

    With ``initial=True`` the initial states are computed from the input (so the
    columns also flow back through them into another layer).
    """

    def __init__(self, cls: type[nn.Module], initial: bool = False, **kwargs) -> None:
        super().__init__()
        self.rnn = cls(3, 4, **kwargs)
        self.batch_first = kwargs.get("batch_first", False)
        self.initial = initial
        self.layers = kwargs.get("num_layers", 1) * (
            2 if kwargs.get("bidirectional") else 1
        )
        self.size = kwargs.get("proj_size") or 4
        directions = 2 if kwargs.get("bidirectional") else 1
        states = self.layers * (self.size + (4 if cls is nn.LSTM else 0))
        self.head = nn.Linear(directions * self.size + states, C)
        self.h0 = nn.Linear(3, self.layers * self.size)
        self.c0 = nn.Linear(3, self.layers * 4)

    def _state(self, proj: nn.Module, x: Tensor, size: int) -> Tensor:
        state = torch.tanh(proj(x.mean(1))).reshape(-1, self.layers, size)
        return state.transpose(0, 1).contiguous()

    def forward(self, x):
        args = ()
        if self.initial:
            h0 = self._state(self.h0, x, self.size)
            lstm = isinstance(self.rnn, nn.LSTM)
            args = ((h0, self._state(self.c0, x, 4)),) if lstm else (h0,)
        out, state = self.rnn(x if self.batch_first else x.transpose(0, 1), *args)
        out = out if self.batch_first else out.transpose(0, 1)
        states = state if isinstance(state, tuple) else (state,)
        feats = [out[:, -1]] + [s.transpose(0, 1).flatten(1) for s in states]
        return self.head(torch.cat(feats, 1))


RECURRENT = {
    "lstm-2layers-batch_first": lambda: Sequence(
        nn.LSTM, num_layers=2, batch_first=True
    ),
    "lstm-proj-bidirectional-initial": lambda: Sequence(
        nn.LSTM, initial=True, proj_size=2, bidirectional=True, num_layers=2
    ),
    "gru-bidirectional": lambda: Sequence(nn.GRU, bidirectional=True),
    "gru-2layers-initial": lambda: Sequence(
        nn.GRU, initial=True, num_layers=2, batch_first=True
    ),
    "rnn-relu-no_bias-initial": lambda: Sequence(
        nn.RNN, initial=True, nonlinearity="relu", bias=False
    ),
    "rnn-tanh-bidirectional": lambda: Sequence(nn.RNN, bidirectional=True),
}


@pytest.mark.parametrize("name", RECURRENT)
def test_recurrent(name):
    _run(RECURRENT[name](), _rand(N, 5, 3))


# ----------------------------------------------------------- Monte Carlo columns
@pytest.mark.parametrize("case", MODELS[-4:-1], ids=lambda m: m.name)
def test_mc_diag_ggn_of_new_layers_is_unbiased(case):
    """The mean of many one-sample MC diagonals approaches the exact diagonal."""
    p = make_problem(case, "ce", "sum")
    args = (p.model, p.loss_func, p.inputs, p.targets)
    exact = engine.backprop(*args, [engine.DiagGGNExact()])["diag_ggn_exact"]
    gen = torch.Generator().manual_seed(2)
    mc = engine.backprop(*args, [engine.DiagGGNMC(mc_samples=1000)], generator=gen)
    diff = sum((mc["diag_ggn_mc"][k] - v).square().sum() for k, v in exact.items())
    norm = sum(v.square().sum() for v in exact.values())
    assert (diff / norm).sqrt() < 0.15


# ------------------------------------------------- generic rule vs. hand-written
HAND_WRITTEN = [
    nn.Linear,
    nn.Conv2d,
    nn.ConvTranspose2d,
    nn.LayerNorm,
    nn.RMSNorm,
    nn.GroupNorm,
    nn.BatchNorm2d,
    nn.Embedding,
]


@pytest.fixture
def use_generic() -> Iterator[Callable[[], None]]:
    """A switch to the generic rule for the hand-written layers, undone afterwards."""
    saved = {cls: engine.rules.get_rule(cls) for cls in HAND_WRITTEN}

    def switch() -> None:
        for cls in HAND_WRITTEN:
            engine.register_rule(cls, engine.GenericRule(), overwrite=True)

    yield switch
    for cls, rule in saved.items():
        engine.register_rule(cls, rule, overwrite=True)


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4, padding_idx=0)
        self.rms = nn.RMSNorm(4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, C)

    def forward(self, tokens):
        return self.head(self.norm(self.rms(self.embed(tokens)))).mean(1)


def _image_model() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.ConvTranspose2d(4, 2, 2, stride=2),
        nn.BatchNorm2d(2),
        nn.Flatten(),
        nn.Linear(2 * 8 * 8, C),
    )
    model[4].running_mean.copy_(torch.tensor([0.3, -0.2]))
    model[4].running_var.copy_(torch.tensor([0.7, 1.4]))
    return model


def _tokens(gen: torch.Generator) -> Tensor:
    tokens = torch.randint(0, 7, (N, 5), generator=gen)
    tokens[0, 0] = 0  # a padding token
    return tokens


GENERIC_CASES = {
    "image": (_image_model, _rand(N, 2, 4, 4)),
    "tokens": (Tokens, _tokens),
}


@pytest.mark.parametrize("name", GENERIC_CASES)
def test_generic_rule_equals_hand_written_rules(name, use_generic):
    make, make_input = GENERIC_CASES[name]
    torch.manual_seed(0)
    model = make().double().eval()
    gen = torch.Generator().manual_seed(1)
    x, y = make_input(gen), torch.randint(0, C, (N,), generator=gen)
    hand = engine.backprop(model, nn.CrossEntropyLoss(), x, y, EXACT)
    use_generic()
    assert isinstance(engine.rules.get_rule(nn.Linear), engine.GenericRule)
    generic = check_exact_extensions(model, nn.CrossEntropyLoss(), x, y)
    for field in hand.keys():
        for param, value in hand[field].items():
            assert_close(generic[field][param], value, f"{field} {param}")


# ------------------------------------------------------- generic rule on custom
@pytest.fixture
def fresh_warnings(monkeypatch):
    """Forget which classes already got the generic-rule warning."""
    monkeypatch.setattr(recording, "_WARNED", set())


class Gate(nn.Module):
    """A custom layer with two tensor inputs, a keyword mask and a tuple output."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(-1.0, 1.0, 12).reshape(3, 4))
        self.gain = nn.Parameter(torch.tensor([0.5, 1.5, -1.0]))

    def forward(self, x, z, mask=None):
        h = torch.tanh(x @ self.weight.T) * torch.sigmoid(z * self.gain)
        if mask is not None:
            h = h * mask
        return h, (h * self.gain).sum(-1, keepdim=True)


class GateModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate()
        self.head = nn.Linear(4, C)

    def forward(self, x):
        z = x[:, :3]
        mask = (x[:, 1:4] > -0.5).to(x.dtype)
        h, s = self.gate(x, z, mask=mask)
        return self.head(torch.cat([h, s], 1))


@pytest.mark.usefixtures("fresh_warnings")
def test_generic_fallback_warns_once_per_class():
    model = GateModel().double()
    x = torch.randn(N, 4, dtype=torch.float64)
    y = torch.randint(0, C, (N,))
    with pytest.warns(
        UserWarning,
        match=r"Layer Gate at 'gate'.*\['gain', 'weight'\].*no hand-written rule"
        r".*register_rule\(Gate, rule\) would be faster",
    ):
        engine.backprop(model, nn.CrossEntropyLoss(), x, y, [engine.BatchGrad()])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning for the same class
        check_exact_extensions(model, nn.CrossEntropyLoss(), x, y)


class Block(nn.Module):
    """Owns a parameter and has children with parameters of their own."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.5, -0.5, 2.0, 1.0]))
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return x + self.norm(torch.tanh(self.lin(x)) * self.scale) * self.scale


@pytest.mark.usefixtures("fresh_warnings")
def test_generic_rule_covers_own_parameters_children_are_recorded():
    model = nn.Sequential(nn.Linear(3, 4), Block(), nn.Linear(4, C)).double()
    x = torch.randn(N, 3, dtype=torch.float64)
    y = torch.randint(0, C, (N,))
    with pytest.warns(UserWarning, match=r"Layer Block at '1'.*\['scale'\]"):
        layers = recording.find_layers(model)
    by_module = {type(layer.module).__name__: layer for layer in layers}
    assert set(by_module["Block"].params) == {"scale"}
    assert isinstance(by_module["LayerNorm"].rule, engine.rules.LayerNormRule)
    check_exact_extensions(model, nn.CrossEntropyLoss(), x, y)


class SharesWithChild(nn.Module):
    """Owns a parameter that its child Linear also uses (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.weight = self.lin.weight

    def forward(self, x):
        return self.lin(x) + torch.tanh(x @ self.weight)


def test_generic_rule_with_weight_tied_to_a_child():
    """The parameter's per-sample vector sums both uses, each counted once."""
    engine.register_rule(SharesWithChild, engine.GenericRule())
    model = nn.Sequential(nn.Linear(3, 4), SharesWithChild(), nn.Linear(4, C)).double()
    x = torch.randn(N, 3, dtype=torch.float64)
    check_exact_extensions(model, nn.CrossEntropyLoss(), x, torch.randint(0, C, (N,)))


class SeqFirstScale(nn.Module):
    """A custom layer on sequence-first ``[T, N, F]`` inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))

    def forward(self, x):
        return torch.tanh(x * self.weight).cumsum(0)


class SeqFirstRule(engine.GenericRule):
    def input_batch_axes(self, module, call):
        return (1,), {}

    def output_batch_axes(self, module, call, outputs):
        return [1]


def test_generic_rule_with_declared_batch_axes():
    engine.register_rule(SeqFirstScale, SeqFirstRule())
    model = nn.Sequential(
        nn.Unflatten(1, (2, 3)), _Transpose(), SeqFirstScale(), _Transpose()
    )
    model = nn.Sequential(*model, nn.Flatten(), nn.Linear(6, C)).double()
    x = torch.randn(N, 6, dtype=torch.float64)
    check_exact_extensions(model, nn.CrossEntropyLoss(), x, torch.randint(0, C, (N,)))


class _Transpose(nn.Module):
    def forward(self, x):
        return x.transpose(0, 1)


def test_recurrent_columns_in_chunks_equal_all_at_once(monkeypatch):
    model = RECURRENT["gru-bidirectional"]().double().eval()
    x = torch.randn(N, 5, 3, dtype=torch.float64)
    y = torch.randint(0, C, (N,))
    exts = [engine.SqrtGGNExact(), engine.DiagGGNExact()]
    full = engine.backprop(model, nn.CrossEntropyLoss(), x, y, exts)
    rule = engine.rules.get_rule(nn.GRU)
    monkeypatch.setattr(rule, "max_elements", 1)  # one column per chunk
    chunked = engine.backprop(model, nn.CrossEntropyLoss(), x, y, exts)
    for ext in exts:
        for name, value in full[ext.savefield].items():
            assert_close(chunked[ext.savefield][name], value, f"{ext.savefield} {name}")


# attention and recurrent layers have factors: test_kron_attention/_recurrent.py
@pytest.mark.parametrize(
    "case",
    [m for m in MODELS if not m.kron and m.name not in ("attention", "recurrent")],
    ids=lambda m: m.name,
)
def test_kronecker_factors_of_new_layers_raise(case):
    p = make_problem(case, "ce", "mean")
    with pytest.raises(NotImplementedError, match="does not provide Kronecker factors"):
        engine.backprop(p.model, p.loss_func, p.inputs, p.targets, [engine.KFLR()])


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 8, 3, stride=2, padding=1, padding_mode="reflect"),
        nn.Conv1d(3, 6, 3, dilation=2, padding="same"),
        nn.Conv3d(2, 4, 2, stride=(1, 2, 1), padding=(1, 0, 0)),
    ],
    ids=["2d-reflect-stride", "1d-same-dilation", "3d"],
)
def test_convolution_sums_and_norms_in_closed_form(monkeypatch, conv):
    """NOTE [Convolution sums and norms without per-sample vectors]."""
    used = []
    real = conv_rule._weight_l2
    monkeypatch.setattr(
        conv_rule, "_weight_l2", lambda *args: used.append(1) or real(*args)
    )
    dims = len(conv.kernel_size)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)).double()
    x = torch.randn(4, conv.in_channels, *([2] * dims), dtype=torch.float64)
    model(x)  # materialize the lazy head
    y = torch.randint(0, 3, (4,))
    loss = nn.CrossEntropyLoss()
    res = engine.backprop(model, loss, x, y, [engine.BatchL2Grad()])
    for name, g in reference.per_sample_gradients(model, loss, x, y).items():
        assert_close(res["batch_l2"][name], g.flatten(1).square().sum(1), name)
        assert_close(model.get_parameter(name).grad, g.sum(0), f".grad {name}")
    assert used  # the Gram path ran for the small output maps


@pytest.mark.parametrize("budget", [2**30, 1], ids=["cached", "over-budget"])
def test_convolution_inputs_are_unfolded_once_per_sweep(monkeypatch, budget):
    """NOTE [Derived inputs are computed once per sweep]: one unfold per conv call.

    Over the budget the patches are recomputed per chunk, with the same results.
    """
    calls = []
    real = conv_rule.unfold_input
    monkeypatch.setattr(
        conv_rule, "unfold_input", lambda *args: calls.append(1) or real(*args)
    )
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, groups=1, stride=2),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 5),
    ).double()
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 5, (3,))
    exts = [engine.DiagGGNExact(), engine.KFLR(), engine.BatchGrad()]
    args = (model, nn.CrossEntropyLoss(), x, y, exts)
    chunked = engine.backprop(*args, chunk_size=1, memory_budget=budget)
    # per chunk of one column: the gradient, C - 1 = 4 columns of the fewest
    # factor (NOTE [Fewest columns]), the per-sample gradient
    assert len(calls) == (2 if budget > 1 else 2 * (1 + 4 + 1))
    whole = engine.backprop(*args)
    for name, value in whole["diag_ggn_exact"].items():
        assert_close(chunked["diag_ggn_exact"][name], value, name)


def _reading_taps(size: int, k: int, s: int, p: int, d: int) -> list[int]:
    """Taps that read an input entry for some output position (brute force)."""
    out = (size + 2 * p - d * (k - 1) - 1) // s + 1
    return [
        u for u in range(k) if any(0 <= o * s - p + u * d < size for o in range(out))
    ]


# (module, input shape): 1x1 maps (ResNet-18's last stage on 32x32 inputs), a
# stride-2 step onto 1x1 (two live taps per axis: not cropped), dilation, 1d and 3d
@pytest.mark.parametrize(
    ("conv", "shape"),
    [
        (nn.Conv2d(3, 4, 3, padding=1), (2, 3, 1, 1)),
        (nn.Conv2d(3, 4, 3, padding=1, stride=2), (2, 3, 2, 2)),
        (nn.Conv2d(3, 4, 3, padding=1), (2, 3, 4, 4)),
        (nn.Conv2d(3, 4, 5, padding=2), (2, 3, 1, 3)),
        (nn.Conv2d(3, 4, 3, padding=2, dilation=2), (2, 3, 1, 1)),
        (nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False), (2, 4, 1, 1)),
        (nn.Conv1d(3, 4, 3, padding=1), (2, 3, 1)),
        (nn.Conv3d(2, 3, 3, padding=1), (2, 2, 1, 1, 1)),
        (nn.Conv2d(3, 4, 3, padding="same"), (2, 3, 1, 1)),
    ],
)
def test_convolutions_pull_back_through_their_live_taps(conv, shape):
    """NOTE [Taps that read only padding]: same values bit for bit, same gradients.

    A layer is cropped exactly when one tap per axis reads input entries and others
    do not (brute force over the output positions).
    """
    torch.manual_seed(0)
    conv = conv.double()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    taps = conv_rule._live_taps(conv, x)
    if isinstance(conv.padding, str):
        assert taps is None  # "same" padding is left alone
    else:
        axes = zip(
            shape[2:],
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            strict=True,
        )
        reading = [_reading_taps(*axis) for axis in axes]
        kernel = conv.kernel_size
        single = all(len(r) == 1 for r in reading)
        shrinks = any(len(r) < k for r, k in zip(reading, kernel, strict=True))
        assert (taps is not None) == (single and shrinks)
        if taps is not None:
            assert [t.start for t in taps] == [r[0] for r in reading]
    output = conv(x)
    replaced = conv_rule.ConvRule().graph_output(conv, (x,), {}, output)
    assert (replaced is output) == (taps is None)
    assert torch.equal(replaced, output)
    column = torch.randn_like(output)
    expected = torch.autograd.grad(
        output, [x, *conv.parameters()], column, retain_graph=True
    )
    got = torch.autograd.grad(replaced, [x, *conv.parameters()], column)
    for e, g in zip(expected, got, strict=True):
        assert_close(g, e, "gradient through the live taps")
