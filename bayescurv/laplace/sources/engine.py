r"""Curvature of all weights, or of a subnetwork, from the backprop engine.

* ``DIAG``: :class:`~bayescurv.engine.DiagGGNExact` (``DiagGGNMC`` if stochastic);
* ``DENSE``: :func:`~bayescurv.engine.ggn_matrix` (Kronecker-structured for chains
  of ``nn.Linear``); stochastic: :math:`G = S^\top S` from ``SqrtGGNMC``, whose
  ``[M, N, P]`` columns are built for chunks of samples under a memory budget;
* ``KRON``: :class:`~bayescurv.engine.KFLR` (``KFAC`` if stochastic);
* GGN products over the data (``lowrank`` on large subsets): the matrix-free
  :class:`~bayescurv.engine.GGNOperator`;
* Jacobians: the engine's :class:`~bayescurv.engine.Jacobian` extension, factored
  for linear layers (:class:`~bayescurv.engine.LinearJacobian`), differentiable
  w.r.t. the inputs with ``enable_backprop``.

Every engine call names the subset's parameters (``params=``) and leaves ``.grad``
alone (``accumulate_grad=False``): a fit never touches the user's gradients or
``requires_grad`` flags. A parameter tied across modules is one parameter; the
engine sums the contributions of its uses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from bayescurv import engine
from bayescurv.laplace.data import ProjectedOutput, engine_call
from bayescurv.laplace.enums import CurvatureType
from bayescurv.laplace.likelihoods import LikelihoodModel
from bayescurv.laplace.sources.base import (
    CurvatureSource,
    KronFactors,
    Quantity,
    SourceOptions,
)
from bayescurv.laplace.sources.jacobians import (
    DenseSegment,
    LinearSegment,
    SegmentedJacobian,
)

_PREFIX = "model."  # parameter names inside the engine adapter


class EngineSource(CurvatureSource):
    """Curvature of selected parameter tensors (and entries) via the engine.

    Args:
        model: Any model the engine supports.
        likelihood: The likelihood.
        options: Engine options.
        param_names: Parameter tensors of the subset (default: every trainable one).
        indices: Selected entries of the flattened tensors (default: all).
    """

    supports_backprop = True

    def __init__(
        self,
        model: nn.Module,
        likelihood: LikelihoodModel,
        options: SourceOptions,
        param_names: Iterable[str] | None = None,
        indices: Tensor | None = None,
    ) -> None:
        super().__init__(model, likelihood, options)
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not trainable:
            raise ValueError(f"{type(model).__name__} has no trainable parameters.")
        names = set(trainable if param_names is None else param_names)
        self._params = {n: p for n, p in trainable.items() if n in names}
        self._indices = indices
        self._outputs_per_sample: int | None = None
        self._probed: set[tuple] = set()  # see NOTE [One probe per configuration]
        self._jacobian_bytes: dict[tuple, int] = {}  # see NOTE [Chunks of the ...]

    @property
    def parameters(self) -> dict[str, nn.Parameter]:  # noqa: D102
        return self._params

    @property
    def indices(self) -> Tensor | None:  # noqa: D102
        return self._indices

    # ---------------------------------------------------------------- engine
    def _backprop(
        self,
        inputs: Any,
        targets: Tensor | None,
        extension: engine.Extension,
        differentiable: bool = False,
    ) -> tuple[Tensor, dict[Any, Any]]:
        """Output (unscaled) and the extension's result per subset tensor name.

        ``targets=None``: no loss (the Jacobian extension); ``differentiable`` keeps
        the graph w.r.t. the inputs.
        """
        scale = self._scale() if targets is not None else None
        adapter, args = engine_call(self.model, inputs, scale)
        loss = None if targets is None else self.likelihood.engine_loss()
        if scale is not None:  # the residual enters EF and Hessian
            targets = targets * scale
        configuration = _configuration(self.model, inputs, args)
        res = engine.backprop(
            adapter,
            loss,
            args,
            targets,
            [extension],
            params=self._engine_params,
            accumulate_grad=False,
            create_graph=differentiable,
            generator=self.options.generator,
            memory_budget=self.options.memory_budget,
            check_samples=configuration not in self._probed,
        )
        self._probed.add(configuration)  # the probe passed (or was not needed)
        output = res.output if scale is None else res.output / scale
        values = res[extension.savefield]
        return output, {name: values[_PREFIX + name] for name in self._params}

    @property
    def _engine_params(self) -> list[nn.Parameter]:
        return list(self._params.values())

    def _scaled_targets(self, targets: Tensor) -> Tensor:
        """Targets on the engine's scaled output (regression: see likelihoods)."""
        scale = self._scale()
        return targets if scale is None else targets * scale

    def _chunks(self, inputs: Any, targets: Tensor, per_sample: int) -> list[tuple]:
        """Split a batch into sample chunks of at most ``memory_budget`` bytes."""
        size = len(targets)
        step = max(1, self.options.memory_budget // max(per_sample, 1))
        if step >= size:
            return [(inputs, targets)]
        return [
            (_slice(inputs, start, start + step), targets[start : start + step])
            for start in range(0, size, step)
        ]

    def _flat(self, values: dict[str, Tensor], lead: int) -> Tensor:
        flat = torch.cat([v.flatten(start_dim=lead) for v in values.values()], lead)
        return self._select(flat)

    # ------------------------------------------------------------- quantities
    def batch(
        self, quantity: Quantity, inputs: Any, targets: Tensor
    ) -> tuple[Tensor, Tensor | KronFactors]:
        """See :meth:`CurvatureSource.batch`.

        Raises:
            ValueError: For Kronecker factors of the empirical Fisher or the Hessian.
        """
        self.likelihood.check_target(targets)
        kind = self.options.curvature
        if quantity is Quantity.DIAG:
            output, values = self._backprop(inputs, targets, self._diagonal_extension())
            self.likelihood.check(output, targets)
            return output, self._flat(values, 0).to(self.dtype)
        if quantity is Quantity.DENSE:
            if kind is CurvatureType.EF:
                return self._dense_ef(inputs, targets)
            if kind is CurvatureType.HESSIAN:
                return self._dense_hessian(inputs, targets)
            return self._dense(inputs, targets)
        if kind is CurvatureType.HESSIAN:
            raise ValueError(
                "hessian_structure='kron' needs a positive semi-definite curvature; "
                "curvature='hessian' has no Kronecker factors: use 'ggn' or 'ef' for "
                "'kron', or 'diag', 'full' or 'lowrank' for the Hessian."
            )
        if kind is CurvatureType.EF:
            return self._kron_ef(inputs, targets)
        return self._kron(inputs, targets)

    def _diagonal_extension(self) -> engine.Extension:
        kind = self.options.curvature
        if kind is CurvatureType.EF:
            return engine.SumGradSquared()
        if kind is CurvatureType.HESSIAN:
            return engine.DiagHessian()
        if self.options.stochastic:
            return engine.DiagGGNMC(mc_samples=self.options.mc_samples)
        return engine.DiagGGNExact()

    def _dense_ef(self, inputs: Any, targets: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`\sum_n g_n g_n^\top` from per-sample gradients, chunk by chunk."""
        dense, outputs = None, []
        width = sum(p.numel() for p in self._params.values())
        per_sample = width * next(iter(self._params.values())).element_size()
        for chunk_inputs, chunk_targets in self._chunks(inputs, targets, per_sample):
            output, values = self._backprop(
                chunk_inputs, chunk_targets, engine.BatchGrad()
            )
            self.likelihood.check(output, chunk_targets)
            outputs.append(output)
            grads = self._flat(values, 1).to(self.dtype)  # [N_b, P], exact rank
            dense = grads.mT @ grads if dense is None else dense.addmm_(grads.mT, grads)
        return torch.cat(outputs), dense

    def _dense_hessian(self, inputs: Any, targets: Tensor) -> tuple[Tensor, Tensor]:
        """The Hessian of the batch's unit loss from Hessian-vector products."""
        scale = self._scale()
        adapter, args = engine_call(self.model, inputs, scale)
        with torch.no_grad():
            output = adapter(*args)
        output = output if scale is None else output / scale
        self.likelihood.check(output, targets)
        batch = [(args, self._scaled_targets(targets))]
        loss = self.likelihood.engine_loss()
        operator = engine.HessianOperator(
            adapter, loss, batch, params=self._engine_params
        )
        dense = operator.to_dense(dtype=self.dtype)
        if self.indices is not None:
            index = self.indices.to(dense.device)
            dense = dense[index][:, index]
        return output, dense

    # NOTE [Subnetworks of entries: the square root, not the full GGN]
    # The dense GGN of k selected entries out of P is S^T S with S the selected
    # columns of the exact square root [C N, P] (SqrtGGNExact): N C P for the root
    # and N C k^2 for the product, instead of the N P^2 of the full GGN (then
    # discarding all but k^2 entries). For the 500 largest of 7,510 weights of a
    # 64-100-10 MLP this is ~10x less work and no [P, P] matrix per batch.
    def _dense(
        self, inputs: Any, targets: Tensor, out: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Output and GGN (added to ``out`` in place if given).

        See the NOTE on subnetworks of entries for the square-root path.
        """
        if not self.options.stochastic and self.indices is None:
            scale = self._scale()
            adapter, args = engine_call(self.model, inputs, scale)
            if out is None:  # accumulated in the curvature dtype (exact rank)
                size = sum(p.numel() for p in self._params.values())
                like = next(iter(self._params.values()))
                out = like.new_zeros(size, size, dtype=self.dtype)
            dense, output = engine.ggn_matrix(
                adapter,
                self.likelihood.engine_loss(),
                args,
                targets,
                params=self._engine_params,
                memory_budget=self.options.memory_budget,
                return_output=True,
                out=out,
            )
            output = output if scale is None else output / scale
            self.likelihood.check(output, targets)
            return output, dense
        ext = (
            engine.SqrtGGNMC(mc_samples=self.options.mc_samples)
            if self.options.stochastic
            else engine.SqrtGGNExact(fewest=True)  # only root^T root is used
        )
        dense, outputs = None, []
        per_sample = self._bytes_per_sample(inputs)
        for chunk_inputs, chunk_targets in self._chunks(inputs, targets, per_sample):
            output, values = self._backprop(chunk_inputs, chunk_targets, ext)
            self.likelihood.check(output, chunk_targets)
            outputs.append(output)
            root = self._flat(values, 2).to(self.dtype)  # exact rank of root^T root
            root = root.reshape(-1, root.shape[-1])
            dense = root.mT @ root if dense is None else dense.addmm_(root.mT, root)
        return torch.cat(outputs), dense if out is None else out.add_(dense)

    def accumulate_dense(
        self, inputs: Any, targets: Tensor, total: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """See :meth:`CurvatureSource.accumulate_dense` (GGN: in place, no copy)."""
        if self.options.curvature is not CurvatureType.GGN:
            return super().accumulate_dense(inputs, targets, total)
        self.likelihood.check_target(targets)
        return self._dense(inputs, targets, total)

    def _scale(self) -> Tensor | None:
        scale = self.likelihood.output_scale()
        if scale is None:
            return None
        like = next(iter(self._params.values()))
        return scale.to(dtype=like.dtype, device=like.device)

    def _bytes_per_sample(self, inputs: Any, jacobians: bool = False) -> int:
        """Bytes of one sample's square-root columns (or Jacobian rows)."""
        if self._outputs_per_sample is None:
            adapter, args = engine_call(self.model, _slice(inputs, 0, 1))
            with torch.no_grad():
                self._outputs_per_sample = adapter(*args).numel()
        columns = self._outputs_per_sample
        if self.options.stochastic and not jacobians:
            columns = self.options.mc_samples
        first = next(iter(self._params.values()))
        width = sum(p.numel() for p in self._params.values())
        return columns * width * first.element_size()

    def _kron(self, inputs: Any, targets: Tensor) -> tuple[Tensor, KronFactors]:
        ext = (
            engine.KFAC(mc_samples=self.options.mc_samples, dtype=self.dtype)
            if self.options.stochastic
            else engine.KFLR(dtype=self.dtype)
        )
        output, values = self._backprop(inputs, targets, ext)
        self.likelihood.check(output, targets)
        num = output.shape[0]
        blocks, scaled = [], {}
        for fs, side in zip(values.values(), self.kron_mean_factors(), strict=True):
            # a 1-D factor (Embedding's diagonal A) stands for its diagonal matrix;
            # [G, d, d] factors (grouped convolutions) are one block per group
            dense = [torch.diag(f) if f.ndim == 1 else f for f in fs]
            if side is not None:
                # in place (the engine's results are fresh tensors; one serving two
                # blocks is scaled once): copying a 4,608^2 factor per batch cost as
                # much as forming it
                mean = dense[side]
                if id(mean) not in scaled:
                    scaled[id(mean)] = mean.mul_(num)
                dense[side] = scaled[id(mean)]
            blocks.append(dense)
        return output, blocks

    def _kron_ef(self, inputs: Any, targets: Tensor) -> tuple[Tensor, KronFactors]:
        r"""Empirical-Fisher Kronecker factors: KFLR of the projected output.

        See :class:`~bayescurv.laplace.data.ProjectedOutput`: with the loss gradients
        :math:`r_n` w.r.t. the outputs, KFLR of :math:`\sum_n \langle r_n, f_n
        \rangle^2` has ``B`` twice the empirical Fisher's (sums of backpropagated
        gradient outer products) and the same ``A``.
        """
        adapter, args = engine_call(self.model, inputs)
        with torch.no_grad():
            output = adapter(*args)
        self.likelihood.check(output, targets)
        residuals = self.likelihood.output_gradient(output, targets)
        projected = ProjectedOutput(adapter, residuals.detach())
        zeros = output.new_zeros(len(output), 1)
        res = engine.backprop(
            projected,
            nn.MSELoss(reduction="sum"),
            args,
            zeros,
            [engine.KFLR(dtype=self.dtype)],
            params=self._engine_params,
            accumulate_grad=False,
            memory_budget=self.options.memory_budget,
        )
        values = res["kflr"]
        blocks = []
        num = output.shape[0]
        for name, side in zip(self._params, self.kron_mean_factors(), strict=True):
            fs = values["model." + _PREFIX + name]
            dense = [torch.diag(f) if f.ndim == 1 else f for f in fs]
            halved = next(i for i in range(len(dense)) if i != side)
            blocks.append(
                [
                    f * num if i == side else (f / 2 if i == halved else f)
                    for i, f in enumerate(dense)
                ]
            )
        return output, blocks

    def kron_mean_factors(self) -> list[int | None]:
        """As the engine's factors: ``[A, B]`` for Embedding, ``[B, A]`` else."""
        owners = {
            f"{module_name}.{local}" if module_name else local: module
            for module_name, module in self.model.named_modules()
            for local, _ in module.named_parameters(recurse=False)
        }
        return [
            0
            if isinstance(owners[name], nn.Embedding)
            else (1 if p.ndim >= 2 else None)
            for name, p in self._params.items()
        ]

    # ------------------------------------------------------- GGN products
    def curvature_matmul(
        self, data: Iterable[tuple[Any, Tensor]]
    ) -> Callable[[Tensor], Tensor]:
        """See :meth:`CurvatureSource.curvature_matmul` (engine operator products).

        Raises:
            ValueError: If ``data`` yields no batches.
        """
        first = next(iter(data), None)
        if first is None:
            raise ValueError("the data yielded no batches.")
        scale = self._scale()
        adapter, _ = engine_call(self.model, first[0], scale)
        size = sum(p.numel() for p in self._params.values())

        like = next(iter(self._params.values()))

        def matmul(block: Tensor) -> Tensor:
            if self.indices is None:
                full = block.mT
            else:
                full = block.new_zeros(block.shape[1], size)
                full[:, self.indices.to(block.device)] = block.mT
            operator = self._operator(adapter, _PositionalData(data, scale))
            product = operator @ full.to(like.dtype).contiguous()
            return self._select(product).mT.to(block.dtype)

        return matmul

    def _operator(self, adapter: nn.Module, data: Iterable) -> engine.CurvatureOperator:
        """The engine operator of this source's curvature over ``data``."""
        loss = self.likelihood.engine_loss()
        kind = self.options.curvature
        params = self._engine_params
        if kind is CurvatureType.EF:
            return engine.EFOperator(adapter, loss, data, params=params)
        if kind is CurvatureType.HESSIAN:
            return engine.HessianOperator(adapter, loss, data, params=params)
        stochastic = self.options.stochastic
        return engine.GGNOperator(
            adapter,
            loss,
            data,
            params=params,
            mc_samples=self.options.mc_samples if stochastic else None,
            generator=self.options.generator if stochastic else None,
        )

    # ----------------------------------------------------------- Jacobians
    # NOTE [Chunks of the predictive sized from the first chunk's Jacobian]
    # Before anything is computed only the explicit size C * P per sample is known,
    # which for an 11M-weight ResNet allows one sample per chunk (one forward and C
    # pulled-back columns per test image). Factored segments (linear layers, conv
    # patches) are far smaller, so after the first chunk the rest of the batch is
    # split by what that chunk's Jacobian actually holds per sample, plus the largest
    # temporary its variance forms build (SegmentedJacobian.bytes_per_sample). The
    # measured size is kept per configuration (_configuration: modules, modes, input
    # layout), so later batches of the same shapes start with full chunks: a
    # one-image first chunk cost a ResNet-18's 32-image test batch ~15% more.
    def jacobian_segments(
        self, inputs: Any, differentiable: bool = False
    ) -> Iterator[tuple[Tensor, SegmentedJacobian]]:
        """Chunks of per-sample Jacobians from the engine, linear layers factored.

        Linear layers get factored segments (:class:`~bayescurv.engine.LinearJacobian`
        as :class:`~bayescurv.laplace.sources.jacobians.LinearSegment`), every other
        parameter tensor an explicit one; a subnetwork selecting entries gets one
        explicit segment. Chunks of samples keep the explicit parts within
        ``memory_budget`` (at least one sample per chunk).

        Args:
            inputs: A batch of inputs.
            differentiable: Keep the autograd graph w.r.t. the inputs
                (``enable_backprop``).
        """
        factored = self.indices is None
        key = None  # measured sizes are kept for factored Jacobians only
        if factored:
            args = engine_call(self.model, inputs)[1]
            key = _configuration(self.model, inputs, args)
        per_sample = self._jacobian_bytes.get(key)
        if per_sample is None:
            per_sample = self._bytes_per_sample(inputs, jacobians=True)
        size, start = _length(inputs), 0
        while start < size:
            step = max(1, self.options.memory_budget // max(per_sample, 1))
            step = -(-(size - start) // -(-(size - start) // step))  # even chunks
            whole = start == 0 and step >= size
            chunk = inputs if whole else _slice(inputs, start, start + step)
            output, values = self._backprop(
                chunk, None, engine.Jacobian(factored=factored), differentiable
            )
            num = output.shape[0]
            start += num
            flat = output.reshape(num, -1)
            if not factored:
                dense = self._flat(values, 2).movedim(0, 1)  # [N, C, P]
                yield flat, SegmentedJacobian([DenseSegment(dense)], num)
                continue
            jacobian = SegmentedJacobian(
                [_segment(value, num) for value in values.values()], num
            )
            per_sample = jacobian.bytes_per_sample()  # see NOTE [Chunks ...]
            self._jacobian_bytes[key] = per_sample
            yield flat, jacobian

    def jacobians(self, inputs: Any) -> tuple[Tensor, Tensor]:
        r"""Output ``[N, C]`` and explicit Jacobians ``[N, C, P]``."""
        chunks = list(self.jacobian_segments(inputs))
        outputs = torch.cat([output for output, _ in chunks])
        return outputs, torch.cat([jacobian.dense() for _, jacobian in chunks])

    def output(self, inputs: Any) -> Tensor:  # noqa: D102
        adapter, args = engine_call(self.model, inputs)
        output = adapter(*args)
        return output.reshape(output.shape[0], -1)


class _PositionalData:
    """``(inputs, targets)`` batches as ``(positional tensors, scaled targets)``."""

    def __init__(
        self, data: Iterable[tuple[Any, Tensor]], scale: Tensor | None = None
    ) -> None:
        self.data, self.scale = data, scale

    def __iter__(self) -> Iterator[tuple[tuple[Tensor, ...], Tensor]]:
        for inputs, targets in self.data:
            scaled = targets if self.scale is None else targets * self.scale
            yield engine_call(nn.Identity(), inputs)[1], scaled


# NOTE [One probe per configuration]
# The engine's sample-separability probe (bayescurv.engine.samples) costs up to two
# backward passes to the layer outputs per call: on a transformer's GLM predictive
# with C = 2 outputs as much as the C columns themselves. Whether samples interact
# is a property of the model's modules, their train/eval modes and the input layout,
# not of the values, so a source probes once per configuration: module types and
# modes, and per input the keys, per-sample shapes and dtypes (and the non-tensor
# arguments). A fit over many batches and every later prediction of the same shapes
# are probed once; changing a module's mode or the input layout probes again.
def _configuration(model: nn.Module, inputs: Any, args: tuple[Tensor, ...]) -> tuple:
    """What the sample-separability probe depends on (see the NOTE above)."""
    modules = tuple((type(m), m.training) for m in model.modules())
    layout = tuple((tuple(a.shape[1:]), a.dtype) for a in args)
    keys: tuple = ()
    if isinstance(inputs, dict):
        keys = tuple(
            (k, None if isinstance(v, Tensor) else repr(v)) for k, v in inputs.items()
        )
    return modules, layout, keys


def _segment(value: Any, num: int) -> LinearSegment | DenseSegment:
    """A Jacobian segment from the engine's value for one parameter tensor."""
    if isinstance(value, engine.LinearJacobian):
        grads, inputs = value.grads.movedim(0, 1), value.inputs  # [N, C, (T,) out]
        if inputs is not None and inputs.dim() == 3 and inputs.shape[1] == 1:
            grads, inputs = grads[:, :, 0], inputs[:, 0]  # one position (1x1 map)
        return LinearSegment(inputs, grads, grads.shape[-1], num)
    return DenseSegment(value.flatten(2).movedim(0, 1))  # [C, N, *p] -> [N, C, p]


def _length(inputs: Any) -> int:
    if isinstance(inputs, Tensor):
        return len(inputs)
    if isinstance(inputs, dict):
        return len(next(v for v in inputs.values() if isinstance(v, Tensor)))
    return len(inputs[0])


def _slice(inputs: Any, start: int, stop: int) -> Any:
    if isinstance(inputs, Tensor):
        return inputs[start:stop]
    if isinstance(inputs, dict):
        return {
            k: v[start:stop] if isinstance(v, Tensor) else v for k, v in inputs.items()
        }
    return type(inputs)(t[start:stop] for t in inputs)
