"""
# Regression with a gap in the data

The inputs lie on two intervals with nothing in between. A network trained to its MAP
estimate predicts one curve and, with a Gaussian likelihood, one noise level
everywhere: it is as sure in the gap as on the data. A Laplace approximation over all
weights adds the uncertainty about the function itself, which grows in the gap and
outside the data. The observation noise and the prior precision are both tuned on
the Laplace evidence, with no validation data.
"""

# %%
# ## Data and the MAP network
# Noisy samples of a sine on `[-4, -1.5]` and `[1.5, 4]`, and a tanh MLP trained
# with Adam on the mean squared error.

import math

import matplotlib.pyplot as plt
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayescurv import Laplace

torch.manual_seed(0)
NOISE = 0.15
x = torch.cat(
    [torch.empty(60, 1).uniform_(-4, -1.5), torch.empty(60, 1).uniform_(1.5, 4)]
)
y = torch.sin(x) + NOISE * torch.randn_like(x)  # [120, 1]
train_loader = DataLoader(TensorDataset(x, y), batch_size=30, shuffle=True)

model = nn.Sequential(
    nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 50), nn.Tanh(), nn.Linear(50, 1)
)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-5)
for _ in range(300):
    for xb, yb in train_loader:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(xb), yb).backward()
        optimizer.step()
model.eval()

# %%
# ## A Laplace approximation over all weights
# `tune_sigma_noise=True` tunes the observation noise together with the prior
# precision on the evidence. For regression `la(x)` returns the mean `[N, 1]` and
# the variance of the function `[N, 1, 1]`; `noise=True` adds the observation noise.

la = Laplace(model, "regression", subset_of_weights="all", hessian_structure="kron")
la.fit(train_loader)
la.optimize_prior_precision(tune_sigma_noise=True)
sigma = la.sigma_noise.item()
print(f"noise sigma tuned on the evidence: {sigma:.3f} (true: {NOISE})")
print(f"prior precision: {la.prior_precision.item():.3g}")

x_plot = torch.linspace(-7, 7, 400).unsqueeze(-1)  # [400, 1]
f_mu, f_var = la(x_plot)
la_std = (f_var.squeeze(-1) + sigma**2).sqrt().squeeze(-1)  # predictive std of y
with torch.no_grad():
    map_mean = model(x_plot).squeeze(-1)
map_std = math.sqrt(nn.functional.mse_loss(model(x), y).item())  # MAP noise estimate

# %%
# ## Predictions
# Mean and a two-standard-deviation band of the predictive of the targets. MAP's band
# is its residual noise, the same everywhere; the Laplace band widens wherever the
# data do not pin the function down.

fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True, layout="constrained")
xs = x_plot.squeeze(-1)
for ax, mean, std, title in [
    (axes[0], map_mean, torch.full_like(xs, map_std), "MAP (residual noise)"),
    (
        axes[1],
        f_mu.squeeze(-1).detach(),
        la_std.detach(),
        "Laplace, all weights (KFAC)",
    ),
]:
    ax.fill_between(xs, mean - 2 * std, mean + 2 * std, alpha=0.3, label="mean ± 2 std")
    ax.plot(xs, mean, lw=2, label="predictive mean")
    ax.plot(xs, torch.sin(xs), "k--", lw=1, label="true function")
    ax.scatter(x.squeeze(-1), y.squeeze(-1), s=8, c="k", label="training data")
    ax.axvspan(-1.5, 1.5, color="0.92", zorder=-1)
    ax.set(title=title, xlabel="x", ylim=(-4, 4))
axes[0].set_ylabel("y")
axes[1].legend(loc="lower right", fontsize="small")
plt.show()
