"""Fitting across processes: gloo ranks on CPU equal a single-process fit (float64).

Every subset x structure is fitted on uneven shards by 2 ranks (4 under ``-m slow``,
with every likelihood) in one spawn of processes per run, and compared with a fit of
all the data in this process: posterior variances, evidence, prediction, and the
prior precision tuned afterwards, to 1e-6, and bitwise equal across the ranks. The
communication is counted by wrapping ``torch.distributed``'s collectives: one
all-reduce (of :func:`message_entries` entries) and one all-gather per fit, nothing
for evidence, tuning or prediction.
"""

from __future__ import annotations

import functools
import itertools
import os
import tempfile
from typing import Any

import pytest
import torch
from torch import distributed as dist
from torch import multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from bayescurv import Laplace
from bayescurv.laplace import data as data_module
from bayescurv.laplace.distributed import DistributedFitError, message_entries
from bayescurv.laplace.sources import builders
from tests.laplace.conftest import OUTPUTS, make_problem, positions

TOL = 1e-6
SUBSETS = ("all", "last_layer", "subnetwork")
STRUCTURES = ("full", "kron", "diag", "lowrank")
LIKELIHOODS = tuple(OUTPUTS)
# every subset x structure once, the likelihoods taking turns
CONFIGS = [
    (LIKELIHOODS[i % len(LIKELIHOODS)], subset, structure)
    for i, (subset, structure) in enumerate(itertools.product(SUBSETS, STRUCTURES))
]
ALL_CONFIGS = list(itertools.product(LIKELIHOODS, SUBSETS, STRUCTURES))
DDP = ("classification", "all", "kron")  # also fitted through a DDP wrapper
Config = tuple[str, str, str]


def _subnetwork(model: nn.Module, structure: str) -> torch.Tensor:
    if structure == "kron":  # Kronecker factors need whole parameter tensors
        return positions(model, ["0.bias", "2.weight"])
    return torch.tensor([1, 4, 9, 20])


def _fit(config: Config, loader, ddp: bool = False, **kwargs) -> tuple[Laplace, Any]:
    likelihood, subset, structure = config
    problem = make_problem(likelihood)
    extra = {}
    if subset == "subnetwork":
        extra["subnetwork_indices"] = _subnetwork(problem.model, structure)
    model = nn.parallel.DistributedDataParallel(problem.model) if ddp else problem.model
    la = Laplace(
        model,
        likelihood,
        subset_of_weights=subset,
        hessian_structure=structure,
        rank=2,  # even: regression last-layer eigenvalues come in pairs
        prior_precision=0.6,
        **extra,
    )
    la.fit(loader, **kwargs)
    return la, problem


def _summary(la: Laplace, problem) -> dict[str, torch.Tensor]:
    """Posterior, evidence and prediction; then the same after tuning the prior."""

    def prediction() -> torch.Tensor:
        out = la(problem.x)
        return out[1] if isinstance(out, tuple) else out

    summary = {
        "evidence": la.log_marginal_likelihood().detach(),
        "variance": la.posterior_variance,
        "prediction": prediction(),
        "n_data": torch.tensor(la.n_data),
    }
    la.optimize_prior_precision(method="marglik", n_steps=10)
    summary["tuned prior"] = la.prior_precision.detach()
    summary["tuned evidence"] = la.log_marginal_likelihood().detach()
    summary["tuned prediction"] = prediction()
    return summary


def _shard(problem, rank: int, world: int) -> list:
    """Uneven contiguous shards in batches of 2."""
    count = len(problem.x)
    edges = [0] + [count * (r + 1) // world for r in range(world)]
    x = problem.x[edges[rank] : edges[rank + 1]]
    y = problem.y[edges[rank] : edges[rank + 1]]
    return [(x[i : i + 2], y[i : i + 2]) for i in range(0, len(x), 2)]


class _Traffic:
    """Counts the collectives of ``torch.distributed`` and the entries reduced."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.entries = 0
        for name in ("all_reduce", "all_gather", "broadcast"):
            setattr(dist, name, self._counting(name, getattr(dist, name)))

    def _counting(self, name: str, function):
        def counted(tensor, *args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            if name == "all_reduce":
                self.entries += tensor.numel()
            return function(tensor, *args, **kwargs)

        return counted

    def take(self) -> dict[str, int]:
        """The counts since the last ``take`` (and the entries all-reduced)."""
        counts = {**self.calls, "entries": self.entries}
        self.calls, self.entries = {}, 0
        return counts


def _fit_and_summarize(config, loader, traffic, ddp=False, **kwargs) -> dict:
    traffic.take()
    la, problem = _fit(config, loader, ddp=ddp, **kwargs)
    fit = traffic.take()
    summary = _summary(la, problem)
    return {"summary": summary, "fit": fit, "after": traffic.take(), "la": la}


def _worker(rank: int, world: int, store: str, out: str, configs: list[Config]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", f"file://{store}", rank=rank, world_size=world)
    traffic = _Traffic()
    try:
        results: dict[Any, Any] = {}
        for config in configs:
            problem = make_problem(config[0])
            run = _fit_and_summarize(config, _shard(problem, rank, world), traffic)
            results[config] = {k: run[k] for k in ("summary", "fit", "after")}
            if config[2] != "lowrank":  # lowrank cannot add to a fit
                traffic.take()
                run["la"].fit(_shard(problem, rank, world), override=False)
                results[(*config, "twice")] = {
                    "summary": _summary(run["la"], problem),
                    "fit": traffic.take(),
                }
        shard = _shard(make_problem(DDP[0]), rank, world)
        results["ddp"] = _fit_and_summarize(DDP, shard, traffic, ddp=True)["summary"]
        group = dist.new_group(list(range(world)))
        results["group"] = _fit_and_summarize(DDP, shard, traffic, process_group=group)[
            "summary"
        ]
        results["per rank"] = _fit_and_summarize(DDP, shard, traffic, distributed=False)
        del results["per rank"]["la"]
        results["padded"] = _fit_and_summarize(
            DDP, _padded_loader(rank, world), traffic
        )["summary"]
        try:  # rank 1 without data: every rank raises, none hangs
            empty = [] if rank == 1 else _shard(make_problem("regression"), rank, world)
            _fit(("regression", "all", "diag"), empty)
        except DistributedFitError as error:
            results["empty"] = str(error)
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


PADDED = 11
"""Points of the padded-sampler fit: no world size of the tests divides it."""


def _padded_loader(
    rank: int, world: int, shuffle: bool = True, ignored: tuple[int, ...] = ()
) -> DataLoader:
    """A shuffling ``DistributedSampler`` over 11 points: it repeats some of them.

    The class targets of the points ``ignored`` are set to -100 (no sample).
    """
    problem = make_problem(DDP[0])
    y = problem.y[:PADDED].clone()
    y[list(ignored)] = -100
    data = TensorDataset(problem.x[:PADDED], y)
    sampler = DistributedSampler(
        data, num_replicas=world, rank=rank, shuffle=shuffle, seed=3
    )
    return DataLoader(data, batch_size=2, sampler=sampler)


def _run(world: int, configs: list[Config]) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        store, out = os.path.join(tmp, "store"), os.path.join(tmp, "out")
        mp.spawn(_worker, args=(world, store, out, configs), nprocs=world, join=True)
        return [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module", params=[2, pytest.param(4, marks=pytest.mark.slow)])
def ranks(request: pytest.FixtureRequest) -> tuple[int, list[Config], list[dict]]:
    """One spawn of gloo processes per world size: ``(world, configs, results)``."""
    configs = CONFIGS if request.param == 2 else ALL_CONFIGS
    return request.param, configs, _run(request.param, configs)


@functools.cache
def _single(config: Config, twice: bool) -> tuple[dict[str, torch.Tensor], Laplace]:
    problem = make_problem(config[0])
    la, problem = _fit(config, problem.loader(batch_size=2))
    summary = _summary(la, problem)
    if twice:
        la.fit(problem.loader(batch_size=2), override=False)
        summary = _summary(la, problem)
    return summary, la


def _assert_same(actual: dict, expected: dict, key: Any) -> None:
    for name, value in expected.items():
        torch.testing.assert_close(
            actual[name],
            value,
            rtol=TOL,
            atol=1e-10,
            msg=lambda m, n=name: f"{key} {n}: {m}",
        )


def _assert_identical_on_every_rank(results: list[dict], key: Any) -> None:
    first = results[0][key]["summary"]
    for other in results[1:]:
        for name, value in first.items():
            assert torch.equal(other[key]["summary"][name], value), (key, name)


def test_ranks_equal_a_single_process_fit(ranks):
    _, configs, results = ranks
    for config in configs:
        for twice in (False, True) if config[2] != "lowrank" else (False,):
            expected, _ = _single(config, twice)
            key = (*config, "twice") if twice else config
            _assert_identical_on_every_rank(results, key)
            for rank in results:
                _assert_same(rank[key]["summary"], expected, key)


def test_one_all_reduce_per_fit_of_the_structure_size(ranks):
    """One all-reduce of the sums + one all-gather (handshake); none afterwards."""
    _, configs, results = ranks
    for config in configs:
        _, la = _single(config, twice=False)
        shapes = [tuple(p.shape) for p in la.state.source.parameters.values()]
        loss = OUTPUTS[config[0]] if config[0] == "regression" else 1
        size = message_entries(config[2], shapes, la.n_params, loss)
        for rank in results:
            fit = {"all_reduce": 1, "all_gather": 1, "entries": size}
            assert rank[config]["fit"] == fit, config
            assert rank[config]["after"] == {"entries": 0}, config  # tuning, predict
            if config[2] != "lowrank":
                assert rank[(*config, "twice")]["fit"] == fit, config


def test_ddp_models_and_process_groups(ranks):
    """A DDP-wrapped model and an explicit group equal the plain default group."""
    _, _, results = ranks
    expected, _ = _single(DDP, twice=False)
    for rank in results:
        _assert_same(rank["ddp"], expected, "ddp")
        _assert_same(rank["group"], expected, "process_group")


def test_distributed_false_fits_the_shard_only(ranks):
    world, _, results = ranks
    for index, rank in enumerate(results):
        problem = make_problem(DDP[0])
        la, problem = _fit(DDP, _shard(problem, index, world), distributed=False)
        _assert_same(rank["per rank"]["summary"], _summary(la, problem), "per rank")
        assert rank["per rank"]["fit"] == {"entries": 0}


def test_a_padding_distributed_sampler_counts_every_point_once(ranks):
    """NOTE [A DistributedSampler's repeats] (data.py): one fit of the 11 points."""
    _, _, results = ranks
    problem = make_problem(DDP[0])
    la, problem = _fit(DDP, [(problem.x[:PADDED], problem.y[:PADDED])])
    expected = _summary(la, problem)
    assert int(expected["n_data"]) == PADDED
    for rank in results:
        _assert_same(rank["padded"], expected, "padded sampler")


@pytest.mark.parametrize(
    ("structure", "ignored"),
    [("kron", ()), ("lowrank", ()), ("full", ()), ("kron", (0, 3, 5))],
    ids=["kron", "lowrank", "full", "kron-ignored-targets"],
)
def test_each_rank_skips_its_repeats(structure, ignored):
    """In one process, per rank: the fit of the sampler's distinct indices only.

    Samples whose target is ignored (-100) count as drawn: the repeats are the
    sampler's last positions, whatever the targets (points 3 and 5 are rank 2's
    first batch, before its repeat).
    """
    config = (DDP[0], DDP[1], structure)
    world, counts, repeats = 3, 0, 0
    for rank in range(world):
        loader = _padded_loader(rank, world, ignored=ignored)
        order = list(iter(loader.sampler))
        distinct = len(range(rank, PADDED, world))
        counts, repeats = counts + distinct, repeats + len(order) - distinct
        problem = make_problem(DDP[0])
        y = loader.dataset.tensors[1]
        kept = [i for i in order[:distinct] if int(y[i]) != -100]
        reference, problem = _fit(config, [(problem.x[kept], y[kept])])
        la, _ = _fit(config, loader, distributed=False)
        assert la.n_data == len(kept)
        _assert_same(_summary(la, problem), _summary(reference, problem), rank)
    assert (counts, repeats) == (PADDED, 1)


def test_samplers_that_do_not_repeat_are_left_alone():
    """drop_last=True, an even split, or a sampler the loader does not batch."""
    problem = make_problem(DDP[0])
    data = TensorDataset(problem.x[:PADDED], problem.y[:PADDED])
    even = TensorDataset(problem.x, problem.y)  # 12 points over 3 ranks
    dropping = DistributedSampler(data, num_replicas=3, rank=2, drop_last=True)
    for loader in [
        DataLoader(data, batch_size=2, sampler=dropping),
        DataLoader(even, batch_size=2, sampler=DistributedSampler(even, 3, 2)),
        [(problem.x[:PADDED], problem.y[:PADDED])],
    ]:
        assert data_module.distinct_samples(loader) is None
    padded = DistributedSampler(data, num_replicas=3, rank=2)
    assert data_module.distinct_samples(DataLoader(data, sampler=padded)) == 3


def test_a_rank_without_data_raises_on_every_rank(ranks):
    for rank in ranks[2]:
        assert "ranks [1] of" in rank["empty"]


def _operator_worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", f"file://{store}", rank=rank, world_size=world)
    try:
        builders.DENSE_EIGEN_MAX = 0  # lowrank from reduced GGN products
        config = ("regression", "all", "lowrank")
        la, _ = _fit(config, _shard(make_problem("regression"), rank, world))
        torch.save(la.log_marginal_likelihood().detach(), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_lowrank_operator_products_are_reduced(monkeypatch):
    with tempfile.TemporaryDirectory() as tmp:
        store, out = os.path.join(tmp, "store"), os.path.join(tmp, "out")
        mp.spawn(_operator_worker, args=(2, store, out), nprocs=2, join=True)
        evidences = [torch.load(f"{out}.{r}") for r in range(2)]
    monkeypatch.setattr(builders, "DENSE_EIGEN_MAX", 0)
    problem = make_problem("regression")
    la, _ = _fit(("regression", "all", "lowrank"), problem.loader(batch_size=2))
    for evidence in evidences:
        torch.testing.assert_close(
            evidence, la.log_marginal_likelihood().detach(), rtol=1e-4, atol=0
        )


def test_distributed_true_without_a_process_group_raises():
    problem = make_problem("regression")
    with pytest.raises(ValueError, match="init_process_group"):
        _fit(("regression", "all", "diag"), problem.loader(), distributed=True)


def test_dict_batches_are_cut_in_every_batched_entry():
    """Hugging Face style dicts: every tensor of the batch's length is cut."""
    problem = make_problem(DDP[0])
    data = TensorDataset(problem.x[:PADDED], problem.y[:PADDED])
    loader = DataLoader(data, batch_size=2, sampler=DistributedSampler(data, 3, 2))
    cut = data_module._Distinct(loader, "input_ids")  # 3 distinct of 4 draws

    def batch(n: int) -> dict:
        return {"input_ids": torch.ones(n, 5), "labels": torch.zeros(n), "k": 7}

    assert cut(batch(2))["input_ids"].shape == (2, 5)
    last = cut(batch(2))
    assert last["input_ids"].shape == (1, 5)
    assert last["labels"].shape == (1,)
    assert last["k"] == 7
    assert cut(batch(2)) is data_module.REPEATS_ONLY
    assert cut(None) is None  # a loader's own None: BatchReader.split refuses it
    assert cut(("not", "a", "pair")) == ("not", "a", "pair")  # split names it


def test_every_reader_of_a_loader_skips_the_repeats():
    """``BatchReader.batches`` (validation, marglik training, the GP fit) cuts too."""
    reader = data_module.BatchReader("x", "y", torch.device("cpu"))
    counts = [
        sum(len(y) for _, y in reader.batches(_padded_loader(rank, 3)))
        for rank in range(3)
    ]
    assert counts == [4, 4, 3]
