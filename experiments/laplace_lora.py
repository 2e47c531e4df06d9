"""Laplace over the LoRA adapters of a GPT-2-style classifier, beside laplace-torch.

The model is ``transformers``' ``GPT2ForSequenceClassification`` built from a config
on the spot (4 layers, width 256, 4 heads, vocabulary 1,000; random
initialization, nothing downloaded) with ``peft`` LoRA adapters of rank 8 on every
``c_attn`` and ``c_proj`` (attention and MLP output projections; 90,112 adapter
weights) and the trainable classification head ``score`` (``task_type="SEQ_CLS"``).
Batches are Hugging Face dicts (``input_ids``, ``attention_mask``, ``labels``) of
synthetic token ids: 32 tokens, 2 classes (the parity of the last token).

Configurations (``CONFIGS``): all trainable weights (adapters and head) with
``diag`` and ``kron``, and the last layer (``score`` on the ``[N, T, 256]`` hidden
states, ``feature_reduction="pick_last"``: GPT-2 classifies from the last token)
with ``kron`` and ``full``. The measurements (fit, tune, predict, peak memory, the
gradient-epoch baseline) are those of ``experiments/bench_scale.py``, which this
script runs for the model ``lora-gpt``.

Needs ``transformers`` and ``peft`` (the ``[huggingface]`` extra); without them
the script says so and exits cleanly.

Run: ``python experiments/laplace_lora.py`` (the options of ``bench_scale.py``;
``--quick`` for a smoke test).
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

N_TRAIN = 256
N_TEST = 64
BATCH = 16
SEQ_LEN = 32
VOCAB = 1_000
N_CLASSES = 2
CONFIGS = (
    ("all", "diag"),
    ("all", "kron"),
    ("last_layer", "kron"),
    ("last_layer", "full"),
)
REDUCTION = "pick_last"  # GPT-2's classifier reads the last (non-pad) token


def missing_packages() -> list[str]:
    """The optional packages this experiment needs and cannot import."""
    return [
        name for name in ("transformers", "peft") if not importlib.util.find_spec(name)
    ]


class DictClassifier(nn.Module):
    """Logits ``[N, C]`` from a Hugging Face batch dict (what both libraries call).

    Args:
        model: A ``...ForSequenceClassification`` model (possibly ``peft``-wrapped).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """The classifier's logits; ``labels`` in the dict are not passed on."""
        return self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits


def lora_gpt(seed: int = 0) -> nn.Module:
    """The LoRA-adapted GPT-2-style classifier, wrapped to take dict batches."""
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415 (optional)
    from transformers import GPT2Config, GPT2ForSequenceClassification  # noqa: PLC0415

    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ_LEN,
        n_embd=256,
        n_layer=4,
        n_head=4,
        num_labels=N_CLASSES,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    lora = LoraConfig(
        task_type="SEQ_CLS",
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["c_attn", "c_proj"],
        fan_in_fan_out=True,  # GPT-2's Conv1D stores weights transposed
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = GPT2ForSequenceClassification(config)
        model = get_peft_model(base, lora)
        # peft initializes B = 0: give the adapters weights a fine-tuned model has
        for name, param in model.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(param, std=0.02)
    return DictClassifier(model).eval()


def token_data(n: int, seed: int) -> list[dict[str, Tensor]]:
    """``n`` synthetic sequences as dicts; label: the last token's parity."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, SEQ_LEN), generator=gen)
    labels = ids[:, -1] % 2
    mask = torch.ones_like(ids)
    return [
        {"input_ids": i, "attention_mask": m, "labels": t}
        for i, m, t in zip(ids, mask, labels, strict=True)
    ]


def problem(n_train: int = N_TRAIN, n_test: int = N_TEST) -> dict[str, Any]:
    """Model, data and Laplace keywords of the ``lora-gpt`` benchmark problem.

    ``train`` is a list of example dicts (a ``DataLoader`` collates them into
    Hugging Face dict batches), ``test`` a list of dict batches.
    """
    test = list(DataLoader(token_data(n_test, seed=1), batch_size=BATCH))
    return {
        "model": lora_gpt(),
        "train": token_data(n_train, seed=0),
        "test": test,
        "test_targets": [batch["labels"] for batch in test],
        "n_classes": N_CLASSES,
        "batch": BATCH,
        "laplace_kwargs": {"last_layer": {"feature_reduction": REDUCTION}},
    }


def main(argv: list[str] | None = None) -> None:
    """Run ``bench_scale`` on the LoRA model (or say which packages are missing)."""
    missing = missing_packages()
    if missing:
        print(
            f"laplace_lora: skipped, {' and '.join(missing)} not installed "
            '(pip install -e ".[huggingface]").'
        )
        return
    from experiments.bench_scale import main as bench  # noqa: PLC0415

    bench(["--models", "lora-gpt", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
