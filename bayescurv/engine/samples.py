r"""Which rows of a layer's output belong to which sample, and a probe that checks it.

Per-sample quantities (and every curvature the engine builds from them: GGN
diagonals, Kronecker factors, the dense GGN, Jacobians) assume that row ``n`` of every
recorded layer output belongs to sample ``n`` and that samples do not interact. Two
things break that without any shape error: a layer that sees the batch on a
non-leading axis whose size happens to equal ``N`` (a transposed ``[T, N, d]`` input
with ``T = N``), and operations that mix samples (``x - x.mean(0)``, attention over
the batch axis). Both would give silently wrong numbers; the probe below turns them
into an error naming the layer.

**Folded batch axes.** A layer whose output has ``k N`` rows (``x.reshape(-1, d)`` on
``[N, k, d]``, e.g. the pairs of reward modeling) is treated as seeing ``k``
consecutive rows per sample, like ``k`` positions of a sequence: the rows
``n k, ..., n k + k - 1`` belong to sample ``n`` and their per-sample vectors are
summed before any square. The probe checks that the rows really are sample-contiguous
(a transpose before the reshape makes them interleaved and raises).

# NOTE [The sample-separability probe]
# With S the even samples and S' the odd ones, two output columns u * 1_S and u * 1_S'
# are pulled back to every recorded layer output (u random, or the loss gradient for
# first-order extensions, which then get their pull-back as the sum). If every
# row belongs to one sample and samples do not interact, the rows owned by samples
# outside S receive exact zeros from the first column (and likewise for S'): every
# backward op is linear in its upstream gradient and a row only ever combines
# entries of its own sample, so no round-off can make them nonzero. Any nonzero entry
# there is a cross-sample dependence. This detects every coupling between samples of
# different parity: every transposed layout (a row then holds all samples), every
# op that mixes all samples (batch means, batch statistics), and interleaved folds.
# Couplings only between samples of the same parity (torch.roll(x, 2, 0)) are not
# detected. Cost: two plain backward passes to the recorded outputs (no parameter
# gradients); one for first-order extensions, whose gradient pass it replaces.
#
# NOTE [Chains that need no probe]
# A plain nn.Sequential (nested ones included, no subclass that could override
# forward) of modules that act on each sample on its own -- Linear, convolutions,
# eval-mode BatchNorm, Embedding, pooling, element-wise activations, Dropout,
# Identity, and Flatten from axis 1 on -- maps row n of its input to row n of every
# layer output, whatever the values: separability holds by construction, and the
# probe (0.1 to 0.9 gradient steps on the benchmark MLP and 3C3D) is skipped. Padding
# modules and Unflatten can act on the batch axis of low-dimensional inputs and keep
# the probe; so does every other model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bayescurv.engine.hessian.chain import CHAIN_MODULES, PADDING
from bayescurv.engine.recording import Record

_PER_SAMPLE = (frozenset(CHAIN_MODULES) - {*PADDING, nn.Flatten, nn.Unflatten}) | {
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
}
"""Module types (exact) that never mix rows of their input (see NOTE [Chains that
need no probe]); BatchNorm only in eval mode, Flatten only from axis 1 on."""


def separable_by_construction(model: nn.Module, records: list[Record]) -> bool:
    """Whether the model is a chain whose rows belong to samples by construction.

    See NOTE [Chains that need no probe]; such models skip the probe.
    """
    if type(model) is not nn.Sequential or any(rec.fold != 1 for rec in records):
        return False
    # a convolution on an unbatched input mixes rows (they are its channels): only
    # recorded ones, whose input shape is known to be batched, are trusted
    batched = {
        id(rec.module)
        for rec in records
        if not isinstance(rec.module, nn.modules.conv._ConvNd)
        or rec.inputs[0].dim() == len(rec.module.kernel_size) + 2
    }
    return all(_per_sample_module(m, batched) for m in model)


def _per_sample_module(module: nn.Module, batched: set[int]) -> bool:
    if type(module) is nn.Sequential:
        return all(_per_sample_module(m, batched) for m in module)
    if type(module) is nn.Flatten:
        return module.start_dim >= 1
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
        return False
    if isinstance(module, nn.modules.conv._ConvNd) and id(module) not in batched:
        return False
    return type(module) in _PER_SAMPLE


def assign_folds(records: list[Record], batch_size: int, model: nn.Module) -> None:
    """Set ``Record.fold`` (rows per sample) of every record, or raise.

    Raises:
        ValueError: If a recorded output has no rows or a number of rows that is not
            a multiple of the batch size.
    """
    for rec in records:
        rows = rec.output.shape[0] if rec.output.dim() else 0
        if rows and rows % batch_size == 0:
            rec.fold = rows // batch_size
            continue
        raise ValueError(
            f"{layer_name(rec.module, model)} produced an output of shape "
            f"{tuple(rec.output.shape)} (batch axis first), but the model output has "
            f"batch size {batch_size}: the engine needs the batch on the leading axis "
            "of every parameterized layer's input and output (or on the axis its "
            "rule declares, e.g. batch_first=False), possibly folded with other "
            "axes sample-major (k consecutive rows per sample)."
        )


def check_separable(output: Tensor, records: list[Record], model: nn.Module) -> None:
    """Raise if a recorded row depends on another sample (see the module NOTE).

    Pulls two random output columns, one on the even and one on the odd samples,
    back to every recorded output.

    Args:
        output: The model output ``[N, ...]`` (with its graph).
        records: The recorded layer calls, with ``fold`` set.
        model: The model (to name layers in the error).

    Raises:
        ValueError: Naming the layer, the sample and the row.
    """
    if output.shape[0] < 2 or not records:
        return
    gen = torch.Generator(device=output.device).manual_seed(0)
    u = torch.randn(output.shape, generator=gen, dtype=output.dtype).to(output.device)
    pull_back_by_halves(output, records, u, model, create_graph=False)


def pull_back_by_halves(
    output: Tensor,
    records: list[Record],
    column: Tensor,
    model: nn.Module,
    create_graph: bool,
) -> list[Tensor | None]:
    """Pull ``column`` back to every recorded output as the sum of its two halves.

    The column restricted to the even samples and the one restricted to the odd
    samples are pulled back one after the other (two plain backward passes are
    cheaper than one batched pass of two columns), their rows checked (see the module
    NOTE), and added: for separable samples every row receives one exact part and one
    exact zero, so the sum is the pull-back of ``column`` itself. The first-order
    extensions use this for the loss gradient, which makes the probe cost one
    backward pass to the recorded outputs.

    Returns:
        ``column`` pulled back to each recorded output, ``None`` where the output does
        not depend on it. The graph is retained.

    Raises:
        ValueError: If a row depends on another sample.
    """
    n = output.shape[0]
    if n < 2:  # one sample owns every row
        return list(
            torch.autograd.grad(
                output,
                [rec.output for rec in records],
                grad_outputs=column,
                retain_graph=True,
                create_graph=create_graph,
                allow_unused=True,
            )
        )
    even = torch.arange(n, device=output.device) % 2 == 0
    masks = torch.stack([even, ~even])  # [2, N]
    shape = (n,) + (1,) * (output.dim() - 1)
    total: list[Tensor | None] = [None] * len(records)
    for half, mask in enumerate(masks):  # 0: even samples, 1: odd
        pulled = torch.autograd.grad(
            output,
            [rec.output for rec in records],
            grad_outputs=column * mask.reshape(shape).to(column.dtype),
            retain_graph=True,
            create_graph=create_graph,
            allow_unused=True,
        )
        for i, (rec, g) in enumerate(zip(records, pulled, strict=True)):
            if g is None:
                continue
            _check_rows(rec, g.detach(), half, model)
            total[i] = g if total[i] is None else total[i] + g
    return total


def _check_rows(rec: Record, g: Tensor, half: int, model: nn.Module) -> None:
    """Rows owned by the samples of the other half must receive exact zeros.

    ``half`` 0 probed the even samples, 1 the odd ones.
    """
    rows = g.shape[0]
    # [N, fold, rest]; the other half's samples as a strided view, no copy
    per_sample = g.reshape(rows // rec.fold, rec.fold, -1)
    other = per_sample[1 - half :: 2]
    if not other.any():  # the common case: one pass over half the rows
        return
    # NaN can come from 0 * inf within a row (e.g. sqrt at 0), never from another row
    reached = (other.ne(0) & ~other.isnan()).any(-1)  # [N / 2, fold]
    if not reached.any():
        return
    sample, offset = (int(i) for i in reached.nonzero()[0])
    row = (2 * sample + 1 - half) * rec.fold + offset
    owner = row // rec.fold
    half_name = "even" if half == 0 else "odd"
    where = layer_name(rec.module, model)
    if rec.fold > 1:
        raise ValueError(
            f"{where} has {rows} output rows for a batch of "
            f"{rows // rec.fold}, which the engine reads as a folded batch axis "
            f"({rec.fold} consecutive rows per sample, as x.reshape(N * k, d) of an "
            f"[N, k, d] tensor gives); but the {half_name} samples reach row {row}, "
            f"owned by sample {owner}. The layer must see the batch on the "
            "leading axis (or on the axis its rule declares), alone or folded "
            "sample-major with other axes (not after a transpose), and samples must "
            "not mix."
        )
    raise ValueError(
        f"{where}: row {row} of its output (batch axis first, shape "
        f"{tuple(rec.output.shape)}) depends on {half_name} samples other than sample "
        f"{row}. Either the layer sees the batch on another axis whose size equals "
        "the batch size (e.g. a transposed [T, N, d] input; give its rule "
        "output_batch_axes or use batch_first), or the model mixes samples (e.g. "
        "x - x.mean(0), batch statistics), which makes per-sample quantities and "
        "every curvature built from them wrong. The matrix-free products "
        "(ggn_vector_product, GGNOperator) are exact for such models."
    )


def layer_name(module: nn.Module, model: nn.Module) -> str:
    """``"Linear at 'encoder.0'"``: the layer's class and its name in the model."""
    for name, candidate in model.named_modules():
        if candidate is module:
            where = f"'{name}'" if name else "the model itself"
            return f"{type(module).__name__} at {where}"
    return type(module).__name__
