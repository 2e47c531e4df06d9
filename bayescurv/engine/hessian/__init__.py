r"""Exact Hessian diagonals (``DiagHessian``, ``BatchDiagHessian``).

For a layer that is linear in its parameters (``LayerRule.linear_in_params``) and
called once, the loss depends on its parameters :math:`\theta` only through its
output :math:`z = A(x)\,\theta` (input :math:`x` independent of :math:`\theta`), so

.. math::
    \frac{\partial^2 \ell}{\partial \theta_i^2}
    = \sum_n (J_n e_i)^\top \big(\nabla^2_{z_n} \ell\big) (J_n e_i),
    \qquad J_n = \partial z_n / \partial \theta,

with the *full* Hessian w.r.t. the layer output, block-diagonal over samples. Given a
signed symmetric factorization
:math:`\nabla^2_{z_n} \ell = \sum_k s^+_{kn} s^{+\top}_{kn} - \sum_k s^-_{kn}
s^{-\top}_{kn}`, the diagonal is the layer rule's sum of squares of the positive
columns minus that of the negative ones, exactly as for ``DiagGGNExact``.

# NOTE [Two ways to the Hessian w.r.t. layer outputs]
# Chains (an nn.Sequential of layers and element-wise or piecewise-linear modules,
# see chain.py) use module-wise Hessian backpropagation (BackPACK, Dangel's
# thesis): the loss-Hessian square root and the gradient travel backwards through
# each module's Jacobian; every element-wise non-linearity adds the diagonal residual
# g * phi''(x), whose signed square roots travel on from there. ReLU-like modules have
# no residual, so a ReLU network costs about one DiagGGNExact sweep.
# Every other graph (residual connections, branches, functional ops, see
# graph.py) gets the Hessian w.r.t. each recorded layer output from batched
# Hessian-vector products: samples are independent, so one product with the unit
# vector of coordinate j in every sample yields column j of all N per-sample Hessians;
# D products (D = output size per sample) and a per-sample eigendecomposition give
# the signed square roots. Exact, but O(D) products per layer.
# Parameters used by several calls (weight sharing) or of layers that are not linear
# in their parameters get Hessian-vector products w.r.t. the parameter itself, whose
# second-order cross terms between calls the layer-output formula would miss.
"""

from __future__ import annotations

from torch import Tensor, nn

from bayescurv.engine.extensions import Reduction
from bayescurv.engine.hessian.accumulate import DiagAccumulator
from bayescurv.engine.hessian.chain import Kind, as_chain, chain_diag_hessian
from bayescurv.engine.hessian.graph import graph_diag_hessian
from bayescurv.engine.recording import Layer, Record

__all__ = ["diag_hessian", "is_ggn"]


def is_ggn(model: nn.Module, records: list[Record]) -> bool:
    """Whether the Hessian diagonal is the GGN's: a chain without curved modules.

    # NOTE [Piecewise-linear chains]
    # In a chain of affine and piecewise-linear modules (Linear, convolutions,
    # ReLU, max-pooling, ...) every residual term of the Hessian backpropagation
    # vanishes: the Hessian is the GGN, and its diagonal comes from the same
    # loss-Hessian square-root columns pulled back by autograd on the recorded graph
    # as DiagGGNExact's, without re-running each module's forward per chunk as the
    # chain walker does (measured on 3C3D: 14.2 -> about 12 gradient steps).

    Raises:
        ValueError: For Dropout in train mode (as :func:`diag_hessian`).
    """
    chain = as_chain(model, records)
    if chain is None or any(stage.kind == Kind.SMOOTH for stage in chain):
        return False
    _check_deterministic(model)
    return True


def diag_hessian(
    model: nn.Module,
    layers: list[Layer],
    args: tuple[Tensor, ...],
    loss_func: nn.Module,
    output: Tensor,
    targets: Tensor,
    records: list[Record],
    reductions: set[Reduction],
    budget: int,
) -> dict[Reduction, dict[nn.Parameter, Tensor]]:
    """Hessian diagonals (summed and/or per sample) of all recorded parameters.

    Args:
        model: The model.
        layers: Its parameterized layers (from ``find_layers``).
        args: The positional model inputs.
        loss_func: The loss module.
        output: The model output of the engine's forward pass.
        targets: The targets.
        records: The engine's records of that forward pass.
        reductions: ``SUM_SQUARED`` (``diag_h``) and/or ``BATCH_SQUARED``
            (``diag_h_batch``).
        budget: Bytes allowed for one chunk of columns.

    Returns:
        ``reduction -> parameter -> value`` (``[*p]`` or ``[N, *p]``).
    """
    _check_deterministic(model)
    acc = DiagAccumulator(reductions, budget)
    chain = as_chain(model, records)
    if chain is not None:
        chain_diag_hessian(chain, loss_func, output.detach(), targets, acc)
    else:
        graph_diag_hessian(model, layers, args, loss_func, targets, acc)
    return acc.values


def _check_deterministic(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise ValueError(
                f"{type(m).__name__} at '{name}' is in train mode: the Hessian of a "
                "randomly masked network changes with every forward pass. Call "
                "model.eval() (or set p=0) for DiagHessian."
            )
