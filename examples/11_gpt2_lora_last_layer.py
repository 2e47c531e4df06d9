"""
# A GPT-2 classifier with LoRA: the adapters or the last layer

A GPT-2-style sequence classifier (`GPT2ForSequenceClassification`) with LoRA
adapters from `peft`, as people fine-tune language models today, and two Laplace
approximations of it:

* over **all trainable weights** (the LoRA matrices and the classification head),
  `subset_of_weights="all"`: the frozen base model takes no part;
* over the **last layer** only. GPT-2's head `score` maps every position's hidden
  state (`[N, T, H]`) to logits and the model then picks the last token's; the
  last-layer posterior needs one feature vector per sequence, which
  `feature_reduction="pick_last"` takes (also `"pick_first"` or `"average"`).

Batches are the dicts of Hugging Face's collators; the model wrapper hands them to
the transformer. The model is tiny and built from a config on the spot, so nothing
is downloaded. The example needs the optional packages `transformers` and `peft`
(`pip install -e ".[huggingface]"`) and says so without them.
"""

# %%
# ## A tiny GPT-2 with LoRA adapters
# Sequences of 16 tokens; the label is the parity of the last token with 15 % of
# the labels flipped, so no model can be sure. LoRA adapters of rank 4 on the
# attention's `c_attn` projection; `task_type="SEQ_CLS"` trains the head too.

import importlib.util

import torch
from torch import nn
from torch.utils.data import DataLoader

from bayescurv import Laplace, metrics

MISSING = [m for m in ("transformers", "peft") if importlib.util.find_spec(m) is None]
if MISSING:
    print(
        f"This example needs {' and '.join(MISSING)}: "
        'pip install -e ".[huggingface]". Skipped.'
    )
    raise SystemExit(0)

from peft import LoraConfig, get_peft_model  # noqa: E402 (optional, checked above)
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2ForSequenceClassification,
)

torch.manual_seed(0)
config = GPT2Config(
    vocab_size=50,
    n_positions=16,
    n_embd=32,
    n_layer=2,
    n_head=2,
    num_labels=2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=1,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
)
lora = LoraConfig(
    task_type="SEQ_CLS",
    r=4,
    lora_alpha=8,
    lora_dropout=0.0,
    target_modules=["c_attn"],
    fan_in_fan_out=True,  # GPT-2's Conv1D stores its weight transposed
)
gpt = get_peft_model(GPT2ForSequenceClassification(config), lora)
gpt.print_trainable_parameters()


class Classifier(nn.Module):
    """Logits ``[N, 2]`` from a Hugging Face batch dict (``input_ids``, ...)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The sequence classifier's logits."""
        return self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits


def dataset(n: int, flip: float = 0.15) -> list[dict[str, torch.Tensor]]:
    """``n`` sequences; label: the last token's parity, flipped w.p. ``flip``."""
    ids = torch.randint(2, 50, (n, 16))
    labels = ids[:, -1] % 2
    labels = torch.where(torch.rand(n) < flip, 1 - labels, labels)
    mask = torch.ones_like(ids)
    return [
        {"input_ids": i, "attention_mask": m, "labels": t}
        for i, m, t in zip(ids, mask, labels, strict=True)
    ]


train_loader = DataLoader(dataset(400), batch_size=32, shuffle=True)
model = Classifier(gpt)
optimizer = torch.optim.Adam(
    [p for p in model.parameters() if p.requires_grad], lr=1e-2
)
for _ in range(25):  # long enough to fit some of the flipped labels
    for batch in train_loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(batch), batch["labels"]).backward()
        optimizer.step()
model.eval()

# %%
# ## Laplace over the adapters and over the last layer
# The diagonal over all trainable weights, and a Kronecker-factored last layer
# whose features are the last token's hidden state. Both tune the prior precision
# by the marginal likelihood.

approximations = {
    "all LoRA weights, diag": Laplace(
        model, "classification", subset_of_weights="all", hessian_structure="diag"
    ),
    "last layer, kron": Laplace(
        model,
        "classification",
        subset_of_weights="last_layer",
        hessian_structure="kron",
        feature_reduction="pick_last",
    ),
}
for la in approximations.values():
    la.fit(train_loader)
    la.optimize_prior_precision()

# %%
# ## Calibration on held-out sequences
# The MAP network is over-confident on new sequences; both posteriors soften its
# probabilities where it has fitted noise.

test = next(iter(DataLoader(dataset(500), batch_size=500)))
with torch.no_grad():
    results = {"MAP": model(test).softmax(-1)}  # [500, 2]
for name, la in approximations.items():
    results[name] = la(test)  # the dict goes to the model, as in training
for name, probs in results.items():
    print(
        f"{name:<24} accuracy {metrics.accuracy(probs, test['labels']):.3f} "
        f"NLL {metrics.nll(probs, test['labels']):.3f} "
        f"ECE {metrics.expected_calibration_error(probs, test['labels']):.3f}"
    )
