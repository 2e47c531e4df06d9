"""
# Low-rank curvature with ViViT

On a batch of `N` samples with `C` classes the GGN is a sum of `N·C` outer products
of its square-root columns, so its rank is at most `N·C` however many weights the
network has. `bayescurv.vivit` (Dangel, Tatzel & Hennig, TMLR 2022) gets its top
eigenpairs from the small `N·C × N·C` Gram matrix of those columns, and the
per-sample slopes and curvatures along them: how much the samples agree on each
direction, which tells how far a step along it can be trusted.
"""

# %%
# ## A network mid-training
# An MLP on digits after a few epochs of SGD: the loss is not yet small, so the
# directions still matter.

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import nn

from bayescurv import vivit

torch.manual_seed(0)
digits = load_digits()
x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
y = torch.tensor(digits.target)
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
loss_func = nn.CrossEntropyLoss()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(5):
    for start in range(0, len(x), 64):
        optimizer.zero_grad()
        loss_func(model(x[start : start + 64]), y[start : start + 64]).backward()
        optimizer.step()
model.eval()
x_batch, y_batch = x[:128], y[:128]  # the batch the curvature is measured on

# %%
# ## The GGN's top eigenpairs
# One engine sweep for the square root (`[C, N, *p]` per parameter) and a
# `1280 × 1280` eigendecomposition, for a network of 4,810 weights; no `[P, P]`
# matrix is formed.

values, vectors = vivit.ggn_eigen(model, loss_func, x_batch, y_batch, k=20)
print(f"top 5 GGN eigenvalues: {[round(v, 3) for v in values[:5].tolist()]}")
print({name: list(v.shape) for name, v in vectors.items()})

# %%
# ## Slopes and curvatures per sample
# Along each eigenvector `e_k`, every sample has a slope `γ_nk` and a curvature
# `λ_nk`; the batch's are their means. Where the spread is large compared to the
# mean, one batch says little about the whole data set.

dd = vivit.directional_derivatives(model, loss_func, x_batch, y_batch, k=20)
k = torch.arange(1, len(dd.lambda_mean) + 1)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
for ax, mean, var, title, label in [
    (axes[0], dd.gamma_mean, dd.gamma_variance, "Slopes along the eigenvectors", "γ_k"),
    (
        axes[1],
        dd.lambda_mean,
        dd.lambda_variance,
        "Curvatures along the eigenvectors",
        "λ_k",
    ),
]:
    ax.errorbar(
        k,
        mean,
        yerr=var.sqrt(),
        fmt="o",
        ms=4,
        capsize=2,
        label="batch mean ± per-sample std",
    )
    ax.axhline(0, color="gray", lw=0.8)
    ax.set(title=title, xlabel="eigenvector k (by eigenvalue)", ylabel=label)
    ax.legend(loc="upper right", fontsize="small")
plt.show()

# %%
# ## A damped Newton step in the eigenspace
# `newton_step` minimizes the damped quadratic model in the span of the eigenvectors,
# `-Σ_k γ_k / (λ_k + δ_k) e_k`. Damping each direction by its curvature noise
# (`δ_k ∝ std(λ_nk) / √N`) trusts the well-estimated directions more.

damping = 1e-3 + 0.5 * (dd.lambda_variance / len(x_batch)).sqrt()
update = vivit.newton_step(dd, damping=damping)
with torch.no_grad():
    before = loss_func(model(x), y).item()
    for name, p in model.named_parameters():
        p.add_(update[name])
    after = loss_func(model(x), y).item()
print(f"loss on all digits: {before:.4f} before, {after:.4f} after one step")
