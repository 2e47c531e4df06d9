r"""The exact GP posterior on a set of training points (all data, or a subset).

With the kernel :math:`K` among the ``M`` points' rows and the output Hessian roots
:math:`R` (:mod:`.roots`), the posterior is the whitened data term :math:`R^\top K R`
(:mod:`.components`): one ``[M C, M C]`` matrix, or ``C`` of ``[M, M]`` with
independent outputs. The fit computes its eigenvalues (the evidence); nothing is
ever inverted but :math:`I/\rho + R^\top K R`, so a singular :math:`W_n` (softmax)
is no problem.

Subset of data (``n_subset = M < N``): each of the ``M`` points stands for
:math:`N / M` points, i.e. its :math:`W_n` is scaled by :math:`N / M`, so the
curvature estimates the full data's (see ``docs/function_space.md`` for how this
differs from laplace-torch, which scales the prior precision instead).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bayescurv.laplace.function_space.anchors import AnchorRows
from bayescurv.laplace.function_space.components import DualComponent
from bayescurv.laplace.function_space.spectral import SpectralGP


def exact_posterior(
    anchors: AnchorRows, roots: Tensor, variances: Tensor, independent: bool
) -> SpectralGP:
    r"""The exact GP posterior on the anchors' rows.

    Args:
        anchors: The training points' Jacobian rows (every output).
        roots: :math:`R_n` ``[M, C, C]``, or a diagonal root ``[M, C]`` (already
            weighted by :math:`N / M` for a subset).
        variances: Prior variance per parameter tensor, ``[B]``.
        independent: A GP per output (``roots`` diagonal ``[M, C]``).

    Returns:
        The posterior with the anchors themselves as anchors.
    """
    components = []
    if independent:
        for output in range(anchors.num_outputs):
            gram = anchors.gram(variances, True, output).double()
            root = roots[:, output].double()
            data_term = root[:, None] * gram * root
            components.append(DualComponent(output, root, data_term))
    else:
        num, classes = anchors.num_points, anchors.num_outputs
        roots = (roots.diag_embed() if roots.ndim == 2 else roots).double()
        gram = anchors.gram(variances).double().reshape(num, classes, num, classes)
        data_term = torch.einsum("nac,namd,mde->ncme", roots, gram, roots)
        size = num * classes
        components.append(DualComponent(None, roots, data_term.reshape(size, size)))
    zero = variances.new_zeros(())
    return SpectralGP(anchors, components, variances, independent, zero)
