"""
# Laplace in three lines

A ReLU classifier trained to its MAP estimate becomes more confident the farther an
input lies from its training data (Hein et al., CVPR 2019). Three lines put a Laplace
approximation on it (laplace-torch's defaults: last-layer weights, Kronecker-factored
GGN, a prior precision tuned on the evidence, the GLM predictive with the probit link),
and its confidence then falls off away from the data (Kristiadi et al., ICML 2020).
"""

# %%
# ## A toy problem and a MAP network
# Three Gaussian blobs in 2-D and a small ReLU network trained with Adam.

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayescurv import Laplace

torch.manual_seed(0)
centers = torch.tensor([[-2.0, -1.0], [2.0, -1.0], [0.0, 2.0]])
y = torch.arange(3).repeat_interleave(100)  # [300] class indices
x = centers[y] + 0.7 * torch.randn(300, 2)  # [300, 2]
train_loader = DataLoader(TensorDataset(x, y), batch_size=50, shuffle=True)

model = nn.Sequential(
    nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)
)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
for _ in range(100):
    for xb, yb in train_loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        optimizer.step()
model.eval()

# %%
# ## The three lines
# `fit` makes one pass over the data, `optimize_prior_precision` maximizes the
# evidence (no data needed), and `la(x)` returns class probabilities `[N, 3]`.

la = Laplace(model, "classification")
la.fit(train_loader)
la.optimize_prior_precision()

print(la)
print(f"tuned prior precision: {la.prior_precision.item():.3g}")

# %%
# ## Confidence away from the data
# The maximum class probability on a grid around the data: the MAP is almost
# certain everywhere, the Laplace predictive only near the training points.

side = torch.linspace(-12, 12, 121)
grid = torch.cartesian_prod(side, side).flip(-1)  # [121 * 121, 2], rows = y
with torch.no_grad():
    map_conf = model(grid).softmax(-1).amax(-1)
    la_conf = la(grid).amax(-1)

fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True, layout="constrained")
for ax, conf, title in [
    (axes[0], map_conf, "MAP"),
    (axes[1], la_conf, "Laplace (last-layer KFAC)"),
]:
    image = ax.contourf(
        side, side, conf.reshape(len(side), len(side)), levels=np.linspace(1 / 3, 1, 9)
    )
    ax.scatter(*x.T, c=y, cmap="Set1", s=8, edgecolors="white", linewidths=0.3)
    ax.set(title=title, xlabel="$x_1$")
axes[0].set_ylabel("$x_2$")
fig.colorbar(image, ax=axes, label="max. class probability", format="%.2f")
plt.show()
