"""Unusual models for the adversarial sweep (tied, frozen, shaped, typed oddly).

Each model is fitted with two subsets and two structures; where a result comes back
it must match the dense float64 reference (:func:`~experiments.sweep_checks.
check_posterior`), where the subset cannot apply it must be refused clearly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from experiments.sweep_checks import F64, Case, check_posterior, data, fitted, mlp

Built = tuple[nn.Module, Any, Tensor, str]
"""(model, inputs, targets, likelihood)."""


class Tied(nn.Module):
    """GPT-style: embedding and unembedding share one weight."""

    def __init__(self, vocab: int = 6, width: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.hidden = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits over the vocabulary from the mean embedding."""
        return self.head(torch.tanh(self.hidden(self.embed(tokens).mean(1))))


class Twice(nn.Module):
    """One hidden layer applied twice, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 3)
        self.head = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        """The inner layer twice, then the head."""
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


class Wrap(nn.Module):
    """The MLP with a post-processing step ``kind``."""

    def __init__(self, model: nn.Module, kind: str) -> None:
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, x: Tensor) -> Any:
        """The MLP's output, post-processed."""
        out = self.model(x)
        if self.kind == "tuple":
            return out, x
        if self.kind == "dict":
            return {"logits": out}
        if self.kind == "scalar":
            return out.sum()
        if self.kind == "scaled":
            return 2 * out
        if self.kind == "mix":  # samples interact: not a per-sample model
            return out - out.mean(0, keepdim=True)
        return out


class TwoInputs(nn.Module):
    """Two input tensors, ``model(x, z)``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        """Scores of the pair."""
        return self.head(torch.tanh(self.a(x) + self.b(z)))


class PerToken(nn.Module):
    """A Linear applied per token, then averaged (last layer sees ``[N, T, d]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.head = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        """Per-token logits, averaged over the tokens."""
        return self.head(torch.tanh(self.inner(x))).mean(1)


def _seq(*layers: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*layers).double()


def _frozen(which: str) -> nn.Module:
    model = mlp("classification")
    for name, p in model.named_parameters():
        if which == "all" or name.startswith(which):
            p.requires_grad_(False)
    return model


def _builders() -> dict[str, Callable[[], Built]]:
    x, y = data("classification")
    tokens = torch.randint(0, 6, (12, 5), generator=torch.Generator().manual_seed(1))
    x2 = torch.randn(12, 2, dtype=F64)
    img = torch.randn(12, 2, 5, 5, dtype=F64)
    seq = torch.randn(12, 2, 7, dtype=F64)
    pos_y = torch.randint(0, 3, (12, 7))
    tokens_x = torch.randn(12, 7, 3, dtype=F64)
    wrapped = {
        f"{kind}-{suffix}": lambda kind=kind: (
            Wrap(mlp("classification"), kind),
            x,
            y,
            "classification",
        )
        for kind, suffix in [
            ("tuple", "out"),
            ("dict", "out"),
            ("scalar", "out"),
            ("scaled", "out"),
            ("identity", "after"),
            ("mix", "samples"),
        ]
    }
    return wrapped | {
        "mlp": lambda: (mlp("classification"), x, y, "classification"),
        "no-bias-head": lambda: (
            _seq(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3, bias=False)),
            x,
            y,
            "classification",
        ),
        "relu": lambda: (
            _seq(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 3)),
            x,
            y,
            "classification",
        ),
        "deep": lambda: (
            _seq(
                nn.Linear(3, 4),
                nn.ELU(),
                nn.Linear(4, 4),
                nn.Sigmoid(),
                nn.Linear(4, 3),
            ),
            x,
            y,
            "classification",
        ),
        "layernorm": lambda: (
            _seq(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)),
            x,
            y,
            "classification",
        ),
        "batchnorm": lambda: (
            _seq(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)),
            x,
            y,
            "classification",
        ),
        "dropout": lambda: (
            _seq(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.5), nn.Linear(4, 3)),
            x,
            y,
            "classification",
        ),
        "conv": lambda: (
            _seq(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(27, 3)),
            img,
            y,
            "classification",
        ),
        "embedding": lambda: (
            _seq(nn.Embedding(6, 4), nn.Flatten(), nn.Linear(20, 3)),
            tokens,
            y,
            "classification",
        ),
        "tied-embedding": lambda: (Tied().double(), tokens, y % 6, "classification"),
        "layer-twice": lambda: (Twice().double(), x, y, "classification"),
        "frozen-first": lambda: (_frozen("0."), x, y, "classification"),
        "frozen-head": lambda: (_frozen("2."), x, y, "classification"),
        "frozen-all": lambda: (_frozen("all"), x, y, "classification"),
        "no-params": lambda: (nn.Sequential(nn.Tanh()), x, y, "classification"),
        "two-inputs": lambda: (TwoInputs().double(), (x, x2), y, "classification"),
        "per-token": lambda: (PerToken().double(), tokens_x, y, "classification"),
        "per-position": lambda: (
            _seq(nn.Conv1d(2, 3, 1)),
            seq,
            pos_y,
            "classification",
        ),
        "one-class": lambda: (_seq(nn.Linear(3, 1)), x, y * 0, "classification"),
        "regression-1out": lambda: (
            _seq(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)),
            x,
            y[:, None].double(),
            "regression",
        ),
        "binary-1d": lambda: (
            _seq(nn.Linear(3, 1)),
            x,
            (y[:, None] > 0).double(),
            "binary",
        ),
        "float16": lambda: (
            mlp("classification").half(),
            x.half(),
            y,
            "classification",
        ),
        "bfloat16": lambda: (
            mlp("classification").bfloat16(),
            x.bfloat16(),
            y,
            "classification",
        ),
        "meta": lambda: (mlp("classification").to("meta"), x, y, "classification"),
    }


# expected outcome per model and subset ("ok", "error", "either"; "error:regex"
# also needs the message to match)
EXPECT = {
    "tied-embedding": {"last_layer": "error:tied weights"},
    "frozen-head": {"last_layer": "error:frozen weight"},
    "frozen-all": {"all": "error", "last_layer": "error"},
    "no-params": {"all": "error", "last_layer": "error"},
    "tuple-out": {"all": "error", "last_layer": "error"},
    "dict-out": {"all": "error", "last_layer": "error"},
    "scalar-out": {"all": "error", "last_layer": "error"},
    "scaled-out": {"last_layer": "error"},
    "mix-samples": {"all": "either", "last_layer": "error"},
    "per-token": {"last_layer": "error"},
    "per-position": {"last_layer": "error"},
    "conv": {},
    "float16": {"all": "error:float16", "last_layer": "error:float16"},
    "bfloat16": {"all": "error:bfloat16", "last_layer": "error:bfloat16"},
    "meta": {"all": "error:meta", "last_layer": "error:meta"},
}


def model_cases() -> list[Case]:
    """Every model with ``all``/``last_layer`` and ``full``/``diag``."""
    cases = []
    for name, build in _builders().items():
        for subset in ("all", "last_layer"):
            for structure in ("full", "diag"):

                def run(build=build, subset=subset, structure=structure) -> str:
                    model, x, y, likelihood = build()
                    la = fitted(model, likelihood, subset, structure, [(x, y)])
                    return check_posterior(la, model, x, y)

                expect, _, match = EXPECT.get(name, {}).get(subset, "ok").partition(":")
                cases.append(
                    Case(
                        "models",
                        f"{name} [{subset}/{structure}]",
                        run,
                        expect,
                        match or None,
                    )
                )
    return cases
