r"""A sparse variational GP of the linearized network through gpytorch (VaLLA-style).

Ortega et al. (2023, "Variational linearized Laplace approximation") fit a sparse
variational GP with the empirical NTK as kernel and the network's output as mean.
Here the GP is gpytorch's: an :class:`~gpytorch.models.ApproximateGP` with a
whitened :class:`~gpytorch.variational.VariationalStrategy` on the inducing rows
(``M`` training points, every output), a
:class:`~gpytorch.variational.NaturalVariationalDistribution`, the
:class:`~.kernel.NTKKernel`, gpytorch's :class:`~gpytorch.mlls.VariationalELBO`
and natural-gradient steps (:class:`~gpytorch.optim.NGD`), one minibatch at a time.

The likelihood is the Laplace one, the quadratic expansion of the log likelihood
at the MAP outputs, :math:`-\tfrac12 r_n^\top W_n r_n` for the residual
:math:`r = f - f(\cdot; \theta_*)` (:class:`GGNLikelihood`; a Gaussian observation
:math:`0 \sim \mathcal N(R_n^\top r_n, I)`). The problem is then conjugate: a
natural-gradient step of size 1 on all data lands on the optimum, and steps of size
:math:`B_t / \sum_{s \le t} B_s` over one epoch average the minibatches' natural
parameters into exactly the full-data optimum

.. math::
    S^{-1} = I + \sum_n \phi_n^\top W_n \phi_n, \qquad
    \phi_n = K_{nZ} L^{-\top}, \quad L L^\top = K_{ZZ},

the collapsed (Titsias) optimum, which is the Nyström posterior with the inducing
points as landmarks (:mod:`.nystrom`), and the exact GP with every training point
as inducing point. The fitted :math:`S` gives the posterior of :mod:`.spectral`
(:math:`G = S^{-1} - I`), whose evidence and predictive follow every
hyperparameter change in closed form. VaLLA's likelihood is the true one (a
variational, not a Laplace, posterior for classification); see
``docs/function_space.md``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import gpytorch
import torch
from torch import Tensor
from tqdm.auto import tqdm

from bayescurv.laplace.function_space.anchors import AnchorRows
from bayescurv.laplace.function_space.components import FeatureComponent
from bayescurv.laplace.function_space.inputs import length, take
from bayescurv.laplace.function_space.kernel import NTKKernel, encode_rows
from bayescurv.laplace.function_space.roots import output_hessian_root
from bayescurv.laplace.function_space.rows import point_blocks
from bayescurv.laplace.function_space.spectral import SpectralGP, spectrum
from bayescurv.laplace.likelihoods import LikelihoodModel

MIN_ROWS_PER_STEP = 256
"""Fewest rows (points times outputs) of a natural-gradient step by default."""


class GGNLikelihood(gpytorch.likelihoods.Likelihood):
    r"""The Laplace likelihood of residuals: :math:`0 \sim \mathcal N(R_n^\top r, I)`.

    Its log density is :math:`-\tfrac12 r_n^\top W_n r_n` up to a constant: the
    GGN's quadratic model of the log likelihood around the MAP outputs. The
    "observations" passed to it are the roots :math:`R_n` ``[B, C, C]`` (or a
    diagonal root ``[B, C]``); the latent rows are sample-major (``n C + c``).
    """

    def forward(
        self, function_samples: Tensor, roots: Tensor
    ) -> torch.distributions.Distribution:
        """The pseudo-observations given residual samples ``[..., B C]``."""
        residual = function_samples.reshape(
            *function_samples.shape[:-1], *roots.shape[:2]
        )
        mean = _apply_root(roots, residual)
        return torch.distributions.Independent(
            torch.distributions.Normal(mean, torch.ones_like(mean)), 2
        )

    def expected_log_prob(  # noqa: D102
        self, observations: Tensor, function_dist: Any, *args: Any, **kwargs: Any
    ) -> Tensor:
        roots = observations
        num, classes = roots.shape[:2]
        mean = function_dist.mean.reshape(num, classes)
        covariance = function_dist.covariance_matrix.reshape(num, classes, num, classes)
        blocks = covariance.diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [B, C, C]
        full = roots if roots.ndim == 3 else roots.diag_embed()
        trace = torch.einsum("nac,nab,nbc->n", full, blocks, full)
        fit = _apply_root(roots, mean).square().sum(-1)
        per_point = -0.5 * (trace + fit + classes * math.log(2 * math.pi))
        return (per_point / classes).repeat_interleave(classes)


def _apply_root(roots: Tensor, residual: Tensor) -> Tensor:
    r""":math:`R_n^\top r_n` for ``residual [..., B, C]``."""
    if roots.ndim == 2:
        return roots * residual
    return torch.einsum("nac,...na->...nc", roots, residual)


class VariationalNTKGP(gpytorch.models.ApproximateGP):
    """gpytorch's sparse variational GP with the NTK kernel and zero mean (residual).

    Args:
        kernel: The NTK kernel.
        inducing: Encoded inducing rows ``[A, d + 1]`` (fixed).
        jitter: Added to the inducing kernel's diagonal by the strategy.
    """

    def __init__(self, kernel: NTKKernel, inducing: Tensor, jitter: float) -> None:
        distribution = gpytorch.variational.NaturalVariationalDistribution(
            len(inducing), mean_init_std=0.0
        )
        strategy = gpytorch.variational.VariationalStrategy(
            self,
            inducing,
            distribution,
            learn_inducing_locations=False,
            jitter_val=jitter,
        )
        super().__init__(strategy)
        self.covar_module = kernel
        self._distribution = (distribution,)  # a reference, not a second submodule

    @property
    def natural_precision(self) -> Tensor:
        r"""The fitted :math:`S^{-1}` (whitened), from the natural parameters."""
        return -2 * self._distribution[0].natural_mat.detach()

    def forward(self, rows: Tensor) -> gpytorch.distributions.MultivariateNormal:  # noqa: D102
        mean = rows.new_zeros(rows.shape[:-1])
        return gpytorch.distributions.MultivariateNormal(mean, self.covar_module(rows))


# NOTE [Rows per natural-gradient step]
# gpytorch's ELBO on B C rows forms their [B C, B C] predictive covariance from the
# [B C, A] cross kernel (cost (B C)^2 A) and factors the [A, A] inducing kernel
# (A^3): an epoch of N / B steps costs about N C (B C + A) A + (N / B) A^3, least
# near B C = A rows per step, where it is within a factor two of the N C A^2 that
# any full-covariance variational update needs.
def variational_posterior(
    anchors: AnchorRows,
    batches: Iterable[tuple[Any, Tensor]],
    likelihood: LikelihoodModel,
    variances: Tensor,
    independent: bool,
    n_data: int,
    batch_size: int | None = None,
    progress_bar: bool = False,
) -> SpectralGP:
    """Fit gpytorch's variational GP over one epoch and read off its posterior.

    Args:
        anchors: The inducing points' rows.
        batches: The training ``(inputs, targets)`` on the device (one epoch).
        likelihood: The likelihood (its output Hessians).
        variances: Prior variance per parameter tensor, ``[B]``.
        independent: Must be ``False`` here.
        n_data: ``N``.
        batch_size: Points per natural-gradient step (default: as many rows as
            inducing rows, at least 256; see the NOTE).
        progress_bar: Show a tqdm bar.

    Raises:
        ValueError: For independent outputs or inputs that are not one tensor.
    """
    if independent:
        raise ValueError(
            "functional_approximation='variational' models correlated outputs; "
            "use 'sod' or 'nystrom' with independent_outputs=True."
        )
    if not isinstance(anchors.inputs, Tensor):
        raise ValueError(
            "functional_approximation='variational' needs tensor inputs (gpytorch "
            "encodes each row as [x, c]); use 'sod' or 'nystrom' for tuple or dict "
            "inputs."
        )
    classes, sizes = anchors.num_outputs, anchors.block_sizes
    gram = anchors.gram(variances).double()
    jitter = _jitter(gram, variances.dtype)
    kernel = NTKKernel(anchors.source, anchors.inputs.shape[1:], sizes, variances)
    inducing = encode_rows(anchors.inputs, classes)
    model = VariationalNTKGP(kernel, inducing, jitter).to(variances)
    gp_likelihood = GGNLikelihood()
    rows = n_data * classes
    elbo = gpytorch.mlls.VariationalELBO(gp_likelihood, model, num_data=rows)
    optimizer = gpytorch.optim.NGD(
        model.variational_parameters(), num_data=rows, lr=1.0
    )
    model.train()
    rows_per_step = max(MIN_ROWS_PER_STEP, anchors.num_rows)
    step = batch_size or max(1, rows_per_step // classes)
    seen, gap = 0, torch.zeros((), dtype=torch.float64)
    for inputs in _chunks(batches, step, progress_bar):
        roots, prior_trace = _batch_curvature(anchors, likelihood, variances, inputs)
        gap += prior_trace
        seen += len(roots)
        optimizer.param_groups[0]["lr"] = len(roots) / seen  # running average
        optimizer.zero_grad()
        # one kernel evaluation of [inducing, batch] rows, not one per lazy slice
        with gpytorch.settings.lazily_evaluate_kernels(False):
            loss = -elbo(model(encode_rows(inputs, classes)), roots)
        loss.backward()
        optimizer.step()
    eye = torch.eye(len(gram), dtype=torch.float64)
    data_term = model.natural_precision.double() - eye
    lower = torch.linalg.cholesky(gram + jitter * eye)
    whiten = torch.linalg.solve_triangular(lower.mT, eye, upper=True)  # L^{-T}
    values, vectors, dropped = spectrum((data_term + data_term.mT) / 2, "VariationalGP")
    trace_gap = (gap - values.sum()).clamp_min(0).to(variances)
    component = FeatureComponent(None, whiten, values, vectors)
    return SpectralGP(anchors, [component], variances, False, trace_gap, dropped)


def _jitter(gram: Tensor, dtype: torch.dtype) -> float:
    """Round-off jitter for the inducing kernel's Cholesky factor (``A eps max K``)."""
    scale = gram.diagonal().abs().max().item() if len(gram) else 1.0
    return len(gram) * torch.finfo(dtype).eps * max(scale, torch.finfo(dtype).tiny)


def _batch_curvature(
    anchors: AnchorRows, likelihood: LikelihoodModel, variances: Tensor, inputs: Tensor
) -> tuple[Tensor, Tensor]:
    r"""A batch's Hessian roots and :math:`\sum_n \operatorname{tr}(W_n K_{nn})`."""
    source = anchors.source
    roots, trace = [], torch.zeros((), dtype=torch.float64)
    with torch.enable_grad() if source.needs_grad else torch.no_grad():
        chunks = list(source.jacobian_segments(inputs))
    with torch.no_grad():
        for output, jac in chunks:
            root = output_hessian_root(likelihood, output.detach())
            full = root if root.ndim == 3 else root.diag_embed()
            prior = point_blocks(jac, anchors.block_sizes, variances).double()
            trace += torch.einsum("nac,nab,nbc->", full.double(), prior, full.double())
            roots.append(root)
    return torch.cat(roots), trace


def _chunks(
    batches: Iterable[tuple[Any, Tensor]], step: int, progress_bar: bool
) -> Iterator[Tensor]:
    for inputs, _ in tqdm(batches, disable=not progress_bar, desc="Laplace.fit (NGD)"):
        count = length(inputs)
        for start in range(0, count, step):
            yield take(inputs, torch.arange(start, min(start + step, count)))
