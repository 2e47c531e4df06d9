"""The memory pool (NOTE [Reusing result memory]): reuse, ownership, bounds."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor

from bayescurv import engine
from bayescurv.engine import pool
from tests.cases import MODELS, Problem, make_problem

REQUEST = [
    engine.BatchGrad(),
    engine.BatchL2Grad(),
    engine.SumGradSquared(),
    engine.Variance(),
    engine.BatchDotGrad(),
    engine.BatchDiagGGNExact(),
    engine.SqrtGGNExact(),
]


@pytest.fixture
def tiny_pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[pool.MemoryPool]:
    """A pool that serves every request (the test problems are a few kB)."""
    small = pool.MemoryPool(min_bytes=0)
    monkeypatch.setattr(pool, "POOL", small)
    yield small
    small.release()


def _flat(res: engine.BackpropResult) -> dict[str, Tensor]:
    """Every tensor of a result (Kronecker factors by index), keyed readably."""
    out = {}
    for savefield in res.keys():
        for name, value in res[savefield].items():
            values = value if isinstance(value, list) else [value]
            for i, v in enumerate(values):
                out[f"{savefield}/{name}/{i}"] = v
    return out


def _run(p: Problem, **kwargs) -> engine.BackpropResult:
    p.model.zero_grad()
    return engine.backprop(p.model, p.loss_func, p.inputs, p.targets, REQUEST, **kwargs)


def test_pooled_results_equal_unpooled(
    problem: Problem, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(pool, "POOL", pool.MemoryPool(max_bytes=0))
    expected = _flat(_run(problem))
    small = pool.MemoryPool(min_bytes=0)
    monkeypatch.setattr(pool, "POOL", small)
    for call in range(3):  # the later calls reuse the buffers of the first
        got = _flat(_run(problem))
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(got[key], value), f"call {call}: {key}"
    assert small.nbytes > 0  # the pool served the calls


def test_create_graph_results_equal_unpooled(tiny_pool: pool.MemoryPool):
    p = make_problem(MODELS[1], "ce", "mean")  # cnn
    request = [engine.BatchGrad(), engine.BatchDiagGGNExact()]
    args = (p.model, p.loss_func, p.inputs, p.targets, request)
    plain = _flat(engine.backprop(*args, accumulate_grad=False))
    params = list(p.model.parameters())
    first = engine.backprop(*args, create_graph=True, accumulate_grad=False)
    for key, value in _flat(first).items():
        assert value.requires_grad, key
        torch.testing.assert_close(value.detach(), plain[key], msg=key)
    expected = torch.autograd.grad(_total(first), params, retain_graph=True)
    for scale in (2.0, -1.0):  # later calls must not touch the graph's saved tensors
        x = scale * p.inputs
        engine.backprop(p.model, p.loss_func, x, p.targets, request)
        engine.backprop(p.model, p.loss_func, x, p.targets, request, create_graph=True)
    for got, want in zip(
        torch.autograd.grad(_total(first), params), expected, strict=True
    ):
        assert torch.equal(got, want)


def _total(res: engine.BackpropResult) -> Tensor:
    """A scalar that depends on every result of ``res``."""
    return sum(value.square().sum() for value in _flat(res).values())


# ways to keep a result's memory alive without holding the result itself
HOLDERS: dict[str, Callable[[Tensor], object]] = {
    "tensor": lambda t: t,
    "view": lambda t: t[0],
    "detached": lambda t: t.detach(),
    "storage": lambda t: t.untyped_storage(),
    "numpy": lambda t: t.numpy(),
}


def _held_values(held: object) -> Tensor:
    """A copy of what ``held`` holds (a storage: all its bytes)."""
    if isinstance(held, torch.UntypedStorage):
        return torch.empty(0, dtype=torch.uint8).set_(held).clone()
    return torch.as_tensor(held).clone()


@pytest.mark.parametrize("holder", list(HOLDERS))
def test_held_results_are_never_overwritten(tiny_pool: pool.MemoryPool, holder: str):
    p = make_problem(MODELS[1], "ce", "mean")  # cnn: conv and linear rules
    first = engine.backprop(p.model, p.loss_func, p.inputs, p.targets, REQUEST)
    tensors = _flat(first)
    held = {key: HOLDERS[holder](t) for key, t in tensors.items()}
    values = {key: _held_values(h) for key, h in held.items()}
    del first, tensors
    for scale in (2.0, -3.0, 0.5):  # other values, same shapes: buffers fit
        res = engine.backprop(
            p.model, p.loss_func, scale * p.inputs, p.targets, REQUEST
        )
        del res
    for key, h in held.items():
        assert torch.equal(_held_values(h), values[key]), key


def test_dropped_results_are_reused(tiny_pool: pool.MemoryPool):
    p = make_problem(MODELS[0], "ce", "mean")
    res = engine.backprop(p.model, p.loss_func, p.inputs, p.targets, REQUEST)
    first = res["grad_batch"]["0.weight"].data_ptr()
    del res
    again = engine.backprop(p.model, p.loss_func, p.inputs, p.targets, REQUEST)
    assert again["grad_batch"]["0.weight"].data_ptr() == first


def test_result_held_across_calls_alternates_buffers(tiny_pool: pool.MemoryPool):
    """``res = backprop(...)`` in a loop: the previous result is alive during a call."""
    p = make_problem(MODELS[0], "ce", "mean")
    pointers = []
    res = None
    for _ in range(4):
        res = engine.backprop(p.model, p.loss_func, p.inputs, p.targets, REQUEST)
        pointers.append(res["grad_batch"]["0.weight"].data_ptr())
    assert pointers[0] != pointers[1]
    assert pointers[2:] == pointers[:2]


def test_results_held_in_turn_by_two_holders_reuse_buffers(
    tiny_pool: pool.MemoryPool, monkeypatch: pytest.MonkeyPatch
):
    """Two holders, each keeping its result until its next call (``KEEP_SWEEPS``).

    As engine calls alternated with BackPACK-style calls that keep their savefields:
    once warm, no call allocates a new buffer.
    """
    made = []

    def counted(*args: object) -> object:
        made.append(None)  # not the array: a reference would keep it held
        return original(*args)

    original = pool._Buffer
    monkeypatch.setattr(pool, "_Buffer", counted)
    p = make_problem(MODELS[0], "ce", "mean")
    held: dict[str, object] = {"a": None, "b": None}
    counts = []
    for _ in range(6):
        for holder in held:
            held[holder] = engine.backprop(
                p.model, p.loss_func, p.inputs, p.targets, REQUEST
            )
            counts.append(len(made))
    assert counts[-1] > 0
    assert counts[3:] == [counts[3]] * len(counts[3:])


def test_outside_a_sweep_memory_is_not_pooled(tiny_pool: pool.MemoryPool):
    pool.pooled_empty((4, 3), like=torch.zeros(1))
    assert tiny_pool.nbytes == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.complex64])
def test_pooled_tensors_have_the_requested_layout(
    tiny_pool: pool.MemoryPool, dtype: torch.dtype
):
    with pool.sweep():
        t = pool.pooled_empty((3, 5, 2), like=torch.zeros(1, dtype=dtype))
        t.copy_(torch.arange(30).reshape(3, 5, 2))
        assert t.dtype == dtype
        assert t.is_contiguous()
        assert torch.equal(t, torch.arange(30).reshape(3, 5, 2).to(dtype))
    assert tiny_pool.nbytes >= t.numel() * t.element_size()


def test_the_limit_bounds_the_pool():
    small = pool.MemoryPool(max_bytes=1000, min_bytes=0)
    with small.sweep():
        held = [small.empty((100,), torch.float32, "cpu") for _ in range(5)]
    assert small.nbytes <= 1000
    assert len({t.data_ptr() for t in held}) == 5  # the rest got ordinary memory
    small.set_limit(0)
    assert small.nbytes == 0
    with small.sweep():
        small.empty((100,), torch.float32, "cpu")
    assert small.nbytes == 0


def test_a_sweep_without_reuse_drops_its_free_buffers():
    """NOTE [No higher peak]: a first call allocates no more than plain torch."""
    small = pool.MemoryPool(min_bytes=0)
    with small.sweep():
        small.empty((200,), torch.float32, "cpu")  # 832 bytes, freed at once
        small.empty((250,), torch.float32, "cpu")  # 1024 bytes
    assert small.nbytes == 1024


def test_a_sweep_with_reuse_keeps_its_free_buffers():
    small = pool.MemoryPool(min_bytes=0)
    with small.sweep():
        held = small.empty((250,), torch.float32, "cpu")
    del held
    with small.sweep():
        small.empty((250,), torch.float32, "cpu")  # reused
        small.empty((200,), torch.float32, "cpu")  # new, freed at once
        small.empty((100,), torch.float32, "cpu")  # new; keeps the previous one
    assert small.nbytes == 1024 + 832 + 448


def test_unused_buffers_are_dropped_after_keep_sweeps(tiny_pool: pool.MemoryPool):
    with pool.sweep():
        pool.pooled_empty((8,), like=torch.zeros(1))
    for _ in range(pool.KEEP_SWEEPS - 1):
        with pool.sweep():
            pass
    assert tiny_pool.nbytes > 0
    with pool.sweep():
        pass
    assert tiny_pool.nbytes == 0


def test_release_frees_the_buffers_but_not_held_results(tiny_pool: pool.MemoryPool):
    with pool.sweep():
        t = pool.pooled_empty((16,), like=torch.zeros(1)).fill_(3.0)
    pool.release_pool()
    assert tiny_pool.nbytes == 0
    assert torch.equal(t, torch.full((16,), 3.0))


def test_threads_get_distinct_buffers(tiny_pool: pool.MemoryPool):
    barrier = threading.Barrier(4)
    held: list[Tensor] = []
    lock = threading.Lock()

    def work() -> None:
        with pool.sweep():
            barrier.wait()
            t = pool.pooled_empty((64,), like=torch.zeros(1))
            with lock:
                held.append(t)
            barrier.wait()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({t.data_ptr() for t in held}) == 4


@pytest.mark.parametrize("bad", [-1, 1.5, "1GB"])
def test_bad_limit_raises(bad: object):
    with pytest.raises(ValueError, match="max_bytes must be a non-negative int"):
        engine.set_pool_limit(bad)  # type: ignore[arg-type]


def test_changing_batch_sizes_give_unpooled_results(monkeypatch: pytest.MonkeyPatch):
    p = make_problem(MODELS[1], "ce", "sum")  # cnn
    sizes = [6, 3, 6, 2, 3]
    monkeypatch.setattr(pool, "POOL", pool.MemoryPool(max_bytes=0))
    expected = [_flat(_run(_head(p, n))) for n in sizes]
    monkeypatch.setattr(pool, "POOL", pool.MemoryPool(min_bytes=0))
    for n, want in zip(sizes, expected, strict=True):
        got = _flat(_run(_head(p, n)))  # dropped before the next call: reused
        for key, value in want.items():
            assert torch.equal(got[key], value), f"batch {n}: {key}"


def _head(p: Problem, n: int) -> Problem:
    return Problem(p.model, p.loss_func, p.inputs[:n], p.targets[:n])


def test_other_devices_are_not_pooled(tiny_pool: pool.MemoryPool):
    with pool.sweep():
        t = tiny_pool.empty((4, 4), torch.float32, "meta")
    assert t.device.type == "meta"
    assert tiny_pool.nbytes == 0
