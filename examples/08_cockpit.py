"""
# Watching training with Cockpit

`bayescurv.cockpit` implements the instruments of Cockpit (Schneider, Dangel &
Hennig, NeurIPS 2021): loss, step sizes and the local step quality alpha, gradient
noise tests, gradient histograms, Hessian trace and top eigenvalue, and more. Each
training step runs one engine sweep that computes the loss, `.grad` and every
quantity the instruments scheduled at that step need; the dashboard draws them all.
"""

# %%
# ## A training loop with a Cockpit
# `cockpit.step(x, y)` replaces `optimizer.zero_grad()` and `loss.backward()`; the
# parameters are updated inside its block. The `full` preset with short intervals
# runs the gradient instruments every 2 steps and the curvature ones every 10.

import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayescurv import cockpit as ck

torch.manual_seed(0)
digits = load_digits()
x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
y = torch.tensor(digits.target)
loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)

model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
loss_func = nn.CrossEntropyLoss()
optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
instruments = ck.preset_instruments(
    "full", first_order_interval=2, curvature_interval=10
)
cockpit = ck.Cockpit(model, loss_func, instruments, optimizer=optimizer)
print(cockpit)

for _ in range(3):  # epochs
    for xb, yb in loader:
        with cockpit.step(xb, yb) as info:
            optimizer.step()
    print(f"step {info.step}: loss {info.loss.item():.3f}")

# %%
# ## The dashboard
# One panel per instrument: step sizes first (loss, alpha, distance and update
# size, gradient norm), then gradient noise (the tests with their thresholds, GSNR,
# histograms, CABS, early stopping), then curvature (top eigenvalue, trace, TIC).
# `cockpit.history` holds the same values for your own plots.

path = cockpit.plot(
    Path(tempfile.mkdtemp()) / "dashboard.png", title="MLP on digits, SGD lr 0.5"
)
print(f"dashboard written to {path}")

fig, ax = plt.subplots(figsize=(12, 9), layout="constrained")
ax.imshow(plt.imread(path))
ax.set_axis_off()
plt.show()

alpha = torch.tensor(list(cockpit.history["alpha"].values.values()))
print(f"alpha recorded at {len(alpha)} steps, median {alpha.median():.2f}")
