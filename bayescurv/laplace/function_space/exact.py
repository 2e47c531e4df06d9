r"""The exact GP posterior on a set of training points (all data, or a subset).

With the kernel :math:`K` among the ``M`` points' rows and the output Hessian roots
:math:`R` (:mod:`.roots`), the posterior is the eigendecomposition of the whitened
data term :math:`R^\top K R` (:mod:`.spectral`): one ``[M C, M C]`` decomposition,
or ``C`` of ``[M, M]`` with independent outputs. Nothing is inverted but this
positive semi-definite matrix's positive part, so a singular :math:`W_n` (softmax)
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
from bayescurv.laplace.function_space.spectral import Component, SpectralGP, spectrum


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
    if independent:
        components, dropped = [], 0
        for output in range(anchors.num_outputs):
            gram = anchors.gram(variances, True, output)
            root = roots[:, output].double()
            values, vectors, lost = spectrum(
                root[:, None] * gram.double() * root, "FunctionalLaplace"
            )
            projection = root[:, None] * vectors * values.rsqrt()
            components.append(Component(output, projection, values))
            dropped += lost
    else:
        component, dropped = _joint(anchors, roots, variances)
        components = [component]
    zero = variances.new_zeros(())
    return SpectralGP(anchors, components, variances, independent, zero, dropped)


def _joint(
    anchors: AnchorRows, roots: Tensor, variances: Tensor
) -> tuple[Component, int]:
    r"""The single component of correlated outputs: :math:`R^\top K R` at once."""
    num, classes = anchors.num_points, anchors.num_outputs
    if roots.ndim == 2:
        roots = roots.diag_embed()
    roots = roots.double()
    gram = anchors.gram(variances).double().reshape(num, classes, num, classes)
    whitened = torch.einsum("nac,namd,mde->ncme", roots, gram, roots)
    values, vectors, dropped = spectrum(
        whitened.reshape(num * classes, num * classes), "FunctionalLaplace"
    )
    rotated = torch.einsum(
        "nac,nci->nai", roots, vectors.reshape(num, classes, -1)
    ).reshape(num * classes, -1)
    return Component(None, rotated * values.rsqrt(), values), dropped
