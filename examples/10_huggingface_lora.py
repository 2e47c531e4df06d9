"""
# Hugging Face transformers with LoRA

A Laplace approximation over the LoRA weights of a transformer: the base model stays
frozen at its weights, the low-rank adapters (and the classification head) are
trained and get the posterior. Only trainable parameters take part, so
`subset_of_weights="all"` means "all LoRA weights". Batches are dicts as Hugging
Face's data collators make them; `Laplace` hands the whole dict to the model and
reads the targets from `batch["labels"]` (`dict_key_y`).

This example needs the optional packages `transformers` and `peft`
(`pip install -e ".[huggingface]"`). The model is a tiny BERT built from a config
on the spot, so nothing is downloaded.
"""

# %%
# ## A tiny BERT with LoRA adapters
# Sequences of 12 tokens; the label says whether a "positive" token (7 or 8)
# occurs, and 15 % of the labels are flipped, so no model can be sure. LoRA
# adapters of rank 4 on the attention's query and value projections.

import matplotlib.pyplot as plt
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification

from bayescurv import Laplace, metrics

torch.manual_seed(0)
config = BertConfig(
    vocab_size=60,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=16,
    num_labels=2,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
lora = LoraConfig(
    r=4,
    lora_alpha=8,
    target_modules=["query", "value"],
    lora_dropout=0.0,
    modules_to_save=["classifier"],
)
bert = get_peft_model(BertForSequenceClassification(config), lora)
bert.print_trainable_parameters()


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
    """``n`` sequences; label: a 7 or 8 occurs, flipped with probability ``flip``."""
    ids = torch.randint(3, 60, (n, 12))
    ids[:, 0] = 1  # a [CLS]-like first token
    labels = ((ids == 7) | (ids == 8)).any(-1).long()
    labels = torch.where(torch.rand(n) < flip, 1 - labels, labels)
    mask = torch.ones_like(ids)
    return [
        {"input_ids": i, "attention_mask": m, "labels": t}
        for i, m, t in zip(ids, mask, labels, strict=True)
    ]


train_loader = DataLoader(dataset(400), batch_size=32, shuffle=True)
model = Classifier(bert)
optimizer = torch.optim.Adam(
    [p for p in model.parameters() if p.requires_grad], lr=1e-2
)
for _ in range(30):  # long enough to overfit the noisy labels
    for batch in train_loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(batch), batch["labels"]).backward()
        optimizer.step()
model.eval()

# %%
# ## Laplace on the adapters
# KFAC over every trainable tensor: the LoRA matrices `A` and `B` of each adapted
# projection and the classification head.

la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
la.fit(train_loader)
la.optimize_prior_precision()
print(la)

# %%
# ## Calibration on held-out sequences
# The MAP network has fit the flipped labels and is over-confident on new
# sequences; the Laplace predictive keeps its accuracy and is better calibrated.

test = next(iter(DataLoader(dataset(1000), batch_size=1000)))
with torch.no_grad():
    map_probs = model(test).softmax(-1)  # [1000, 2]
la_probs = la(test)  # the dict goes to the model, as in training
for name, probs in [("MAP", map_probs), ("Laplace", la_probs)]:
    print(
        f"{name:<8} accuracy {metrics.accuracy(probs, test['labels']):.3f} "
        f"NLL {metrics.nll(probs, test['labels']):.3f} "
        f"ECE {metrics.expected_calibration_error(probs, test['labels']):.3f}"
    )

fig, axes = plt.subplots(1, 2, figsize=(9, 5), sharey=True, layout="constrained")
metrics.reliability_diagram(map_probs, test["labels"], ax=axes[0], title="MAP")
metrics.reliability_diagram(
    la_probs, test["labels"], ax=axes[1], title="Laplace on the LoRA weights"
)
plt.show()
