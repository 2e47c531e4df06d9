"""
# Evidence tuning and marginal-likelihood training

The Laplace approximation comes with an estimate of the evidence `log p(D)` (the
marginal likelihood) that is differentiable in the prior precision and the noise.
Maximizing it tunes these hyperparameters without a validation set
(`optimize_prior_precision()`); alternating it with the training epochs tunes them
while the network trains (`marglik_training`, Immer et al., ICML 2021).
"""

# %%
# ## A digits classifier
# scikit-learn's 8×8 digits (shipped with scikit-learn, nothing is downloaded) and
# an MLP 64-50-10 trained with Adam.

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayescurv import Laplace, metrics
from bayescurv.laplace import marglik_training

torch.manual_seed(0)
digits = load_digits()
x = torch.tensor(digits.data / 16.0, dtype=torch.float32)  # [1797, 64]
y = torch.tensor(digits.target)  # [1797]
x_train, x_test, y_train, y_test = train_test_split(
    x, y, test_size=0.25, random_state=0
)
train_loader = DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True)


def mlp() -> nn.Module:
    """A fresh MLP 64-50-10."""
    return nn.Sequential(nn.Linear(64, 50), nn.ReLU(), nn.Linear(50, 10))


model = mlp()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(20):
    for xb, yb in train_loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        optimizer.step()
model.eval()

# %%
# ## The evidence as a function of the prior precision
# With all weights and KFAC, the structure is decomposed once at `fit`; each new
# prior precision then costs `O(P)`, so the whole curve takes milliseconds.
# `optimize_prior_precision()` finds its maximum with 100 Adam steps on
# `log(prior precision)`; `prior_structure="layerwise"` tunes one precision per
# parameter tensor.

la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
la.fit(train_loader)
grid = np.logspace(-2, 2, 60)
evidence = [la.log_marginal_likelihood(prior_precision=p).item() for p in grid]

la.optimize_prior_precision()
scalar = la.prior_precision.item()
scalar_evidence = la.log_marginal_likelihood().item()
print(f"scalar prior: precision {scalar:.3g}, log evidence {scalar_evidence:.1f}")
la.optimize_prior_precision(prior_structure="layerwise")
layerwise = la.prior_precision.tolist()
print(
    f"layerwise prior: precisions {[f'{p:.3g}' for p in layerwise]}, "
    f"log evidence {la.log_marginal_likelihood().item():.1f}"
)

fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
ax.semilogx(grid, evidence, label="log evidence")
ax.axvline(scalar, color="C1", ls="--", label=f"tuned scalar prior ({scalar:.3g})")
ax.set(
    title="Laplace evidence, all weights, KFAC",
    xlabel="prior precision",
    ylabel="log p(D)",
)
ax.set_ylim(max(evidence) - 400, max(evidence) + 50)  # the top of the curve
ax.legend(loc="lower left")
plt.show()

# %%
# ## Training with the evidence
# `marglik_training` trains a fresh network on the negative log joint (the data
# loss plus the Gaussian prior as weight decay) and, every `marglik_frequency`
# epochs, fits a Laplace approximation and takes Adam steps on a layer-wise prior
# precision. It returns the Laplace approximation and the network of the best
# evidence, the negative evidence after every hyperstep and the loss per epoch.

torch.manual_seed(0)
la_ml, model_ml, neg_evidence, losses = marglik_training(
    mlp(),
    train_loader,
    "classification",
    optimizer_kwargs={"lr": 1e-2},
    n_epochs=30,
    n_epochs_burnin=5,
    marglik_frequency=5,
    n_hypersteps=20,
)
print(f"tuned layer-wise prior precisions: {la_ml.prior_precision.tolist()}")
for name, probs in [
    ("post-hoc, layer-wise prior", la(x_test)),
    ("marglik training", la_ml(x_test)),
]:
    print(
        f"{name:<30} accuracy {metrics.accuracy(probs, y_test):.3f} "
        f"NLL {metrics.nll(probs, y_test):.3f} "
        f"ECE {metrics.expected_calibration_error(probs, y_test):.3f}"
    )

fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), layout="constrained")
axes[0].plot(range(1, len(losses) + 1), losses)
axes[0].set(title="Training loss (negative log joint)", xlabel="epoch", ylabel="loss")
axes[1].plot(range(1, len(neg_evidence) + 1), neg_evidence)
axes[1].set(
    title="Negative log evidence", xlabel="hyperparameter step", ylabel="−log p(D)"
)
plt.show()
