r"""Likelihoods: losses, output Hessians and the log likelihood of a fitted model.

Every likelihood has a *unit loss* :math:`\ell(f, y)`, summed over the data, whose
GGN is the data term :math:`H` of the posterior precision

.. math::
    \Lambda = \frac{1}{T}\, s\, H + \operatorname{diag}(\pi), \qquad
    \log p(\mathcal{D} \mid \theta) = -\frac{1}{T} \Big( s\, \textstyle\sum_n
    \ell(f_n, y_n) + c \Big)

with temperature :math:`T` and, for regression, :math:`s = 1 / \sigma^2` and the
Gaussian normalizer :math:`c`; :math:`s = 1` and :math:`c = 0` otherwise:

* ``classification``: :math:`\ell = -\log \operatorname{softmax}(f)_y`,
  :math:`\nabla_f^2 \ell = \operatorname{diag}(p) - p p^\top`;
* ``regression``: :math:`\ell = \tfrac12 \sum_k w_k (f_k - y_k)^2`,
  :math:`\nabla_f^2 \ell = \operatorname{diag}(w)` where :math:`w = 1` for a scalar
  ``sigma_noise`` and :math:`w_k = \sigma_1^2 / \sigma_k^2` for a per-output one;
* ``binary``: :math:`\ell = \operatorname{BCE}(\sigma(f), y)` per output,
  :math:`\nabla_f^2 \ell = \operatorname{diag}(\sigma(f)(1 - \sigma(f)))`.

These are laplace-torch's conventions (its ``_H_factor`` and ``log_likelihood``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bayescurv.laplace.enums import Likelihood


class LikelihoodModel:
    """Losses and output Hessians of one likelihood.

    Args:
        kind: The likelihood.
        noise_weights: Regression only: per-output weights :math:`w`, ``[K]``, or
            ``None`` for :math:`w = 1`.
    """

    def __init__(self, kind: Likelihood, noise_weights: Tensor | None = None) -> None:
        self.kind = kind
        self.noise_weights = noise_weights

    @property
    def has_noise(self) -> bool:
        """Whether the likelihood has an observation noise (regression)."""
        return self.kind is Likelihood.REGRESSION

    # ------------------------------------------------------------------ checks
    def check_target(self, target: Tensor) -> None:
        """Raise a ``ValueError`` if the target's dtype does not fit the likelihood."""
        if self.kind is Likelihood.CLASSIFICATION:
            if target.is_floating_point():
                raise ValueError(
                    "likelihood='classification' needs integer class targets, got "
                    f"{target.dtype}."
                )
        elif not target.is_floating_point():
            raise ValueError(
                f"likelihood='{self.kind.value}' needs floating-point targets, got "
                f"{target.dtype}."
            )

    def check(self, output: Tensor, target: Tensor) -> None:
        """Raise a ``ValueError`` naming the problem if output and target do not fit.

        Args:
            output: Model output, ``[N, C]`` or ``[N, C, *T]`` (classification per
                position, e.g. segmentation), else ``[N, *]``.
            target: Class indices ``[N]`` or ``[N, *T]`` (classification), else like
                ``output``.
        """
        if self.kind is Likelihood.CLASSIFICATION:
            if output.ndim < 2:
                raise ValueError(
                    "likelihood='classification' needs a model output of shape "
                    f"[N, C] or [N, C, *T], got {list(output.shape)}."
                )
            self.check_target(target)
            expected = output.shape[:1] + output.shape[2:]
            if target.shape != expected:
                raise ValueError(
                    "likelihood='classification' needs integer class targets of "
                    f"shape {list(expected)}, got {target.dtype} {list(target.shape)}."
                )
            if target.numel() and int(target.max()) >= output.shape[1]:
                raise ValueError(
                    "likelihood='classification': class targets must lie in [0, "
                    f"C={output.shape[1]}) (the model output's axis 1) or equal -100 "
                    f"(skipped), got {int(target.max())}."
                )
            return
        self.check_target(target)
        if target.shape != output.shape:
            raise ValueError(
                f"likelihood='{self.kind.value}' needs floating-point targets of the "
                f"output's shape {list(output.shape)}, got {target.dtype} "
                f"{list(target.shape)}."
            )
        if self.noise_weights is not None and (
            output.ndim != 2 or output.shape[1] != self.noise_weights.numel()
        ):
            raise ValueError(
                f"a per-output sigma_noise of {self.noise_weights.numel()} entries "
                f"needs a model output [N, {self.noise_weights.numel()}], got "
                f"{list(output.shape)}."
            )

    # ----------------------------------------------------------------- losses
    def engine_loss(self) -> nn.Module:
        """The sum-reduced torch loss; its GGN on the scaled output is ``H``.

        See :meth:`output_scale`.
        """
        if self.kind is Likelihood.CLASSIFICATION:
            return nn.CrossEntropyLoss(reduction="sum")
        if self.kind is Likelihood.REGRESSION:
            return nn.MSELoss(reduction="sum")
        return nn.BCEWithLogitsLoss(reduction="sum")

    def output_scale(self) -> Tensor | None:
        r"""Scale :math:`\sqrt{w / 2}` of the output the engine sees (regression).

        ``MSELoss(reduction="sum")`` has output Hessian :math:`2 I`; on the output
        :math:`f' = \sqrt{w/2} \odot f` its GGN is :math:`J^\top
        \operatorname{diag}(w) J`, the unit loss's. ``None`` (no scaling) for the
        other likelihoods.
        """
        if self.kind is not Likelihood.REGRESSION:
            return None
        if self.noise_weights is None:  # in float64: no float32 rounding leaks in
            return torch.tensor(0.5, dtype=torch.float64).sqrt()
        return (self.noise_weights.double() / 2).sqrt()

    def loss_terms(self, output: Tensor, target: Tensor) -> Tensor:
        """Summed loss of a batch (regression: unweighted squared errors per output).

        Returns:
            A 0-d tensor, or ``[K]`` (sums of squared errors, regression).
        """
        output, target = output.detach(), target.detach()
        if self.kind is Likelihood.CLASSIFICATION:
            return nn.functional.cross_entropy(output, target, reduction="sum")
        if self.kind is Likelihood.BINARY:
            return nn.functional.binary_cross_entropy_with_logits(
                output, target, reduction="sum"
            )
        errors = (output - target).square()
        return errors.reshape(errors.shape[0], -1).sum(0)

    def unit_loss(self, loss: Tensor) -> Tensor:
        r"""The unit loss from accumulated :meth:`loss_terms` (a 0-d tensor).

        Regression: :math:`\tfrac12 \sum_k w_k \mathrm{SSE}_k`; else ``loss``.
        """
        if self.kind is not Likelihood.REGRESSION:
            return loss
        weights = 1.0 if self.noise_weights is None else self.noise_weights.to(loss)
        return 0.5 * (weights * loss).sum()

    # ------------------------------------------------------- output Hessians
    def output_hessian(self, output: Tensor) -> Tensor:
        r"""Per-sample :math:`\nabla_f^2 \ell` of the unit loss, ``[N, C, C]``.

        Args:
            output: ``[N, C]``.
        """
        if self.kind is Likelihood.CLASSIFICATION:
            prob = output.softmax(1)
            return torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
        return torch.diag_embed(self.output_hessian_diagonal(output))

    def output_gradient(self, output: Tensor, target: Tensor) -> Tensor:
        r"""Per-sample :math:`\nabla_f \ell` of the unit loss, like ``output``.

        Classification: :math:`\operatorname{softmax}(f) - e_y` (``[N, C]``);
        regression: :math:`w \odot (f - y)`; binary: :math:`\sigma(f) - y`.
        """
        if self.kind is Likelihood.CLASSIFICATION:
            onehot = nn.functional.one_hot(target, output.shape[1]).to(output)
            return output.softmax(1) - onehot
        if self.kind is Likelihood.BINARY:
            return torch.sigmoid(output) - target.reshape(output.shape)
        residual = output - target.reshape(output.shape)
        return residual if self.noise_weights is None else residual * self.noise_weights

    def output_hessian_diagonal(self, output: Tensor) -> Tensor:
        r"""Diagonal of :math:`\nabla_f^2 \ell` per sample, ``[N, C]``."""
        if self.kind is Likelihood.CLASSIFICATION:
            prob = output.softmax(1)
            return prob - prob.square()
        if self.kind is Likelihood.BINARY:
            prob = torch.sigmoid(output)
            return prob * (1 - prob)
        weights = (
            torch.ones(output.shape[1], dtype=output.dtype, device=output.device)
            if self.noise_weights is None
            else self.noise_weights
        )
        return weights.expand_as(output)

    # --------------------------------------------------------- log likelihood
    def log_likelihood(
        self,
        loss: Tensor,
        n_data: int,
        n_outputs: int,
        sigma_noise: Tensor,
        temperature: float,
    ) -> Tensor:
        r"""The log likelihood of the training data at the MAP.

        Args:
            loss: The accumulated :meth:`loss_terms`.
            n_data: Number of training points ``N``.
            n_outputs: Outputs per point ``K``.
            sigma_noise: Regression noise, 0-d or ``[K]`` (may carry gradients).
            temperature: :math:`T`.

        Returns:
            0-d; for regression
            :math:`-\frac{1}{T}\sum_k \frac{\mathrm{SSE}_k}{2\sigma_k^2}
            - N \sum_k \log(\sigma_k \sqrt{2\pi})`.
        """
        if self.kind is not Likelihood.REGRESSION:
            return -loss / temperature
        sigma = sigma_noise.expand(n_outputs)
        fit = (loss / (2 * sigma.square())).sum() / temperature
        normalizer = n_data * (sigma.log() + 0.5 * math.log(2 * math.pi)).sum()
        return -fit - normalizer
