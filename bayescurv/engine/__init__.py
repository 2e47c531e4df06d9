"""The modular backprop engine: quantities beyond the gradient in one sweep.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from bayescurv import engine
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    >>> res = engine.backprop(model, nn.CrossEntropyLoss(), x, y,
    ...                       [engine.BatchGrad(), engine.DiagGGNExact()])
    >>> res["grad_batch"]["0.weight"].shape
    torch.Size([8, 3, 4])
    >>> torch.allclose(res["grad_batch"]["0.weight"].sum(0), model[0].weight.grad)
    True
"""

from bayescurv.engine.backprop import BackpropResult, backprop
from bayescurv.engine.dense import ggn_matrix
from bayescurv.engine.extensions import (
    BatchDiagGGNExact,
    BatchDiagGGNMC,
    BatchDiagHessian,
    BatchDotGrad,
    BatchGrad,
    BatchL2Grad,
    DiagGGNExact,
    DiagGGNMC,
    DiagHessian,
    Extension,
    SqrtGGNExact,
    SqrtGGNMC,
    SumGradSquared,
    Variance,
)
from bayescurv.engine.jacobian import Jacobian, LinearJacobian
from bayescurv.engine.kron import KFAC, KFLR, KFRA, KFACApprox, kron_dense
from bayescurv.engine.losses import LossRule
from bayescurv.engine.memory import MemoryBudgetError
from bayescurv.engine.operators import (
    CurvatureOperator,
    EFOperator,
    GGNOperator,
    HessianOperator,
)
from bayescurv.engine.pool import release_pool, set_pool_limit
from bayescurv.engine.products import (
    Curvature,
    empirical_fisher_vector_product,
    ggn_vector_product,
    hessian_vector_product,
)
from bayescurv.engine.rules import (
    GenericRule,
    LayerRule,
    register_rule,
    registered_layers,
)

__all__ = [
    "KFAC",
    "KFLR",
    "KFRA",
    "BackpropResult",
    "BatchDiagGGNExact",
    "BatchDiagGGNMC",
    "BatchDiagHessian",
    "BatchDotGrad",
    "BatchGrad",
    "BatchL2Grad",
    "Curvature",
    "CurvatureOperator",
    "DiagGGNExact",
    "DiagGGNMC",
    "DiagHessian",
    "EFOperator",
    "Extension",
    "GGNOperator",
    "GenericRule",
    "HessianOperator",
    "Jacobian",
    "KFACApprox",
    "LayerRule",
    "LinearJacobian",
    "LossRule",
    "MemoryBudgetError",
    "SqrtGGNExact",
    "SqrtGGNMC",
    "SumGradSquared",
    "Variance",
    "backprop",
    "empirical_fisher_vector_product",
    "ggn_matrix",
    "ggn_vector_product",
    "hessian_vector_product",
    "kron_dense",
    "register_rule",
    "registered_layers",
    "release_pool",
    "set_pool_limit",
]
