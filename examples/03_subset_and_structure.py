"""
# Choosing the weights and the structure

`Laplace(model, likelihood, subset_of_weights=..., hessian_structure=...)` picks which
weights get a posterior (the others stay at the MAP) and how the posterior precision
is stored. Every combination is one call; this example fits six of them on the same
network and compares their cost, their evidence and their predictive uncertainty.

| subset | what gets a posterior |
| --- | --- |
| `"last_layer"` | the weights of the last `nn.Linear` (found automatically) |
| `"all"` | every trainable parameter |
| `"subnetwork"` | the entries chosen by a mask, e.g. the largest in magnitude |

| structure | precision |
| --- | --- |
| `"full"` | dense `[P, P]` |
| `"kron"` | one Kronecker product per parameter tensor (KFAC) |
| `"diag"` | its diagonal |
| `"lowrank"` | top eigenpairs of the GGN plus a diagonal |
"""

# %%
# ## A regression network
# A tanh MLP fitted to noisy samples of a sine, with no data in `[-1, 1]`.

import time

import matplotlib.pyplot as plt
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayescurv import Laplace
from bayescurv.laplace import LargestMagnitudeSubnetMask

torch.manual_seed(1)
x = torch.cat([torch.empty(50, 1).uniform_(-3, -1), torch.empty(50, 1).uniform_(1, 3)])
y = torch.sin(2 * x) + 0.1 * torch.randn_like(x)  # [100, 1]
train_loader = DataLoader(TensorDataset(x, y), batch_size=25, shuffle=True)
model = nn.Sequential(
    nn.Linear(1, 30), nn.Tanh(), nn.Linear(30, 30), nn.Tanh(), nn.Linear(30, 1)
)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(400):
    for xb, yb in train_loader:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(xb), yb).backward()
        optimizer.step()
model.eval()
n_params = sum(p.numel() for p in model.parameters())
print(f"{n_params} weights")

# %%
# ## Six posteriors
# The subnetwork keeps the 200 weights of largest magnitude; `lowrank` keeps 20
# eigenpairs. Each is fitted and tuned (prior precision and noise) the same way.

subnet = LargestMagnitudeSubnetMask(model, n_params_subnet=200).select(train_loader)
configs = {
    "last layer, full": {
        "subset_of_weights": "last_layer",
        "hessian_structure": "full",
    },
    "last layer, kron": {
        "subset_of_weights": "last_layer",
        "hessian_structure": "kron",
    },
    "all, kron": {"subset_of_weights": "all", "hessian_structure": "kron"},
    "all, diag": {"subset_of_weights": "all", "hessian_structure": "diag"},
    "all, lowrank": {
        "subset_of_weights": "all",
        "hessian_structure": "lowrank",
        "rank": 20,
    },
    "subnetwork, full": {
        "subset_of_weights": "subnetwork",
        "hessian_structure": "full",
        "subnetwork_indices": subnet,
    },
}
x_plot = torch.linspace(-5, 5, 300).unsqueeze(-1)
fits = {}
print(f"{'posterior':<18} {'P':>5} {'fit+tune [s]':>12} {'log evidence':>13} sigma")
for name, options in configs.items():
    start = time.perf_counter()
    la = Laplace(model, "regression", **options)
    la.fit(train_loader)
    la.optimize_prior_precision(tune_sigma_noise=True)
    seconds = time.perf_counter() - start
    f_mu, f_var = la(x_plot)
    fits[name] = (f_mu.squeeze(-1), f_var.flatten().sqrt())
    print(
        f"{name:<18} {la.mean.numel():>5} {seconds:>12.2f} "
        f"{la.log_marginal_likelihood().item():>13.1f} {la.sigma_noise.item():>6.3f}"
    )

# %%
# ## Their predictive uncertainty
# The band is two standard deviations of the function (without the noise). The last
# layer alone barely widens in the gap. All-weights KFAC, low rank and the
# subnetwork widen in the gap and away from the data. The diagonal ignores the
# correlations between weights: it is uncertain everywhere, its evidence is the
# lowest of all, and tuning then explains the data as noise (the `sigma` column).

fig, axes = plt.subplots(
    2, 3, figsize=(11, 6), sharex=True, sharey=True, layout="constrained"
)
xs = x_plot.squeeze(-1)
for ax, (name, (mean, std)) in zip(axes.flat, fits.items(), strict=True):
    ax.fill_between(xs, mean - 2 * std, mean + 2 * std, alpha=0.3, label="mean ± 2 std")
    ax.plot(xs, mean, lw=1.5, label="mean")
    ax.scatter(x.squeeze(-1), y.squeeze(-1), s=5, c="k", label="data")
    ax.set(title=name, ylim=(-3, 3))
for ax in axes[1]:
    ax.set_xlabel("x")
for ax in axes[:, 0]:
    ax.set_ylabel("y")
axes[0, 0].legend(loc="lower left", fontsize="small")
plt.show()
