"""Re-running a recorded forward call of an extended module through the engine.

# NOTE [Why the forward pass is replayed]
# The engine's public entry points take (model, loss, inputs, targets) and run their
# own forward pass, recording every parameterized layer. The compat layer remembers
# the inputs of the user's forward call and replays it inside the backward hook:
# one extra forward pass, in exchange for the engine's support of any graph. The
# replay sees the same randomness (the global RNG state at the start of the user's
# call, so dropout draws the same masks) and leaves no trace: buffers (BatchNorm
# running statistics) are restored afterwards and ``.grad`` is not touched
# (``accumulate_grad=False``; the user's backward pass writes it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bayescurv import engine
from bayescurv.compat.backpack.context import internal


@dataclass(frozen=True)
class RngState:
    """The global random state at the start of a forward call."""

    cpu: Tensor
    cuda: dict[int, Tensor]

    @classmethod
    def capture(cls, module: nn.Module) -> RngState:
        """The current CPU state and that of every CUDA device ``module`` uses."""
        devices = {p.device.index or 0 for p in module.parameters() if p.is_cuda}
        cuda = {d: torch.cuda.get_rng_state(d) for d in sorted(devices)}
        return cls(torch.get_rng_state(), cuda)

    @contextmanager
    def restored(self) -> Iterator[None]:
        """Run the block from this state; the global state is left untouched."""
        with torch.random.fork_rng(devices=list(self.cuda)):
            torch.set_rng_state(self.cpu)
            for device, state in self.cuda.items():
                torch.cuda.set_rng_state(state, device)
            yield


@dataclass
class LossCall:
    """The extended loss applied to a recorded output, seen during ``backward``.

    Attributes:
        module: The loss module.
        output: Its input, the recorded output (detached).
        targets: Its targets (detached).
    """

    module: nn.Module
    output: Tensor
    targets: Tensor


@dataclass
class Call:
    """One forward call of an extended module.

    Attributes:
        module: The extended module.
        args: Its positional inputs (detached).
        kwargs: Its keyword inputs.
        rng: The random state at the start of the call.
        stored: ``False`` if the call ran inside ``disable()`` (nothing stored).
        loss: The extended loss computed from the call's output, attached by the
            loss's backward hook and consumed by the output's.
        parent: For an extended parameter-free module applied to a tracked output,
            the call that produced it (see ``extend.py``).
        covered: Pending backward passes already handled by a composed call.
    """

    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    rng: RngState | None
    stored: bool = True
    loss: LossCall | None = field(default=None, repr=False)
    parent: Call | None = field(default=None, repr=False)
    covered: int = 0


class _Bound(nn.Module):
    """``module`` with fixed keyword inputs, optionally with its output centered.

    # NOTE [First-order quantities of any scalar function of the output]
    # BackPACK's first-order quantities are the per-sample pieces J_n^T g_n of the
    # gradient g that reaches the module output, whatever scalar function of the
    # output was differentiated. The engine pulls back the gradient of a loss; with
    # the centered output f - f.detach() (value 0, Jacobian J) and MSELoss(sum)
    # against the target -g/2, that gradient is 2 (0 + g/2) = g exactly.
    """

    def __init__(self, module: nn.Module, kwargs: dict[str, Any], centered: bool):
        super().__init__()
        self.module = module
        self.kwargs = kwargs
        self.centered = centered

    def forward(self, *args: Any) -> Tensor:
        out = self.module(*args, **self.kwargs)
        if self.centered and isinstance(out, Tensor):
            return out - out.detach()
        return out


class Then(nn.Module):
    """``then(first(*args), **kwargs)``: a module applied to another's output."""

    def __init__(self, first: nn.Module, then: nn.Module, kwargs: dict[str, Any]):
        super().__init__()
        self.first, self.then, self.kwargs = first, then, kwargs

    def forward(self, *args: Any) -> Tensor:
        """Run ``first``, then ``then`` on its output."""
        return self.then(self.first(*args), **self.kwargs)


def trainable(module: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of ``module`` (each once)."""
    return [p for p in module.parameters() if p.requires_grad]


@contextmanager
def replayed(call: Call) -> Iterator[None]:
    """Run the block as the replay of ``call`` (see the module's NOTE)."""
    with ExitStack() as stack:
        stack.enter_context(internal())
        stack.enter_context(torch.enable_grad())
        if call.rng is not None:
            stack.enter_context(call.rng.restored())
        stack.enter_context(_buffers_restored(call.module))
        yield


@contextmanager
def _buffers_restored(module: nn.Module) -> Iterator[None]:
    training = any(m.training for m in module.modules())
    saved = [(b, b.detach().clone()) for b in module.buffers()] if training else []
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def run_engine(
    call: Call,
    loss_func: nn.Module | None,
    targets: Tensor | None,
    extensions: Sequence[engine.Extension],
    *,
    centered: bool = False,
    create_graph: bool = False,
    generator: torch.Generator | None = None,
) -> dict[str, dict[nn.Parameter, Any]]:
    """Replay ``call`` through :func:`bayescurv.engine.backprop`.

    Args:
        call: The recorded forward call.
        loss_func: The loss on the call's output (``None`` for ``Jacobian`` only).
        targets: Its targets (``None`` without a loss).
        extensions: Engine extensions.
        centered: Center the output (see NOTE [First-order quantities of any scalar
            function of the output]).
        create_graph: Keep the results differentiable (``loss.backward(
            create_graph=True)``).
        generator: Random generator for Monte Carlo extensions.

    Returns:
        ``savefield -> parameter -> value``.
    """
    module = model_of(call, centered)
    with replayed(call):
        result = engine.backprop(
            module,
            loss_func,
            call.args,
            targets,
            extensions,
            accumulate_grad=False,
            create_graph=create_graph,
            generator=generator,
        )
    params = dict(module.named_parameters())
    return {
        savefield: {params[name]: value for name, value in values.items()}
        for savefield, values in result.quantities.items()
    }


def model_of(call: Call, centered: bool = False) -> nn.Module:
    """The module the engine runs: the extended one, or it bound to its kwargs."""
    if call.kwargs or centered:
        return _Bound(call.module, call.kwargs, centered)
    return call.module
