r"""Nyström features of the empirical NTK (ELLA-style), exact in the limit.

Landmark rows :math:`L` (``M`` training points, every output) give the Nyström
approximation :math:`Q = K_{\cdot L} K_{LL}^{+} K_{L \cdot}` of the kernel, with
features :math:`\phi(x) = K_{xL}\, T`, :math:`T = U_k \operatorname{diag}(\mu_k)^{-1/2}`
from the top ``k`` eigenpairs of :math:`K_{LL}` (Deng et al., 2022, "Accelerated
linearized Laplace approximation"). One pass over all ``N`` training points
accumulates the ``[k, k]`` data term in feature space

.. math::
    G = \sum_n \phi_n^\top W_n \phi_n, \qquad
    \tau = \sum_n \operatorname{tr}\big(W_n (K_{nn} - \phi_n \phi_n^\top)\big),

never more than a batch of Jacobians at a time. When the subset has fewer weights
than the landmarks have rows (``P <= L C``), the features are computed as
:math:`\phi(x) = J(x)\, D` with the ``[P, k]`` directions :math:`D = \Sigma_0
J_L^\top T` (ELLA's form: a product with the factored Jacobian, :math:`O(P k)` per
input) instead of the kernel against the landmarks (:math:`O(L C k)`). The
posterior is then the
conjugate one in feature space, :math:`G = V \operatorname{diag}(\lambda) V^\top`,
projection :math:`T V` (:mod:`.spectral`). The evidence uses Titsias' collapsed
bound, :math:`\log\det(I + \rho G) + \rho\tau`, and the predictive keeps the exact
prior variance :math:`K_{**}` (the DTC predictive): with all training points as
landmarks, :math:`Q = K` on the data, :math:`\tau = 0`, and both equal the exact
GP's. ELLA's features drop :math:`K_{**} - Q_{**}` (the subset-of-regressors
predictive), which under-estimates the variance away from the landmarks.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from bayescurv.laplace.function_space.anchors import AnchorRows
from bayescurv.laplace.function_space.components import FeatureComponent
from bayescurv.laplace.function_space.rows import JacobianRows, point_blocks
from bayescurv.laplace.function_space.spectral import SpectralGP, features, spectrum
from bayescurv.laplace.sources.jacobians import SegmentedJacobian

Batch = tuple[SegmentedJacobian, Tensor]
"""A training chunk's Jacobians and output Hessian roots (see :mod:`.roots`)."""


def feature_maps(
    anchors: AnchorRows,
    variances: Tensor,
    independent: bool,
    rank: int | None,
) -> list[tuple[int | None, Tensor]]:
    r"""Per component (output, :math:`T` ``[A, k]``) from the landmarks' kernel.

    Args:
        anchors: The landmark rows.
        variances: Prior variance per parameter tensor, ``[B]``.
        independent: A feature map per output.
        rank: Keep the ``rank`` largest eigenpairs (``None``: every positive one).
    """
    outputs = range(anchors.num_outputs) if independent else [None]
    maps = []
    for output in outputs:
        gram = anchors.gram(variances, independent, output)
        values, vectors, _ = spectrum(gram, "Nystrom")
        if rank is not None:
            values, vectors = values[-rank:], vectors[:, -rank:]
        maps.append((output, vectors * values.rsqrt()))
    return maps


def directions(
    anchors: AnchorRows, variances: Tensor, output: int | None, transform: Tensor
) -> Tensor:
    r""":math:`\Sigma_0 J_A^\top T`, ``[P, k]``: features are :math:`J(x)` times it."""
    total, start = None, 0
    for rows in anchors.chunks(output):
        weights = transform[start : start + len(rows)]
        start += len(rows)
        part = rows.rmatmul(weights, variances.double())
        total = part if total is None else total + part
    return total


def nystrom_posterior(
    anchors: AnchorRows,
    batches: Iterable[Batch],
    variances: Tensor,
    independent: bool,
    rank: int | None = None,
    memory_budget: int = 2**28,
) -> SpectralGP:
    """The Nyström posterior from one pass over the training chunks (module doc).

    Args:
        anchors: The landmark rows.
        batches: Every training chunk's Jacobians and roots (``[N_b, C, C]``, or
            ``[N_b, C]`` diagonal).
        variances: Prior variance per parameter tensor, ``[B]``.
        independent: A GP per output (diagonal roots).
        rank: Eigenpairs of the landmarks' kernel to keep.
        memory_budget: Bytes the ``[P, k]`` feature directions may take.
    """
    maps = feature_maps(anchors, variances, independent, rank)
    sizes = anchors.block_sizes
    primal = [
        directions(anchors, variances, output, transform)
        if sum(sizes) <= transform.shape[0]
        and 8 * sum(sizes) * transform.shape[1] <= memory_budget
        else None
        for output, transform in maps
    ]
    grams = [t.new_zeros(t.shape[1], t.shape[1]) for _, t in maps]
    gap = torch.zeros((), dtype=torch.float64)
    for jac, batch_roots in batches:
        prior = point_blocks(jac, sizes, variances, diagonal=independent).double()
        roots = batch_roots.double()
        if not independent and roots.ndim == 2:
            roots = roots.diag_embed()
        for (output, transform), gram, direction in zip(
            maps, grams, primal, strict=True
        ):
            if direction is None:
                rows = JacobianRows.all_rows(jac, sizes, output)
                cross = anchors.cross(rows, variances, independent, output)
                phi = cross.double() @ transform
            else:  # J(x) D, factored (see the module doc)
                phi = features(jac, direction)
                phi = phi[:, output] if independent else phi.flatten(0, 1)
            if independent:
                weighted = roots[:, output, None] * phi
                gap += (roots[:, output].square() * prior[:, output]).sum()
            else:
                phi = phi.reshape(jac.num_samples, jac.num_outputs, -1)
                weighted = torch.einsum("nac,nak->nck", roots, phi).flatten(0, 1)
                gap += torch.einsum("nac,nab,nbc->", roots, prior, roots)
            gram.add_(weighted.mT @ weighted)
            gap -= weighted.square().sum()
    components, dropped = [], 0
    for (output, transform), gram, direction in zip(maps, grams, primal, strict=True):
        values, vectors, lost = spectrum((gram + gram.mT) / 2, "Nystrom")
        rotated = None if direction is None else direction @ vectors
        components.append(FeatureComponent(output, transform, values, vectors, rotated))
        dropped += lost
    trace_gap = gap.clamp_min(0).to(variances)
    return SpectralGP(anchors, components, variances, independent, trace_gap, dropped)
