r"""The evidence under a scalar or per-block prior from the spectrum of the curvature.

Used by :func:`bayescurv.laplace.tune.prior.optimize_marglik`: after one
decomposition (:meth:`~bayescurv.curvature.CurvatureMatrix.data_eigenvalues`), each
evaluation costs :math:`O(P)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from bayescurv.curvature import NotPositiveDefiniteError
from bayescurv.engine.memory import resolve_budget
from bayescurv.laplace.state import FittedState, data_scale
from bayescurv.laplace.tune.evidence import log_likelihood


# NOTE [Evidence from the spectrum]
# With a scalar prior pi, a scalar data-term scale s (1/T, or 1/(T sigma^2) for
# regression) and eigenvalues lambda of the fitted curvature, log det(s H + pi I) =
# sum_i log(s lambda_i + pi) and the scatter is pi * |theta - mu_0|^2, so an evidence
# evaluation is a handful of O(P) tensor operations: no structure objects, no input
# validation, no factorization per step. evidence.log_marginal_likelihood is the
# reference it must equal (tests/laplace/test_evidence.py).
#
# Exactly zero eigenvalues each add log(pi) and 1/pi, so they are counted once, not
# summed per step: Kronecker factors with zero rows (3x3 convolutions on 1x1 and
# 2x2 maps, decomposed on their non-zero block) leave 8.7 M of a ResNet-18's
# 11.2 M eigenvalues at exactly 0 (all-weights kron, 64 CIFAR-shaped images), and
# its 50 marglik steps went from 8.0 to 0.6 s CPU.
#
# A per-block (layerwise) prior pi_b shifts the eigenvalues of the structures whose
# blocks are decomposed independently (KronBlocks, Diagonal: CurvatureMatrix.
# blockwise_spectrum) block by block, log det = sum_b sum_{i in b} log(s lambda_i +
# pi_b), so the same O(P) evaluation holds per block, with the zeros counted per
# block; autograd runs over each block's contiguous slice (a gather by block index
# was 3-5x slower). 20 layerwise steps on a ResNet-18's all-weights posterior (64
# CIFAR-shaped images, 62 blocks) went from 6.9 to 0.6 s CPU for kron (a structure
# object and its log-determinant over all 11.2 M eigenvalue products per step
# before) and from 10.6 to 0.7 s for diag.
class SpectralEvidence:
    r"""The evidence as a function of the prior (and sigma), from eigenvalues.

    .. math::
        \log p(\mathcal D \mid \pi, \sigma) \approx \log p(\mathcal D \mid
        \theta_*, \sigma) - \tfrac12 \sum_b \Big( \sum_{i \in b}
        \log(s \lambda_i + \pi_b) - P_b \log\pi_b
        + \pi_b \lVert \theta_{*,b} - \mu_{0,b} \rVert^2 \Big)

    for a scalar prior (one block) or a per-block prior ``[B]``.

    Args:
        state: The fitted state.
        prior_mean: :math:`\mu_0`, 0-d or ``[P]``.
        temperature: :math:`T`.
        eigenvalues: :math:`\lambda`, ``[P]``, non-negative, of the curvature;
            block ``b``'s in its parameter range if ``block_sizes`` is given.
        block_sizes: ``B`` block sizes for a per-block prior (``None``: one block,
            a scalar prior only).
    """

    def __init__(
        self,
        state: FittedState,
        prior_mean: Tensor,
        temperature: float,
        eigenvalues: Tensor,
        block_sizes: Sequence[int] | None = None,
    ) -> None:
        self.state = state
        self.temperature = temperature
        self.num_params = eigenvalues.shape[0]
        self.smallest = eigenvalues.min().item() if self.num_params else 0.0
        nonzero = eigenvalues != 0  # see the NOTE: zeros are counted
        self.zeros = self.num_params - int(nonzero.sum())
        self.eigenvalues = eigenvalues[nonzero] if self.zeros else eigenvalues
        distances = (state.mean - prior_mean).square().detach()
        self.squared_distance = distances.sum()
        self.blocks = None
        if block_sizes is not None:
            self.blocks = _Blocks(block_sizes, eigenvalues, nonzero, distances)

    @classmethod
    def of(
        cls,
        state: FittedState,
        prior_mean: Tensor,
        temperature: float,
        per_block: bool = False,
    ) -> SpectralEvidence | None:
        r"""The fast form for ``state``, or ``None`` if its structure has no spectrum.

        Args:
            state: The fitted state.
            prior_mean: :math:`\mu_0`.
            temperature: :math:`T`.
            per_block: For a per-block prior: ``None`` unless the structure's
                spectrum is block by block (``blockwise_spectrum``).
        """
        curvature = state.curvature
        if per_block and not curvature.blockwise_spectrum:
            return None
        values = curvature.data_eigenvalues()
        if values is None:
            return None
        sizes = curvature.block_sizes if per_block else None
        return cls(state, prior_mean, temperature, values.detach(), sizes)

    def check(self, scale: float, prior: float | Tensor) -> None:
        r"""Raise as the structure would if :math:`s \lambda_i + \pi \le 0`.

        Args:
            scale: :math:`s`.
            prior: :math:`\pi`, a number, or ``[B]`` for a per-block prior.

        Raises:
            NotPositiveDefiniteError: For a slightly negative eigenvalue (beyond
                round-off) that the prior does not lift.
        """
        if isinstance(prior, Tensor) and prior.ndim == 1:
            lowest = (scale * self.blocks.smallest + prior).min().item()
        else:
            lowest = scale * self.smallest + float(prior)
        _check_positive(self.state, lowest)

    def __call__(self, prior: Tensor, sigma: Tensor) -> Tensor:
        """The evidence at a positive ``prior`` (0-d or ``[B]``) and valid ``sigma``."""
        scale = data_scale(self.state, sigma, self.temperature)
        fit = log_likelihood(self.state, sigma, self.temperature)
        if prior.ndim == 1:
            self.check(scale.item(), prior.detach())
            return fit - 0.5 * self.blocks.ratio_and_scatter(scale, prior)
        self.check(scale.item(), prior.item())
        # log det - P log(prior); each zero eigenvalue's log(prior) cancels
        logdet = (scale * self.eigenvalues + prior).log().sum()
        ratio = logdet - (self.num_params - self.zeros) * prior.log()
        return fit - 0.5 * (ratio + prior * self.squared_distance)

    def prior_objective(
        self, sigma: Tensor
    ) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        r"""The negative evidence in :math:`x = \log\pi` at a fixed ``sigma``.

        Returns:
            ``x -> (-evidence, d(-evidence)/dx)`` in closed form (no autograd):
            :math:`\tfrac12 \big(\pi \sum_i (s\lambda_i + \pi)^{-1} - P
            + \pi \lVert \theta_* - \mu_0 \rVert^2\big)`.
        """
        with torch.no_grad():
            scale = data_scale(self.state, sigma, self.temperature)
            scaled = scale * self.eigenvalues
            fit = log_likelihood(self.state, sigma, self.temperature)
        # the zero eigenvalues' log(prior) and prior / prior cancel (see the NOTE)
        size, distance = self.num_params - self.zeros, self.squared_distance
        scale = scale.item()

        def objective(log_prior: Tensor) -> tuple[Tensor, Tensor]:
            prior = log_prior.exp()
            self.check(scale, prior.item())
            shifted = scaled + prior
            value = 0.5 * (shifted.log().sum() - size * log_prior + prior * distance)
            grad = 0.5 * (prior * shifted.reciprocal().sum() - size + prior * distance)
            return value - fit, grad

        return objective


def _check_positive(state: FittedState, lowest: float) -> None:
    """Raise as the structure would for a smallest eigenvalue ``lowest <= 0``."""
    if lowest <= 0:
        name = type(state.curvature).__name__
        raise NotPositiveDefiniteError(
            f"{name}: the precision is not positive definite (smallest "
            f"eigenvalue {lowest:.3g}). Increase the prior precision or check the "
            "curvature."
        )


def _block_sums(values: Tensor, sizes: Sequence[int]) -> Tensor:
    """Sums of ``values: [P]`` over consecutive blocks of ``sizes``, ``[B]``."""
    return torch.stack([part.sum() for part in values.split(list(sizes))])


class _Blocks:
    r"""The spectrum grouped by block for a per-block prior (see the NOTE).

    Args:
        sizes: ``B`` block sizes (summing to ``P``).
        eigenvalues: ``[P]``, block ``b``'s in its parameter range.
        nonzero: ``eigenvalues != 0``, ``[P]``.
        distances: :math:`(\theta_* - \mu_0)^2`, ``[P]``.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        eigenvalues: Tensor,
        nonzero: Tensor,
        distances: Tensor,
    ) -> None:
        sizes = list(sizes)
        # contiguous slices, not a gather by block index: 3-5x faster per step on
        # 11.2 M eigenvalues (no index tensor to read, no scatter in the backward)
        self.eigenvalues = [
            values[keep]
            for values, keep in zip(
                eigenvalues.split(sizes), nonzero.split(sizes), strict=True
            )
        ]
        self.kept = torch.tensor(
            [len(values) for values in self.eigenvalues],
            dtype=eigenvalues.dtype,
            device=eigenvalues.device,
        )
        self.squared_distance = _block_sums(distances, sizes)
        self.smallest = torch.stack([part.min() for part in eigenvalues.split(sizes)])

    def ratio_and_scatter(self, scale: Tensor, prior: Tensor) -> Tensor:
        r"""The log-determinant ratio plus the scatter, per-block prior ``[B]``.

        :math:`\log\det(s H + \operatorname{diag}(\pi)) - \sum_b P_b \log\pi_b
        + \sum_b \pi_b \lVert \theta_{*,b} - \mu_{0,b} \rVert^2`.
        """
        logdet = sum(
            (scale * values + pi).log().sum()
            for values, pi in zip(self.eigenvalues, prior, strict=True)
        )
        # each zero eigenvalue's log(prior_b) cancels
        ratio = logdet - (self.kept * prior.log()).sum()
        return ratio + (prior * self.squared_distance).sum()


# NOTE [A dominant block under a per-block prior]
# `full` decomposes all its blocks together, so a per-block prior pi_b does not
# shift its eigenvalues, and the structure path pays a P^3/3 Cholesky (and its
# backward) per tuning step: 14 s on a ResNet-18's last layer (P = 5,130). With one
# block much larger than the rest (a last layer's weight beside its bias), write
# D = pi_0 I + E Delta E^T (E selects the r coordinates of the other blocks, Delta
# their pi_b - pi_0) and K = s H + pi_0 I = Q diag(s lambda + pi_0) Q^T; the matrix
# determinant lemma gives
#   log det(s H + D) = sum_i log(s lambda_i + pi_0) + log det(I_r + Delta M),
#   M = E^T K^{-1} E = Q_E diag(1 / (s lambda + pi_0)) Q_E^T,
# with Q_E the r rows of Q: O(r^2 P) per evaluation after one eigh of H. I_r +
# Delta M is not symmetric when Delta has both signs; its determinant is
# det(s H + D) / det(K) > 0, so its log-abs-determinant (LU) is the term. On a
# ResNet-18's last layer (128 images, r = 10): one eigh of 33 s, then 1 ms per
# step; hence only from EIGH_STEPS steps (laplace.tune.prior) and only where the
# eigenvectors fit in memory.
DOMINANCE = 4
"""The fast form needs the other blocks to hold at most ``1 / DOMINANCE`` of P."""


class DominantBlockEvidence:
    r"""The evidence under a per-block prior for a jointly decomposed ``full``.

    See NOTE [A dominant block under a per-block prior]; called like
    :class:`SpectralEvidence` with a prior ``[B]``.

    Args:
        state: The fitted state.
        prior_mean: :math:`\mu_0`, 0-d or ``[P]``.
        temperature: :math:`T`.
        eigenvalues: :math:`\lambda`, ``[P]``, of the curvature.
        eigenvectors: Their eigenvectors ``[P, P]`` (columns).
        block_sizes: ``B`` block sizes.
    """

    def __init__(
        self,
        state: FittedState,
        prior_mean: Tensor,
        temperature: float,
        eigenvalues: Tensor,
        eigenvectors: Tensor,
        block_sizes: Sequence[int],
    ) -> None:
        sizes = list(block_sizes)
        self.state, self.temperature = state, temperature
        self.base = max(range(len(sizes)), key=sizes.__getitem__)
        device = eigenvalues.device
        counts = torch.as_tensor(sizes, device=device)
        index = torch.arange(len(sizes), device=device)
        blocks = torch.repeat_interleave(index, counts)
        others = (blocks != self.base).nonzero().squeeze(1)
        self.block_of_other = blocks[others]  # [r]
        self.rows = eigenvectors[others]  # Q_E, [r, P]
        self.eigenvalues = eigenvalues
        self.smallest = eigenvalues.min().item()
        self.sizes = counts.to(eigenvalues.dtype)
        distances = (state.mean - prior_mean).square().detach()
        self.squared_distance = _block_sums(distances, sizes)

    @classmethod
    def of(
        cls, state: FittedState, prior_mean: Tensor, temperature: float
    ) -> DominantBlockEvidence | None:
        r"""The fast form for ``state``, or ``None`` where it does not apply.

        Args:
            state: The fitted state.
            prior_mean: :math:`\mu_0`.
            temperature: :math:`T`.

        Returns:
            ``None`` unless the curvature has an eigenbasis
            (``data_eigenbasis``), several blocks, and blocks other than the
            largest that hold at most ``1 / DOMINANCE`` of the parameters, and
            the eigenvectors fit in the default memory budget.
        """
        curvature = state.curvature
        sizes = curvature.block_sizes
        others = curvature.num_params - max(sizes)
        if len(sizes) < 2 or others * DOMINANCE > curvature.num_params:
            return None
        # the eigenvectors and eigh's workspace, each [P, P]; else the Cholesky path
        needed = 2 * curvature.num_params**2 * curvature.dtype.itemsize
        if needed > resolve_budget(None, curvature.device)[0]:
            return None
        found = curvature.data_eigenbasis()  # None for structures without one
        if found is None:
            return None
        return cls(state, prior_mean, temperature, *found, sizes)

    def __call__(self, prior: Tensor, sigma: Tensor) -> Tensor:
        """The evidence at a positive per-block ``prior`` ``[B]``, valid ``sigma``."""
        scale = data_scale(self.state, sigma, self.temperature)
        fit = log_likelihood(self.state, sigma, self.temperature)
        base = prior[self.base]
        lowest = scale.item() * self.smallest + base.item()
        _check_positive(self.state, lowest)
        shifted = scale * self.eigenvalues + base
        inner = (self.rows / shifted) @ self.rows.mT  # E^T K^{-1} E, [r, r]
        delta = prior[self.block_of_other] - base
        eye = torch.eye(len(delta), dtype=inner.dtype, device=inner.device)
        lemma = torch.linalg.slogdet(eye + delta[:, None] * inner).logabsdet
        ratio = shifted.log().sum() + lemma - (self.sizes * prior.log()).sum()
        return fit - 0.5 * (ratio + (prior * self.squared_distance).sum())
