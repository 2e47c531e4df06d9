"""
# Function-space Laplace: the linearized network as a Gaussian process

The linearized Laplace approximation has a second face: the network linearized at its
MAP is a Gaussian process whose kernel is the empirical neural tangent kernel
`J(x) Σ₀ J(x')ᵀ`. `hessian_structure="gp"` (laplace-torch's `FunctionalLaplace`) fits
it on gpytorch. With all the data it *is* the weight-space full Laplace (same
predictive, same evidence); on a subset of the data (`n_subset`) it costs
`O(M² C²)` instead of `O(P²)` memory, which is what makes it usable for wide networks.
"""

# %%
# ## A classifier and its MAP
# Three Gaussian blobs in 2-D, a tanh MLP trained with weight decay.

import matplotlib.pyplot as plt
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayescurv import Laplace

torch.manual_seed(0)
centers = torch.tensor([[-2.0, -1.0], [2.0, -1.0], [0.0, 2.0]])
labels = torch.arange(3).repeat_interleave(100)  # [300]
inputs = centers[labels] + 0.7 * torch.randn(300, 2)  # [300, 2]
train_loader = DataLoader(TensorDataset(inputs, labels), batch_size=50)
model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
for _ in range(50):
    for xb, yb in train_loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        optimizer.step()
model.eval()

# %%
# ## All data: the GP equals the weight-space full Laplace
# Both are fitted at the same MAP with the same prior; the predictive probabilities
# and the evidence agree to float32 round-off.

gp = Laplace(model, "classification", subset_of_weights="all", hessian_structure="gp")
full = Laplace(
    model, "classification", subset_of_weights="all", hessian_structure="full"
)
gp.fit(train_loader)
full.fit(train_loader)
x_test = 3 * torch.randn(200, 2)
difference = (gp(x_test) - full(x_test)).abs().max()
print(f"largest difference of probabilities: {difference:.1e}")
print(
    f"evidence: GP {gp.log_marginal_likelihood().item():.4f}, "
    f"weight space {full.log_marginal_likelihood().item():.4f}"
)

# %%
# ## Subsets of the data
# A GP on `M` of the 300 points approximates the all-data posterior; the evidence is
# tuned on the subset. The plot shows the predictive confidence over the plane for
# the MAP, the GP on 30 points and the GP on all points.

subset = Laplace(model, "classification", "all", "gp", n_subset=30)
subset.fit(train_loader)
subset.optimize_prior_precision()
gp.optimize_prior_precision()
grid = torch.stack(
    torch.meshgrid(torch.linspace(-6, 6, 80), torch.linspace(-6, 6, 80), indexing="xy"),
    dim=-1,
).reshape(-1, 2)  # [6400, 2]
with torch.no_grad():
    map_probs = model(grid).softmax(-1)
panels = [
    ("MAP", map_probs),
    ("GP Laplace, 30 points", subset(grid)),
    ("GP Laplace, all 300 points", gp(grid)),
]
fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), layout="constrained")
for ax, (title, probs) in zip(axes, panels, strict=True):
    confidence = probs.max(-1).values.reshape(80, 80).detach().numpy()
    image = ax.imshow(
        confidence, extent=(-6, 6, -6, 6), origin="lower", vmin=1 / 3, vmax=1
    )
    ax.scatter(*inputs.T.numpy(), c=labels.numpy(), s=4, cmap="tab10")
    ax.set(title=title, xlabel="x₁")
axes[0].set_ylabel("x₂")
fig.colorbar(image, ax=axes, label="confidence (max probability)")
plt.show()
