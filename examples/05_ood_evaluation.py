"""
# Evaluating calibration and out-of-distribution detection

`bayescurv.metrics` scores predicted probabilities from any source, so a MAP network
and its Laplace approximations are compared by the same code: accuracy, negative
log-likelihood, Brier score and expected calibration error on the test set,
reliability diagrams, and how well the maximum class probability separates the test
set from inputs the network was never trained on (AUROC, FPR at 95 % TPR).
"""

# %%
# ## A digits classifier and two kinds of OOD inputs
# The test digits are in distribution; uniform noise images and inverted digits
# (white ink on black) are not.

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayescurv import Laplace, metrics

torch.manual_seed(0)
digits = load_digits()
x = torch.tensor(digits.data / 16.0, dtype=torch.float32)  # [1797, 64] in [0, 1]
y = torch.tensor(digits.target)
x_train, x_test, y_train, y_test = train_test_split(
    x, y, test_size=0.25, random_state=0
)
train_loader = DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True)
ood = {"noise": torch.rand(len(x_test), 64), "inverted": 1 - x_test}

model = nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 10))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
for _ in range(30):
    for xb, yb in train_loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        optimizer.step()
model.eval()

# %%
# ## Three predictives
# MAP, laplace-torch's defaults (last layer, KFAC, probit), and the recipe the
# library's study recommends for such MLPs: all weights, KFAC, a cold posterior and
# the normalized Laplace bridge (see the Laplace guide).

default = Laplace(model, "classification")
default.fit(train_loader)
default.optimize_prior_precision()
recipe = Laplace(
    model,
    "classification",
    subset_of_weights="all",
    hessian_structure="kron",
    temperature=0.2,
)
recipe.fit(train_loader)
recipe.optimize_prior_precision()


def predict(method: str, inputs: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``[N, 10]`` of one method."""
    if method == "MAP":
        with torch.no_grad():
            return model(inputs).softmax(-1)
    if method == "LA defaults":
        return default(inputs)
    return recipe(inputs, link_approx="bridge_norm")


methods = ["MAP", "LA defaults", "LA recipe"]
probs = {m: predict(m, x_test) for m in methods}
ood_probs = {m: {k: predict(m, v) for k, v in ood.items()} for m in methods}

header = ["acc", "NLL", "Brier", "ECE", "AUROC noise", "AUROC inv."]
print(f"{'method':<12}" + "".join(f"{h:>12}" for h in header))
for m in methods:
    s_in = metrics.max_probability(probs[m])
    row = [
        metrics.accuracy(probs[m], y_test),
        metrics.nll(probs[m], y_test),
        metrics.brier_score(probs[m], y_test),
        metrics.expected_calibration_error(probs[m], y_test),
        *(
            metrics.auroc(s_in, metrics.max_probability(p))
            for p in ood_probs[m].values()
        ),
    ]
    print(f"{m:<12}" + "".join(f"{v:>12.3f}" for v in row))

# %%
# ## Reliability diagrams
# Bars are the accuracy per confidence bin, hatched bars the gap to the mean
# confidence; bars below the diagonal are over-confident. Each panel's legend gives
# the ECE.

fig, axes = plt.subplots(1, 3, figsize=(12, 4.4), sharey=True, layout="constrained")
for ax, m in zip(axes, methods, strict=True):
    metrics.reliability_diagram(probs[m], y_test, ax=ax, title=m)
plt.show()

# %%
# ## Confidence on known and unknown inputs
# The maximum class probability on the test digits and on inverted digits. The
# better the two histograms are separated, the higher the AUROC.

fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), sharey=True, layout="constrained")
bins = torch.linspace(0, 1, 21)
for ax, m in zip(axes, methods, strict=True):
    ax.hist(
        metrics.max_probability(probs[m]), bins=bins, alpha=0.6, label="test digits"
    )
    ax.hist(
        metrics.max_probability(ood_probs[m]["inverted"]),
        bins=bins,
        alpha=0.6,
        label="inverted digits",
    )
    ax.set(title=m, xlabel="max. class probability")
axes[0].set_ylabel("count")
axes[0].legend(loc="upper left")
plt.show()
