"""
# The engine's quantities

`engine.backprop(model, loss_func, x, y, extensions)` computes, in one forward and
one backward sweep, the loss, the gradient (into `.grad`, as `loss.backward()`) and
every requested quantity beyond it: individual gradients and their moments, diagonals
of the GGN (exact or Monte Carlo) and of the Hessian, Kronecker factors, square roots
of the GGN. This example computes them for a small CNN on digits, checks two of them
against dense `torch.func` references, and looks at what they say about the batch.
"""

# %%
# ## A CNN and a batch of digits

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import nn

from bayescurv import engine
from bayescurv.engine import reference

torch.manual_seed(0)
digits = load_digits()
x = torch.tensor(digits.data[:64] / 16.0, dtype=torch.float32).reshape(64, 1, 8, 8)
y = torch.tensor(digits.target[:64])
model = nn.Sequential(
    nn.Conv2d(1, 8, 3, padding=1),
    nn.ReLU(),
    nn.MaxPool2d(2),
    nn.Conv2d(8, 8, 3, padding=1),
    nn.ReLU(),
    nn.Flatten(),
    nn.Linear(8 * 4 * 4, 10),
).eval()
loss_func = nn.CrossEntropyLoss()

# %%
# ## One sweep, many quantities
# The result is keyed by savefield, then by parameter name; its repr lists what was
# computed and the shapes (BackPACK's shapes and scaling: the `1/N` of the mean
# reduction is inside every quantity).

res = engine.backprop(
    model,
    loss_func,
    x,
    y,
    [
        engine.BatchGrad(),
        engine.BatchL2Grad(),
        engine.Variance(),
        engine.DiagGGNExact(),
        engine.DiagGGNMC(mc_samples=1),
        engine.DiagHessian(),
        engine.KFAC(mc_samples=1),
    ],
    generator=torch.Generator().manual_seed(0),
)
print(res)

# %%
# ## Checks against dense references
# The individual gradients sum to `.grad`, and the exact GGN diagonal equals the
# diagonal of the dense GGN that `bayescurv.engine.reference` builds with
# `torch.func` (the test suite does this for every quantity, in float64).

for name, p in model.named_parameters():
    assert torch.allclose(res["grad_batch"][name].sum(0), p.grad, atol=1e-6)
dense_ggn = reference.ggn(model, loss_func, x, y)  # [P, P]
diag = reference.split_vector(model, dense_ggn.diagonal())
worst = max((res["diag_ggn_exact"][n] - diag[n]).abs().max().item() for n in diag)
print(f"GGN diagonal: largest deviation from the dense reference {worst:.1e}")

# %%
# ## What the quantities say
# Left: the norms of the individual gradients (the square root of the summed
# `batch_l2`); at initialization every sample pulls about equally hard. Right: per
# weight of the first convolution, the GGN diagonal against its one-sample Monte
# Carlo estimate (unbiased, with noise) and against the exact Hessian diagonal. In
# a network of ReLU and max-pooling the activations have no curvature, so the
# Hessian and the GGN coincide; with tanh or softplus they would not.

norms = sum(res["batch_l2"].values()).sqrt()  # [64]
ggn_diag = res["diag_ggn_exact"]["0.weight"].flatten()
fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
axes[0].hist(norms, bins=20)
axes[0].set(
    title="Individual gradient norms",
    xlabel="‖∇ℓ_n‖ (scaled by 1/N)",
    ylabel="samples",
)
axes[1].loglog(
    ggn_diag, res["diag_ggn_mc"]["0.weight"].flatten(), ".", label="MC GGN (1 sample)"
)
axes[1].loglog(ggn_diag, res["diag_h"]["0.weight"].flatten(), "x", label="Hessian")
axes[1].loglog(
    [ggn_diag.min(), ggn_diag.max()],
    [ggn_diag.min(), ggn_diag.max()],
    "k--",
    lw=1,
    label="equal",
)
axes[1].set(
    title="Diagonals, first convolution's weights",
    xlabel="exact GGN diagonal",
    ylabel="other diagonal",
)
axes[1].legend(loc="upper left")
plt.show()
