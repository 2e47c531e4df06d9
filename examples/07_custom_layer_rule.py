"""
# A rule for your own layer

The engine records every layer with trainable parameters and asks its *rule* to turn
the layer's input and the columns pulled back to its output into per-sample
quantities. A layer without a rule still works through the generic `torch.func`
rule, with a one-time warning that a hand-written rule would be faster. This example
writes that rule for a small layer, registers it, and checks it against the dense
reference and against the generic rule.
"""

# %%
# ## A layer the engine does not know
# A gated element-wise gain: `y = x * sigmoid(gate) * scale`, with two parameter
# vectors.

import time
import warnings

import torch
from torch import nn

from bayescurv import engine
from bayescurv.engine import reference


class GatedScale(nn.Module):
    """``y = x * sigmoid(gate) * scale`` on the last axis of ``x: [N, *, dim]``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, *, dim] -> [N, *, dim]``."""
        return x * torch.sigmoid(self.gate) * self.scale


torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 16), GatedScale(16), nn.Tanh(), nn.Linear(16, 3))
model = model.double()
loss_func = nn.CrossEntropyLoss()
x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
extensions = [engine.BatchGrad(), engine.DiagGGNExact()]

# %%
# ## The generic rule
# It works out of the box and says so once per layer class.

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    generic = engine.backprop(model, loss_func, x, y, extensions)
print(caught[0].message)

# %%
# ## A hand-written rule
# `per_sample(module, inputs, grad_output)` receives the layer's recorded inputs and
# the columns `grad_output: [V, N, *out]` pulled back to its output (`V` columns per
# sample: one for the gradient, `C` for the exact GGN square root) and returns the
# per-sample vectors `[V, N, *p]` of each parameter: the chain rule through
# `y = x * s(gate) * scale`, summed over any extra input axes. Everything else
# (sums of squares, diagonals, moments) follows from them.


class GatedScaleRule(engine.LayerRule):
    """Per-sample vectors of :class:`GatedScale`'s ``gate`` and ``scale``."""

    def per_sample(self, module, inputs, grad_output):
        """``{"gate": [V, N, dim], "scale": [V, N, dim]}`` by the chain rule."""
        x = inputs[0].unsqueeze(0)  # [1, N, *, dim]
        sig = torch.sigmoid(module.gate)
        g_x = grad_output * x  # [V, N, *, dim]
        g_x = g_x.reshape(*g_x.shape[:2], -1, g_x.shape[-1]).sum(2)  # [V, N, dim]
        return {"gate": g_x * module.scale * sig * (1 - sig), "scale": g_x * sig}


engine.register_rule(GatedScale, GatedScaleRule())
hand = engine.backprop(model, loss_func, x, y, extensions)

# %%
# ## Checks
# The hand rule agrees with the generic rule and with the dense `torch.func`
# references (individual gradients and the GGN's diagonal), then both are timed.

grads = reference.per_sample_gradients(model, loss_func, x, y)
ggn_diag = reference.split_vector(
    model, reference.ggn(model, loss_func, x, y).diagonal()
)
for name in ("1.gate", "1.scale"):
    assert torch.allclose(hand["grad_batch"][name], grads[name])
    assert torch.allclose(hand["diag_ggn_exact"][name], ggn_diag[name])
    assert torch.allclose(hand["diag_ggn_exact"][name], generic["diag_ggn_exact"][name])
print("hand-written rule == generic rule == dense reference")


def seconds(repeats: int = 20) -> float:
    """Mean wall time of one sweep with the currently registered rule."""
    start = time.perf_counter()
    for _ in range(repeats):
        engine.backprop(model, loss_func, x, y, extensions)
    return (time.perf_counter() - start) / repeats


hand_time = seconds()
engine.register_rule(GatedScale, engine.GenericRule(), overwrite=True)
generic_time = seconds()
print(
    f"one sweep, ms: hand rule {1e3 * hand_time:.1f}, generic {1e3 * generic_time:.1f}"
)
