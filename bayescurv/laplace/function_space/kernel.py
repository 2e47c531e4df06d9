r"""The empirical NTK as a ``gpytorch`` kernel on (input, output) rows.

gpytorch's models are single-output GPs on ``[n, d]`` inputs; the linearized
network is a GP on rows (input :math:`x`, output :math:`c`). A row is encoded as
the flattened input followed by the output index, ``z = [vec(x), c]``
(:func:`encode_rows`), so every gpytorch model, marginal likelihood and variational
strategy works with :class:`NTKKernel` unchanged:

.. math::
    k(z, z') = J_c(x)\, \Sigma_0\, J_{c'}(x')^\top,
    \qquad \Sigma_0 = \operatorname{blockdiag}(v_b I) / \kappa,

computed matrix-free from the source's (factored) Jacobians (:mod:`.rows`), never
as an ``[n, P]`` Jacobian beyond one chunk of inputs. Each distinct input's
Jacobian is computed once per call, however many of its outputs appear.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from bayescurv.laplace.enums import Likelihood
    >>> from bayescurv.laplace.likelihoods import LikelihoodModel
    >>> from bayescurv.laplace.sources import EngineSource, SourceOptions
    >>> model = nn.Linear(2, 1, bias=False).double()
    >>> like = LikelihoodModel(Likelihood.REGRESSION)
    >>> source = EngineSource(model, like, SourceOptions())
    >>> kernel = NTKKernel(source, (2,), [2], torch.tensor([0.5]).double())
    >>> x = torch.tensor([[1.0, 2.0], [3.0, 0.0]]).double()
    >>> kernel(encode_rows(x, 1)).to_dense()  # x x^T / 2 for a linear model
    tensor([[2.5000, 1.5000],
            [1.5000, 4.5000]], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Sequence

import gpytorch
import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from bayescurv.laplace.function_space.rows import (
    JacobianRows,
    concat_rows,
    ntk,
    ntk_diagonal,
)
from bayescurv.laplace.sources import CurvatureSource


def encode_rows(inputs: Tensor, outputs: int | Tensor) -> Tensor:
    """Rows ``[vec(x), c]`` of every (input, output) pair, sample-major.

    Args:
        inputs: ``[N, *shape]``.
        outputs: ``C`` (every output of every input), or the output of every input
            ``[N]``.

    Returns:
        ``[N C, d + 1]`` (or ``[N, d + 1]``).
    """
    flat = inputs.reshape(inputs.shape[0], -1)
    if isinstance(outputs, Tensor):
        return torch.cat([flat, outputs.to(flat)[:, None]], dim=1)
    index = torch.arange(outputs, dtype=flat.dtype, device=flat.device)
    repeated = flat.repeat_interleave(outputs, dim=0)
    return torch.cat([repeated, index.repeat(len(flat))[:, None]], dim=1)


def decode_rows(
    rows: Tensor, input_shape: Sequence[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """Distinct inputs ``[U, *shape]``, each row's input index and output index."""
    flat, outputs = rows[:, :-1], rows[:, -1].round().long()
    unique, index = torch.unique(flat, dim=0, return_inverse=True)
    return unique.reshape(len(unique), *input_shape), index, outputs


class NTKKernel(gpytorch.kernels.Kernel):
    r"""The empirical NTK :math:`J \Sigma_0 J^\top` on encoded rows (module doc).

    Args:
        source: The weight subset's curvature source (its Jacobians).
        input_shape: One input's shape (rows are decoded to ``[U, *shape]``).
        block_sizes: Entries per parameter tensor.
        variances: Prior variance :math:`v_b` per parameter tensor, ``[B]``.
        independent: No kernel between different outputs.
        learn_scale: Register :math:`\log\kappa` (a common factor on the prior
            precision, initially 0) as a trainable hyperparameter.
    """

    is_stationary = False

    def __init__(
        self,
        source: CurvatureSource,
        input_shape: Sequence[int],
        block_sizes: Sequence[int],
        variances: Tensor,
        independent: bool = False,
        learn_scale: bool = False,
    ) -> None:
        super().__init__()
        self.source = source
        self.input_shape = tuple(input_shape)
        self.block_sizes = list(block_sizes)
        self.register_buffer("variances", variances.detach().clone())
        self.independent = independent
        log_scale = torch.zeros((), dtype=variances.dtype, device=variances.device)
        if learn_scale:
            self.register_parameter(
                "log_precision_factor", torch.nn.Parameter(log_scale)
            )
        else:
            self.register_buffer("log_precision_factor", log_scale)

    @property
    def scaled_variances(self) -> Tensor:
        r""":math:`v_b / \kappa`."""
        return self.variances * torch.exp(-self.log_precision_factor)

    def rows(self, encoded: Tensor) -> JacobianRows:
        """The Jacobian rows of encoded rows (one Jacobian pass per distinct input)."""
        inputs, index, outputs = decode_rows(encoded, self.input_shape)
        parts, offset = [], 0
        with torch.set_grad_enabled(self.source.needs_grad or torch.is_grad_enabled()):
            for _, jac in self.source.jacobian_segments(inputs):
                count = jac.num_samples
                chosen = (index >= offset) & (index < offset + count)
                where = torch.nonzero(chosen).flatten()
                if len(where):
                    rows = JacobianRows.select(
                        jac, self.block_sizes, index[where] - offset, outputs[where]
                    )
                    parts.append((where, rows))
                offset += count
        return _merge(parts, len(index))

    def forward(  # noqa: D102
        self,
        x1: Tensor,
        x2: Tensor,
        diag: bool = False,
        last_dim_is_batch: bool = False,
        **params: object,
    ) -> Tensor | LinearOperator:
        if last_dim_is_batch or x1.ndim != 2 or x2.ndim != 2:
            raise ValueError(
                "NTKKernel takes encoded rows [n, d + 1] (see encode_rows); batch "
                "dimensions are not supported."
            )
        variances = self.scaled_variances
        first = self.rows(x1)
        if diag:
            return ntk_diagonal(first, variances)
        second = first if x2 is x1 or torch.equal(x1, x2) else self.rows(x2)
        return ntk(first, second, variances, self.independent)

    def num_outputs_per_input(self, x1: Tensor, x2: Tensor) -> int:  # noqa: D102
        return 1


def _merge(parts: list[tuple[Tensor, JacobianRows]], count: int) -> JacobianRows:
    """Rows of several chunks back in the requested order."""
    if len(parts) == 1 and len(parts[0][0]) == count:
        return parts[0][1]  # one chunk holds every row, in order
    where = torch.cat([w for w, _ in parts])
    order = torch.empty_like(where)
    order[where] = torch.arange(len(where), device=where.device)
    merged = concat_rows([rows for _, rows in parts])
    return merged.take(order)
