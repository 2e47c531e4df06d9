r"""Kronecker factors inside :func:`~bayescurv.engine.backprop`.

The input factors ``A`` depend only on the recorded layer inputs and are built once
per layer call, before any column is pulled back. The output factors ``B`` are
accumulated chunk by chunk from the pulled-back columns the other extensions of the
same column source use as well, so KFLR shares its columns with ``DiagGGNExact`` and
KFAC with ``DiagGGNMC`` of the same ``mc_samples``. ``KFRA`` needs no columns; it is
computed right after the forward pass (:mod:`bayescurv.engine.kfra`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from bayescurv.engine.extensions import Columns, Extension
from bayescurv.engine.kfra import kfra_factors
from bayescurv.engine.kron import KFAC, KFLR, KFRA
from bayescurv.engine.losses import LossRule
from bayescurv.engine.recording import Layer, Record, zeros_like_columns
from bayescurv.engine.rules.kron_stats import InputStats, KFACApprox, outer_products

_Source = tuple[Columns, int]
_Stats = tuple[KFACApprox, torch.dtype | None]  # (approximation, accumulation dtype)
_Key = tuple[_Source, KFACApprox, torch.dtype | None]


class KronFactors:
    """Kronecker factors of the KFAC/KFLR/KFRA extensions of one ``backprop`` call.

    Args:
        extensions: All requested extensions (others are ignored).
        layers: The model's parameterized layers.
        records: The recorded layer calls of the forward pass.
        kfra_args: ``(model, loss_func, loss_rule, output, targets, inputs)`` for
            KFRA (``inputs`` the tuple of model inputs).
    """

    def __init__(
        self,
        extensions: Sequence[Extension],
        layers: list[Layer],
        records: list[Record],
        kfra_args: tuple[nn.Module, nn.Module, LossRule, Tensor, Tensor, tuple],
    ) -> None:
        self.layers, self.records = layers, records
        self.batch_size = kfra_args[3].shape[0]
        self.keys: set[_Key] = {
            ((ext.columns, ext.mc_samples), ext.kfac_approx, ext.dtype)
            for ext in extensions
            if isinstance(ext, (KFAC, KFLR))
        }
        kinds = {(approx, dtype) for _, approx, dtype in self.keys}
        self.inputs = {kind: self._input_stats(*kind) for kind in kinds}
        self.outputs: dict[_Key, dict[nn.Parameter, Tensor]] = {
            key: {} for key in self.keys
        }
        self.calls: dict[nn.Parameter, int] = {}
        for rec in records:
            for p in rec.params.values():
                self.calls[p] = self.calls.get(p, 0) + 1
        self.kfra = None
        if any(isinstance(ext, KFRA) for ext in extensions):
            kfra = next(ext for ext in extensions if isinstance(ext, KFRA))
            self.kfra = kfra_factors(*kfra_args, records, dtype=kfra.dtype)

    def _input_stats(
        self, approx: KFACApprox, dtype: torch.dtype | None
    ) -> dict[nn.Parameter, InputStats]:
        """Input statistics of every weight, merged over the calls of shared weights.

        Formed in the accumulation ``dtype`` right after each rule returns (see
        NOTE [Gram matrices in the accumulation dtype]).
        """
        stats: dict[nn.Parameter, InputStats] = {}
        seen: set[nn.Parameter] = set()
        for rec in self.records:
            local = rec.rule.kron_input(rec.module, rec.inputs, approx)
            for name, p in rec.params.items():
                if p in seen and (p in stats) != (name in local):
                    raise _mixed_layouts(p, self.layers)
                seen.add(p)
                if name not in local:
                    continue
                current = local[name].accumulated(dtype).folded(rec.fold)
                if p in stats:
                    if (stats[p].input_first, stats[p].groups) != (
                        current.input_first,
                        current.groups,
                    ):
                        raise _mixed_layouts(p, self.layers)
                    stats[p] = stats[p].merge(current)
                else:
                    stats[p] = current
        return stats

    def consumer(self, source: _Source) -> Callable[[list[Tensor | None]], None] | None:
        """A function taking each chunk of pulled-back columns, or ``None``."""
        kinds = [(approx, dtype) for src, approx, dtype in self.keys if src == source]
        if not kinds:
            return None
        return lambda pulled: self._add_chunk(source, kinds, pulled)

    def _add_chunk(
        self,
        source: _Source,
        kinds: list[_Stats],
        pulled: list[Tensor | None],
    ) -> None:
        """Add one chunk's contributions to the ``B`` factors.

        Output vectors of a parameter without an input factor, or of a weight under
        ``reduce``, are summed over positions *and calls* before the outer product
        (see NOTE [Kronecker factors of weight-shared layers]).
        """
        num_columns = next((g.shape[0] for g in pulled if g is not None), 1)
        for kind in kinds:
            acc = self.outputs[(source, *kind)]
            summed: dict[nn.Parameter, Tensor] = {}
            for rec, g in zip(self.records, pulled, strict=True):
                columns = zeros_like_columns(num_columns, rec) if g is None else g
                self._add_call(rec, columns, kind, acc, summed)
            for p, s in summed.items():
                _add(acc, p, outer_products(s.unsqueeze(2), kind[1]))

    def _add_call(
        self,
        rec: Record,
        columns: Tensor,
        kind: _Stats,
        acc: dict[nn.Parameter, Tensor],
        summed: dict[nn.Parameter, Tensor],
    ) -> None:
        """Outer products of one call into ``acc``; shared vectors into ``summed``."""
        approx, dtype = kind
        vectors = rec.rule.kron_output(rec.module, rec.inputs, columns)
        if rec.fold > 1:  # k rows per sample: k R positions of one sample
            vectors = _fold_rows(vectors, rec.fold)
        cache: dict[tuple[int, bool], Tensor] = {}  # weight and bias share columns
        for name, p in rec.params.items():
            c = vectors[name]
            expand = approx == KFACApprox.EXPAND and p in self.inputs[kind]
            if self.calls[p] > 1 and not expand:
                s = c.sum(2)
                summed[p] = summed[p] + s if p in summed else s
                continue
            key = (id(c), expand and c.shape[2] > 1)
            if key not in cache:
                vecs = c if key[1] else c.sum(2, keepdim=True)
                cache[key] = outer_products(vecs, dtype)
            _add(acc, p, cache[key])

    def handles(self, ext: Extension) -> bool:
        """Whether ``ext`` is a Kronecker extension."""
        return isinstance(ext, (KFAC, KFLR, KFRA))

    def result(
        self, ext: Extension, names: dict[nn.Parameter, str]
    ) -> dict[str, list[Tensor]]:
        """``parameter name -> factors`` of a Kronecker extension."""
        if isinstance(ext, KFRA):
            return {names[p]: factors for p, factors in self.kfra.items()}
        kind = (ext.kfac_approx, ext.dtype)
        stats, acc = (
            self.inputs[kind],
            self.outputs[((ext.columns, ext.mc_samples), *kind)],
        )
        # statistics that no other Kronecker extension or parameter shares become
        # factors in place
        single = sum(key[1:] == kind for key in self.keys) == 1
        moments = Counter(id(st.moment) for st in stats.values())
        out = {}
        for layer in self.layers:
            for local, p in layer.params.items():
                if p not in acc:  # layer not called in this forward pass
                    zeros = layer.rule.kron_zeros(layer.module, local, ext.kfac_approx)
                    out[names[p]] = [z.to(ext.dtype or z.dtype) for z in zeros]
                elif p not in stats:
                    out[names[p]] = [acc[p]]
                else:
                    last_use = single and moments[id(stats[p].moment)] == 1
                    a = stats[p].factor(self.batch_size, last_use)
                    out[names[p]] = [a, acc[p]] if stats[p].input_first else [acc[p], a]
        return out


def _fold_rows(vectors: dict[str, Tensor], fold: int) -> dict[str, Tensor]:
    """Output vectors ``[V, k N, R, *d]`` as ``[V, N, k R, *d]`` (``k`` = fold).

    Parameters that share one tensor keep sharing it (outer products are cached by
    tensor).
    """
    by_id: dict[int, Tensor] = {}
    for c in vectors.values():
        if id(c) not in by_id:
            by_id[id(c)] = c.reshape(c.shape[0], -1, fold * c.shape[2], *c.shape[3:])
    return {name: by_id[id(c)] for name, c in vectors.items()}


def _add(acc: dict[nn.Parameter, Tensor], p: nn.Parameter, value: Tensor) -> None:
    acc[p] = acc[p] + value if p in acc else value


def _mixed_layouts(p: nn.Parameter, layers: list[Layer]) -> NotImplementedError:
    owners = sorted(
        {
            type(layer.module).__name__
            for layer in layers
            if any(q is p for q in layer.params.values())
        }
    )
    return NotImplementedError(
        f"A parameter of shape {tuple(p.shape)} is shared by layers "
        f"({', '.join(owners)}) whose Kronecker factors have different layouts; their "
        "sum is not one "
        "Kronecker product. Use a diagonal extension for this model."
    )
