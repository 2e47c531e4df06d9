r"""Square roots of the per-sample output Hessians, :math:`W_n = R_n R_n^\top`.

The function-space posterior never inverts :math:`W_n = \nabla_f^2 \ell_n` (the
softmax's is singular: :math:`W_n \mathbf 1 = 0`); it uses a root :math:`R_n` in

.. math::
    J_*\big(\Sigma_0^{-1} + J^\top W J\big)^{-1} J_*^\top
    = K_{**} - K_{*X} R\, (I + R^\top K_{XX} R)^{-1} R^\top K_{X*}

(Woodbury, with :math:`R = \operatorname{blockdiag}(R_n)`) and
:math:`\det(I + \Sigma_0 J^\top W J) = \det(I + R^\top K_{XX} R)` (Sylvester).

* classification: :math:`R_n = \operatorname{diag}(\sqrt{p}) - p \sqrt{p}^\top`
  (:math:`R_n R_n^\top = \operatorname{diag}(p) - p p^\top` since
  :math:`\sum_c p_c = 1`);
* regression and binary: the diagonal :math:`\sqrt{\operatorname{diag} W_n}`.

With ``independent`` outputs only the diagonal of :math:`W_n` is kept (a GP per
output), as laplace-torch does.

Example:
    >>> import torch
    >>> from bayescurv.laplace.enums import Likelihood
    >>> from bayescurv.laplace.likelihoods import LikelihoodModel
    >>> f = torch.tensor([[0.3, -1.0, 2.0]], dtype=torch.float64)
    >>> like = LikelihoodModel(Likelihood.CLASSIFICATION)
    >>> root = output_hessian_root(like, f)
    >>> torch.allclose(root @ root.mT, like.output_hessian(f))
    True
"""

from __future__ import annotations

from torch import Tensor

from bayescurv.laplace.enums import Likelihood
from bayescurv.laplace.likelihoods import LikelihoodModel


def output_hessian_root(
    likelihood: LikelihoodModel, output: Tensor, independent: bool = False
) -> Tensor:
    r"""A root :math:`R_n` with :math:`R_n R_n^\top = W_n` per sample.

    Args:
        likelihood: The likelihood (its unit loss's output Hessian).
        output: The network outputs :math:`f_n` at the MAP, ``[N, C]``.
        independent: The root of the diagonal of :math:`W_n` only.

    Returns:
        ``[N, C, C]``, or ``[N, C]`` (a diagonal root) for regression, binary or
        ``independent``.
    """
    if likelihood.kind is Likelihood.CLASSIFICATION and not independent:
        prob = output.softmax(-1)
        root = prob.sqrt()
        return root.diag_embed() - prob[:, :, None] * root[:, None, :]
    return likelihood.output_hessian_diagonal(output).clamp_min(0).sqrt()
