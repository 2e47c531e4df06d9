r"""Loss functions: input checks and (exact or sampled) square roots of their Hessians.

For a loss :math:`\ell(f, y)` of the model output ``f`` (shape ``[N, *out]``) the
engine needs columns :math:`S` with :math:`\nabla_f^2 \ell = S S^\top`, stacked as
``[K, N, *out]``. All three supported losses have a Hessian that is block-diagonal
over samples and (apart from the class axis of cross-entropy) over output positions,
scaled by per-position weights :math:`a` and divided by the mean-reduction normaliser.

* ``CrossEntropyLoss`` (output ``[N, C, *T]``):
  :math:`\nabla^2 = a\,(\mathrm{diag}(p) - p p^\top)` per position, exact columns
  :math:`\sqrt{a\, p_c}\,(e_c - p)`, one per (class, position), or ``C - 1`` per
  position for quantities of :math:`S S^\top` only (:meth:`LossRule.gram_columns`);
  sampled columns :math:`\sqrt{a}\,(p - e_{\tilde y})` with
  :math:`\tilde y \sim \mathrm{Cat}(p)`.
* ``MSELoss`` (any shape): :math:`\nabla^2 = 2 I`; exact columns :math:`\sqrt 2 e_d`;
  sampled columns :math:`\sqrt 2\, \varepsilon`, :math:`\varepsilon\sim\mathcal N(0,I)`.
* ``BCEWithLogitsLoss`` (any shape): :math:`\nabla^2 = a\,\sigma(1-\sigma)`; exact
  columns :math:`\sqrt{a\sigma(1-\sigma)}\, e_d`; sampled columns
  :math:`\sqrt a (\sigma - \tilde y)`, :math:`\tilde y \sim \mathrm{Bern}(\sigma)`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _reduction(loss_func: nn.Module) -> str:
    reduction = loss_func.reduction
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"{type(loss_func).__name__}(reduction={reduction!r}) is not supported: "
            "use reduction='mean' or 'sum'."
        )
    return reduction


class LossRule:
    """Checks and Hessian square roots for one loss class."""

    def check(self, loss_func: nn.Module, output: Tensor, target: Tensor) -> None:
        """Raise a ``ValueError`` naming the problem if output/target do not fit."""
        raise NotImplementedError

    def normalizer(
        self, loss_func: nn.Module, output: Tensor, target: Tensor
    ) -> Tensor:
        """The divisor of ``reduction="mean"``: the mean loss is the sum over it.

        Default: the number of output entries (``MSELoss``, ``BCEWithLogitsLoss``).
        """
        return output.new_tensor(float(output.numel()))

    def num_columns(self, output: Tensor) -> int:
        """Number of exact square-root columns per sample."""
        raise NotImplementedError

    def exact_columns(
        self,
        loss_func: nn.Module,
        output: Tensor,
        target: Tensor,
        start: int,
        stop: int,
    ) -> Tensor:
        """Exact columns ``start`` to ``stop`` of the Hessian square root.

        Returns:
            Tensor of shape ``[stop - start, *output.shape]``.
        """
        raise NotImplementedError

    def num_gram_columns(self, output: Tensor) -> int:
        """Columns per sample of :meth:`gram_columns` (at most :meth:`num_columns`)."""
        return self.num_columns(output)

    def gram_columns(
        self,
        loss_func: nn.Module,
        output: Tensor,
        target: Tensor,
        start: int,
        stop: int,
    ) -> Tensor:
        """Columns ``start`` to ``stop`` of the exact factor with the fewest columns.

        ``S' S'^T`` is the loss Hessian as for :meth:`exact_columns`, but with as
        many columns as its rank needs where that is fewer (see NOTE [Fewest
        columns]); quantities that depend on the columns only through ``S S^T``
        (GGN diagonals and matrices, Kronecker factors) take these. Default: the
        exact columns.

        Returns:
            Tensor of shape ``[stop - start, *output.shape]``.
        """
        return self.exact_columns(loss_func, output, target, start, stop)

    def mc_columns(
        self,
        loss_func: nn.Module,
        output: Tensor,
        target: Tensor,
        mc_samples: int,
        generator: torch.Generator | None,
    ) -> Tensor:
        """Sampled columns ``[mc_samples, *output.shape]``, scaled by ``1/sqrt(M)``."""
        raise NotImplementedError


def diagonal_columns(values: Tensor, start: int, stop: int) -> Tensor:
    """Columns ``e_d * values[:, d]`` for flat output indices ``d`` in [start, stop)."""
    n = values.shape[0]
    flat = values.reshape(n, -1)
    cols = flat.new_zeros(stop - start, n, flat.shape[1])
    idx = torch.arange(start, stop, device=flat.device)
    cols[torch.arange(stop - start, device=flat.device), :, idx] = flat[:, idx].T
    return cols.reshape(stop - start, *values.shape)


class MSELossRule(LossRule):
    """Square roots for ``nn.MSELoss``: the Hessian is ``2/norm * I``."""

    def check(self, loss_func: nn.Module, output: Tensor, target: Tensor) -> None:  # noqa: D102
        _reduction(loss_func)
        if not target.is_floating_point():
            raise ValueError(
                f"MSELoss needs a floating-point target, got dtype {target.dtype}."
            )
        if target.shape != output.shape:
            raise ValueError(
                f"MSELoss target shape {tuple(target.shape)} does not match the model "
                f"output shape {tuple(output.shape)} (broadcasting is not supported)."
            )

    def num_columns(self, output: Tensor) -> int:  # noqa: D102
        return output[0].numel()

    def _scale(self, loss_func: nn.Module, output: Tensor) -> float:
        norm = output.numel() if _reduction(loss_func) == "mean" else 1
        return math.sqrt(2.0 / norm)

    def exact_columns(self, loss_func, output, target, start, stop):  # noqa: D102
        values = torch.full_like(output, self._scale(loss_func, output))
        return diagonal_columns(values, start, stop)

    def mc_columns(self, loss_func, output, target, mc_samples, generator):  # noqa: D102
        noise = torch.randn(
            mc_samples,
            *output.shape,
            generator=generator,
            device=output.device,
            dtype=output.dtype,
        )
        return noise * (self._scale(loss_func, output) / math.sqrt(mc_samples))


class BCEWithLogitsLossRule(LossRule):
    """Square roots for ``nn.BCEWithLogitsLoss`` (``weight`` and ``pos_weight`` too)."""

    def check(self, loss_func: nn.Module, output: Tensor, target: Tensor) -> None:  # noqa: D102
        _reduction(loss_func)
        if not target.is_floating_point():
            raise ValueError(
                "BCEWithLogitsLoss needs a floating-point target in [0, 1], got dtype "
                f"{target.dtype}."
            )
        if target.shape != output.shape:
            raise ValueError(
                f"BCEWithLogitsLoss target shape {tuple(target.shape)} does not match "
                f"the model output shape {tuple(output.shape)}."
            )

    def num_columns(self, output: Tensor) -> int:  # noqa: D102
        return output[0].numel()

    def _weights(self, loss_func: nn.Module, output: Tensor, target: Tensor) -> Tensor:
        """Per-entry Hessian weight ``a`` divided by the reduction normaliser."""
        a = torch.ones_like(output)
        if loss_func.pos_weight is not None:
            a = a * (loss_func.pos_weight * target + 1 - target)
        if loss_func.weight is not None:
            a = a * loss_func.weight
        if _reduction(loss_func) == "mean":
            a = a / output.numel()
        return a

    def exact_columns(self, loss_func, output, target, start, stop):  # noqa: D102
        prob = torch.sigmoid(output)
        values = (self._weights(loss_func, output, target) * prob * (1 - prob)).sqrt()
        return diagonal_columns(values, start, stop)

    def mc_columns(self, loss_func, output, target, mc_samples, generator):  # noqa: D102
        prob = torch.sigmoid(output).expand(mc_samples, *output.shape)
        sampled = torch.bernoulli(prob, generator=generator)
        scale = self._weights(loss_func, output, target).sqrt() / math.sqrt(mc_samples)
        return (prob - sampled) * scale


class CrossEntropyLossRule(LossRule):
    """Square roots for ``nn.CrossEntropyLoss``.

    Supports class-index and probability targets, ``weight``, ``ignore_index`` and
    ``label_smoothing``; the class axis is dimension 1 (``[N, C, *T]``).
    """

    def check(self, loss_func: nn.Module, output: Tensor, target: Tensor) -> None:  # noqa: D102
        _reduction(loss_func)
        if output.dim() < 2:
            raise ValueError(
                "CrossEntropyLoss needs a model output of shape [N, C, *T], got shape "
                f"{tuple(output.shape)}."
            )
        expected = (output.shape[0], *output.shape[2:])
        if target.is_floating_point():
            if target.shape != output.shape:
                raise ValueError(
                    f"CrossEntropyLoss probability target shape {tuple(target.shape)} "
                    f"does not match the model output shape {tuple(output.shape)}."
                )
        elif target.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
            if tuple(target.shape) != expected:
                raise ValueError(
                    f"CrossEntropyLoss class-index target shape {tuple(target.shape)} "
                    f"does not match {expected} expected for output shape "
                    f"{tuple(output.shape)}."
                )
            _check_classes(loss_func, output.shape[1], target)
        else:
            raise ValueError(
                "CrossEntropyLoss needs integer class indices or float probabilities "
                f"as target, got dtype {target.dtype}."
            )

    def num_columns(self, output: Tensor) -> int:  # noqa: D102
        return output[0].numel()

    def _weights(self, loss_func: nn.Module, output: Tensor, target: Tensor) -> Tensor:
        """Per-position Hessian weight ``a`` over the normaliser, shape ``[N, *T]``."""
        num_classes = output.shape[1]
        eps = loss_func.label_smoothing
        weight = loss_func.weight
        if weight is None:
            weight = output.new_ones(num_classes)
        if target.is_floating_point():
            smoothed = target * (1 - eps) + eps / num_classes
            w_shape = (1, num_classes) + (1,) * (output.dim() - 2)
            a = (smoothed * weight.reshape(w_shape)).sum(1)
        else:
            valid = target != loss_func.ignore_index
            w_target = self._target_weights(loss_func, weight, target)
            a = (1 - eps) * w_target + eps / num_classes * weight.sum() * valid
        if _reduction(loss_func) == "mean":
            a = a / self.normalizer(loss_func, output, target)
        return a

    @staticmethod
    def _target_weights(loss_func: nn.Module, weight: Tensor, target: Tensor) -> Tensor:
        """Class weight of each class-index target, 0 where it is ``ignore_index``."""
        valid = target != loss_func.ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target)).long()
        return weight[safe] * valid

    def normalizer(self, loss_func, output, target):
        """Positions for probability targets, else the summed target class weights."""
        if target.is_floating_point():
            return output.new_tensor(float(output[:, 0].numel()))
        weight = loss_func.weight
        if weight is None:
            weight = output.new_ones(output.shape[1])
        return self._target_weights(loss_func, weight, target).sum()

    def exact_columns(self, loss_func, output, target, start, stop):  # noqa: D102
        prob = output.softmax(1)
        a = self._weights(loss_func, output, target).unsqueeze(1)
        num_classes, n = output.shape[1], output.shape[0]
        positions = output[0, 0].numel()
        # column k <-> (class c, flat position t) with k = c * positions + t
        ks = torch.arange(start, stop, device=output.device)
        cs, ts = ks // positions, ks % positions
        p_flat = prob.reshape(n, num_classes, positions)
        a_flat = a.reshape(n, 1, positions)
        # [K, N, C] values at the column's own position
        p_at = p_flat[:, :, ts].permute(2, 0, 1)
        sqrt_pc = p_at.gather(2, cs.view(-1, 1, 1).expand(-1, n, 1)).sqrt()
        onehot = torch.nn.functional.one_hot(cs, num_classes).to(prob.dtype)
        vals = (onehot.unsqueeze(1) - p_at) * sqrt_pc
        vals = vals * a_flat[:, 0, ts].T.sqrt().unsqueeze(-1)
        cols = output.new_zeros(stop - start, n, num_classes, positions)
        cols[torch.arange(stop - start, device=output.device), :, :, ts] = vals
        return cols.reshape(stop - start, *output.shape)

    # NOTE [Fewest columns]
    # The cross-entropy Hessian a (diag(p) - p p^T) at one position has rank C - 1
    # (p sums to 1, so the ones vector is in its null space), but its exact columns
    # sqrt(a p_c) (e_c - p) are C. With u = sqrt(p) (a unit vector) and
    # D = diag(u): diag(p) - p p^T = D (I - u u^T) D = D Q Q^T D for any
    # orthonormal basis Q [C, C - 1] of u's complement. The Householder reflection
    # H = I - 2 v v^T / (v^T v), v = u + e_C, maps u to -e_C (v^T v >= 2, so no
    # cancellation), and its first C - 1 columns are such a Q:
    # Q_ij = delta_ij - w v_i u_j with w = 2 / (v^T v). The columns sqrt(a) D Q
    # are C - 1 per position; every pull-back and Gram product of the GGN
    # diagonal, matrix and Kronecker factors shrinks by (C - 1) / C: half for
    # binary softmax classifiers (one column, sqrt(a p_1 p_2) (e_1 - e_2)).
    def num_gram_columns(self, output: Tensor) -> int:  # noqa: D102
        if output.shape[1] < 2:  # one class: a zero Hessian, keep one column
            return self.num_columns(output)
        return (output.shape[1] - 1) * output[0, 0].numel()

    def gram_columns(self, loss_func, output, target, start, stop):
        """See NOTE [Fewest columns]."""
        num_classes, n = output.shape[1], output.shape[0]
        if num_classes < 2:
            return self.exact_columns(loss_func, output, target, start, stop)
        positions = output[0, 0].numel()
        u = output.softmax(1).sqrt().reshape(n, num_classes, positions)
        v = u.clone()
        v[:, -1] += 1
        w = 2 / v.square().sum(1)  # [N, positions]
        a = self._weights(loss_func, output, target).reshape(n, positions)
        # column k <-> (basis vector j < C - 1, flat position t), k = j * positions + t
        ks = torch.arange(start, stop, device=output.device)
        js, ts = ks // positions, ks % positions
        u_at = u[:, :, ts].permute(2, 0, 1)  # [K, N, C]
        v_at = v[:, :, ts].permute(2, 0, 1)
        u_j = u_at.gather(2, js.view(-1, 1, 1).expand(-1, n, 1))
        onehot = torch.nn.functional.one_hot(js, num_classes).to(u.dtype)
        basis = onehot.unsqueeze(1) - (w[:, ts].T.unsqueeze(-1) * u_j) * v_at
        vals = u_at * basis * a[:, ts].T.sqrt().unsqueeze(-1)
        cols = output.new_zeros(stop - start, n, num_classes, positions)
        cols[torch.arange(stop - start, device=output.device), :, :, ts] = vals
        return cols.reshape(stop - start, *output.shape)

    def mc_columns(self, loss_func, output, target, mc_samples, generator):  # noqa: D102
        prob = output.softmax(1)
        num_classes = output.shape[1]
        p_last = prob.movedim(1, -1).reshape(-1, num_classes)
        draws = torch.multinomial(
            p_last, mc_samples, replacement=True, generator=generator
        )
        onehot = torch.nn.functional.one_hot(draws.T, num_classes).to(prob.dtype)
        moved_shape = prob.movedim(1, -1).shape
        onehot = onehot.reshape(mc_samples, *moved_shape).movedim(-1, 2)
        a = self._weights(loss_func, output, target).unsqueeze(1)
        return (prob - onehot) * (a.sqrt() / math.sqrt(mc_samples))


LOSS_RULES: dict[type[nn.Module], LossRule] = {
    nn.CrossEntropyLoss: CrossEntropyLossRule(),
    nn.MSELoss: MSELossRule(),
    nn.BCEWithLogitsLoss: BCEWithLogitsLossRule(),
}


def loss_rule(loss_func: nn.Module) -> LossRule:
    """Look up the rule of a loss module, raising a clear error if unsupported."""
    rule = LOSS_RULES.get(type(loss_func))
    if rule is None:
        supported = ", ".join(cls.__name__ for cls in LOSS_RULES)
        raise NotImplementedError(
            f"Loss {type(loss_func).__name__} is not supported; supported losses: "
            f"{supported}."
        )
    return rule


def _check_classes(loss_func: nn.Module, num_classes: int, target: Tensor) -> None:
    """Class indices must lie in ``[0, C)`` or equal ``ignore_index``.

    Raises:
        ValueError: Naming the first bad target and its position.
    """
    bad = (target != loss_func.ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"CrossEntropyLoss class-index targets must lie in [0, C={num_classes}) "
            f"(the output's axis 1) or equal ignore_index={loss_func.ignore_index}; "
            f"got {int(target[first])} at {first}."
        )
