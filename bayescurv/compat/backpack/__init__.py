"""BackPACK's API on the bayescurv engine: switching is an import line.

Replace ``from backpack import backpack, extend`` and ``from backpack.extensions
import ...`` by the same names from ``bayescurv.compat.backpack`` and
``bayescurv.compat.backpack.extensions``; the rest of the code stays. The quantities
have BackPACK's savefields, shapes and scaling (convolution Kronecker factors
included) and also work on models BackPACK does not support (residual connections,
attention, LayerNorm, weight sharing): each is computed by
:func:`bayescurv.engine.backprop` on a replay of the extended model's forward call.
See ``docs/migrating_backpack.md`` for the differences.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from bayescurv.compat.backpack import backpack, extend
    >>> from bayescurv.compat.backpack.extensions import DiagGGNExact, Variance
    >>> model = extend(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    >>> lossfunc = extend(nn.CrossEntropyLoss())
    >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    >>> loss = lossfunc(model(x), y)
    >>> with backpack(Variance(), DiagGGNExact()):
    ...     loss.backward()
    >>> model[0].weight.variance.shape, model[2].bias.diag_ggn_exact.shape
    (torch.Size([3, 4]), torch.Size([2]))
"""

from bayescurv.compat.backpack import extensions
from bayescurv.compat.backpack.context import backpack, disable
from bayescurv.compat.backpack.extend import extend

__all__ = ["backpack", "disable", "extend", "extensions"]
