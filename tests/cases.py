"""The test case table: models x losses x reductions, as data.

Every model maps a small float64 batch to an output ``[N, C]`` or ``[N, C, T]`` and is
built to exercise one feature of the engine (graphs that are not chains, functional
ops, weight sharing, normalization layers, transposed convolutions, attention,
recurrent layers, tokens). New models go before ``tokens``: tests pick cases by index.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

N = 4  # samples per batch
C = 3  # outputs / classes


class ResidualMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(5, 5)
        self.head = nn.Linear(5, C)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x + torch.tanh(self.inner(x)))


class ResidualCNN(nn.Module):
    """A residual conv, and a 3x3 conv on a 1x1 map (one live tap: the centre)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.point = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(2 * 3 * 3 + 2, C)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv(x) + x)
        h = F.avg_pool2d(h, 2)
        p = torch.tanh(self.point(F.adaptive_avg_pool2d(h, 1)))
        return self.head(torch.cat([h.flatten(1), p.flatten(1)], 1))


class Branching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 4)
        self.b = nn.Linear(5, 4, bias=False)
        self.join = nn.Linear(8, C)
        self.skip = nn.Linear(5, C)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.cat([F.relu(self.a(x)), torch.sigmoid(self.b(x))], dim=1)
        return self.join(h) + self.skip(x)


class WeightShared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(5, 5)
        self.head = nn.Linear(5, C)

    def forward(self, x: Tensor) -> Tensor:
        h = self.shared(torch.tanh(self.shared(x)))
        return self.head(torch.tanh(h))


class Conv1dNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(2, 4, 3, stride=2, dilation=1)
        self.gn = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv1d(4, 4, 3, padding=1, groups=2, padding_mode="reflect")
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4 * 4, C)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.gn(self.conv1(x)))
        h = torch.tanh(self.bn(self.conv2(h)))
        return self.head(h.flatten(1))


class TokenModel(nn.Module):
    """Embedding + LayerNorm + attention built from Linear layers, on ``[N, T]``."""

    def __init__(self, vocab: int = 7, dim: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.norm = nn.LayerNorm(dim)
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.out = nn.Linear(dim, C)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.norm(self.embed(tokens))
        att = F.scaled_dot_product_attention(
            self.q(h).unsqueeze(1), self.k(h).unsqueeze(1), self.v(h).unsqueeze(1)
        ).squeeze(1)
        return self.out(h + att).permute(0, 2, 1)  # [N, C, T]


class Decoder(nn.Module):
    """Transposed convolutions (2-D with groups, 1-D with output padding)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(
            2, 2, 3, stride=2, padding=1, output_padding=1, groups=2
        )
        self.up1d = nn.ConvTranspose1d(2, 1, 2, stride=2, dilation=2, bias=False)
        self.head = nn.Linear(2 * 2 * 2 + 5, C)

    def forward(self, x: Tensor) -> Tensor:
        h = F.avg_pool2d(torch.sigmoid(self.up(x)), 2)  # [N, 2, 2, 2]
        s = torch.tanh(self.up1d(x.flatten(2)[..., :2]))  # [N, 1, 5]
        return self.head(torch.cat([h.flatten(1), s.flatten(1)], 1))


class AttentionModel(nn.Module):
    """RMSNorm + sequence-first attention with a residual, on ``[N, T, E]``."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, kdim=3)
        self.key = nn.Linear(dim, 3)
        self.out = nn.Linear(dim, C)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        key = self.key(h).transpose(0, 1)
        h = h.transpose(0, 1)  # [T, N, E]
        att, weights = self.attn(h, key, h)
        pooled = (h + att).mean(0) + weights.sum((1, 2)).unsqueeze(1)
        return self.out(pooled)


class Recurrent(nn.Module):
    """LSTM (batch first) into a GRU (sequence first), classified from ``h_n``.

    Small on purpose: the Hessian references re-run it many times. Bidirectional and
    multi-layer recurrent layers are tested in ``tests/engine/test_layers.py``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 2, batch_first=True)
        self.gru = nn.GRU(2, 2)
        self.head = nn.Linear(2, C)

    def forward(self, x: Tensor) -> Tensor:
        seq, _ = self.lstm(x)
        _, h_n = self.gru(seq.transpose(0, 1))
        return self.head(h_n.transpose(0, 1).flatten(1))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.ReLU(inplace=True),  # exercises the in-place safe mode
        nn.Conv2d(
            4, 4, 2, padding="same", groups=2, dilation=2, padding_mode="circular"
        ),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, C),
    )


def _conv3d() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(1, 2, 2, stride=(1, 2, 1)),
        nn.BatchNorm3d(2),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(2 * 3 * 2 * 3, C),
    )


@dataclass(frozen=True)
class ModelCase:
    """A model factory and the input it takes."""

    name: str
    make: Callable[[], nn.Module]
    make_input: Callable[[torch.Generator], Tensor]
    kron: bool = True
    """Whether the model is in the Kronecker case table (KFAC/KFLR checked against
    per-layer definitions in ``tests/engine/test_kron.py``). ``attention`` and
    ``recurrent`` have factors too, checked in ``tests/engine/test_kron_attention.py``
    and ``tests/engine/test_kron_recurrent.py``."""


def _rand(*shape: int) -> Callable[[torch.Generator], Tensor]:
    return lambda gen: torch.randn(*shape, generator=gen, dtype=torch.float64)


MODELS = [
    ModelCase(
        "mlp",
        lambda: nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, C)),
        _rand(N, 5),
    ),
    ModelCase("cnn", _cnn, _rand(N, 2, 8, 8)),
    ModelCase("residual_mlp", ResidualMLP, _rand(N, 5)),
    ModelCase("residual_cnn", ResidualCNN, _rand(N, 2, 6, 6)),
    ModelCase("branching", Branching, _rand(N, 5)),
    ModelCase("weight_shared", WeightShared, _rand(N, 5)),
    ModelCase("conv1d_norm", Conv1dNorm, _rand(N, 2, 9)),
    ModelCase("conv3d_bn", _conv3d, _rand(N, 1, 4, 5, 4)),
    ModelCase("deconv", Decoder, _rand(N, 2, 2, 2), kron=False),
    ModelCase("attention", AttentionModel, _rand(N, 5, 4), kron=False),
    ModelCase("recurrent", Recurrent, _rand(N, 3, 3), kron=False),
    ModelCase(
        "tokens", TokenModel, lambda gen: torch.randint(0, 7, (N, 5), generator=gen)
    ),
]

LOSSES = ["ce", "mse", "bce"]
REDUCTIONS = ["mean", "sum"]


def make_loss(name: str, reduction: str) -> nn.Module:
    """The loss module of a case."""
    cls = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}
    return cls[name](reduction=reduction)


def make_targets(loss: str, output: Tensor, gen: torch.Generator) -> Tensor:
    """Targets that fit a loss and a model output ``[N, C, *T]``."""
    if loss == "ce":
        shape = (output.shape[0], *output.shape[2:])
        return torch.randint(0, output.shape[1], shape, generator=gen)
    if loss == "bce":
        return torch.rand(output.shape, generator=gen, dtype=output.dtype)
    return torch.randn(output.shape, generator=gen, dtype=output.dtype)


def randomize_norm_stats(model: nn.Module, gen: torch.Generator) -> None:
    """Give eval-mode BatchNorm layers non-trivial running statistics."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen))


@dataclass(frozen=True)
class Problem:
    """A fully instantiated test problem (float64)."""

    model: nn.Module
    loss_func: nn.Module
    inputs: Tensor
    targets: Tensor


def make_problem(model_case: ModelCase, loss: str, reduction: str) -> Problem:
    """Instantiate a case with a fixed seed."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = model_case.make().double().eval()
    randomize_norm_stats(model, gen)
    inputs = model_case.make_input(gen)
    with torch.no_grad():
        output = model(inputs)
    targets = make_targets(loss, output, gen)
    return Problem(model, make_loss(loss, reduction), inputs, targets)


CASES = [(m, loss, red) for m in MODELS for loss in LOSSES for red in REDUCTIONS]
CASE_IDS = [f"{m.name}-{loss}-{red}" for m, loss, red in CASES]
KRON_MODELS = [m for m in MODELS if m.kron]
KRON_CASES = [case for case in CASES if case[0].kron]
KRON_CASE_IDS = [i for case, i in zip(CASES, CASE_IDS, strict=True) if case[0].kron]


@dataclass(frozen=True)
class LoaderProblem:
    """A case split into batches of unequal sizes, plus the concatenated data."""

    model: nn.Module
    loss_func: nn.Module
    batches: list[tuple[Tensor, Tensor]]
    inputs: Tensor
    targets: Tensor


def make_loader_problem(
    model_case: ModelCase,
    loss: str,
    reduction: str,
    sizes: tuple[int, ...] = (5, 4, 2, 1),
) -> LoaderProblem:
    """A case with ``sum(sizes)`` samples, batched by ``sizes`` (fixed seed)."""
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    model = model_case.make().double().eval()
    randomize_norm_stats(model, gen)
    total = sum(sizes)
    inputs = torch.cat([model_case.make_input(gen) for _ in range(-(-total // N))])
    inputs = inputs[:total]
    with torch.no_grad():
        output = model(inputs)
    targets = make_targets(loss, output, gen)
    batches = list(
        zip(inputs.split(list(sizes)), targets.split(list(sizes)), strict=True)
    )
    return LoaderProblem(model, make_loss(loss, reduction), batches, inputs, targets)
