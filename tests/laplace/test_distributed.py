"""Fitting across processes: gloo ranks on CPU equal a single-process fit (float64)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from torch import distributed as dist
from torch import multiprocessing as mp

from bayescurv import Laplace
from bayescurv.laplace.distributed import DistributedFitError
from bayescurv.laplace.sources import builders
from tests.laplace.conftest import make_problem

TOL = 1e-6
CONFIGS = [
    ("classification", "all", "full"),
    ("classification", "all", "kron"),
    ("classification", "last_layer", "kron"),
    ("regression", "all", "diag"),
    ("regression", "last_layer", "full"),
    ("regression", "all", "lowrank"),
    ("binary", "subnetwork", "diag"),
]


def _fit(likelihood, subset, structure, loader, **kwargs):
    problem = make_problem(likelihood)
    extra = {"subnetwork_indices": torch.tensor([1, 4, 9, 20])}
    la = Laplace(
        problem.model,
        likelihood,
        subset_of_weights=subset,
        hessian_structure=structure,
        rank=3,
        prior_precision=0.6,
        **(extra if subset == "subnetwork" else {}),
    )
    la.fit(loader, **kwargs)
    return la, problem


def _summary(la, problem) -> dict[str, torch.Tensor]:
    prediction = la(problem.x)
    variance = prediction[1] if isinstance(prediction, tuple) else prediction
    return {
        "evidence": la.log_marginal_likelihood().detach(),
        "variance": la.posterior_variance,
        "prediction": variance,
        "n_data": torch.tensor(la.n_data),
    }


def _shard(problem, rank: int, world: int) -> list:
    """Uneven contiguous shards in batches of 2 (rank 0 gets the remainder)."""
    count = len(problem.x)
    edges = [0] + [count * (r + 1) // world for r in range(world)]
    x, y = (
        problem.x[edges[rank] : edges[rank + 1]],
        problem.y[edges[rank] : edges[rank + 1]],
    )
    return [(x[i : i + 2], y[i : i + 2]) for i in range(0, len(x), 2)]


def _counting(function, counter: list[int]):
    def counted(*args, **kwargs):
        counter[0] += 1
        return function(*args, **kwargs)

    return counted


def _worker(rank: int, world: int, store: str, out: str, operator: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", f"file://{store}", rank=rank, world_size=world)
    reductions = [0]
    dist.all_reduce = _counting(dist.all_reduce, reductions)
    try:
        if operator:  # lowrank from reduced GGN products
            builders.DENSE_EIGEN_MAX = 0
        results = {}
        for config in CONFIGS:
            problem = make_problem(config[0])
            reductions[0] = 0
            la, problem = _fit(*config, _shard(problem, rank, world))
            results[(*config, "all_reduce calls")] = reductions[0]
            results[config] = _summary(la, problem)
            if config[2] != "lowrank":  # lowrank cannot add to a fit
                la.fit(_shard(problem, rank, world), override=False)
                results[(*config, "twice")] = _summary(la, problem)
        try:  # rank 1 without data: every rank raises, none hangs
            empty = [] if rank == 1 else _shard(make_problem("regression"), rank, world)
            _fit("regression", "all", "diag", empty)
        except DistributedFitError as error:
            results["empty"] = str(error)
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _run(world: int, operator: bool = False) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        store, out = os.path.join(tmp, "store"), os.path.join(tmp, "out")
        mp.spawn(_worker, args=(world, store, out, operator), nprocs=world, join=True)
        return [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]


def _single(config, twice: bool) -> dict[str, torch.Tensor]:
    problem = make_problem(config[0])
    la, problem = _fit(*config, problem.loader(batch_size=2))
    if twice:
        la.fit(problem.loader(batch_size=2), override=False)
    return _summary(la, problem)


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_ranks_equal_a_single_process_fit(world):
    ranks = _run(world)
    for config in CONFIGS:
        for twice in (False, True) if config[2] != "lowrank" else (False,):
            expected = _single(config, twice)
            key = (*config, "twice") if twice else config
            for results in ranks:
                for name, value in expected.items():
                    torch.testing.assert_close(
                        results[key][name],
                        value,
                        rtol=TOL,
                        atol=1e-10,
                        msg=lambda m, k=key, n=name: f"{k} {n}: {m}",
                    )
    for results in ranks:
        assert "ranks [1] of" in results["empty"]
        for config in CONFIGS:  # one all-reduce of the sums per fit
            assert results[(*config, "all_reduce calls")] == 1, config


@pytest.mark.slow
def test_lowrank_operator_products_are_reduced(monkeypatch):
    ranks = _run(2, operator=True)
    monkeypatch.setattr(builders, "DENSE_EIGEN_MAX", 0)
    config = ("regression", "all", "lowrank")
    problem = make_problem("regression")
    la, problem = _fit(*config, problem.loader(batch_size=2), distributed=False)
    for results in ranks:
        torch.testing.assert_close(
            results[config]["evidence"],
            _summary(la, problem)["evidence"],
            rtol=1e-4,
            atol=0,
        )


def test_distributed_true_without_a_process_group_raises():
    problem = make_problem("regression")
    with pytest.raises(ValueError, match="init_process_group"):
        _fit("regression", "all", "diag", problem.loader(), distributed=True)
