"""Predictive memory: estimates refuse before allocating; chunks equal one pass.

A posterior with a tiny ``memory_budget`` streams every per-input predictive in
chunks of one test input (checked with a forward hook on the model's first layer)
and must give what the default posterior gives in one pass; a tiny ``max_memory``
must raise a :class:`MemoryBudgetError` naming the path, before anything is computed.
"""

from __future__ import annotations

import pytest
import torch

from bayescurv import Laplace
from bayescurv.engine import MemoryBudgetError
from bayescurv.laplace.predict.streaming import split_inputs, stream
from tests.conftest import assert_close
from tests.laplace.conftest import fitted

CONFIGS = [
    ("classification", "all", "kron"),
    ("classification", "last_layer", "full"),
    ("regression", "all", "full"),
    ("regression", "last_layer", "lowrank"),
    ("binary", "all", "diag"),
]


def _fitted(config, **kwargs) -> tuple[Laplace, torch.Tensor]:
    return fitted(*config, **kwargs)


def _calls(la: Laplace, likelihood: str, x: torch.Tensor) -> dict[str, object]:
    gen = torch.Generator
    calls = {
        "glm": la(x),
        "diagonal": la(x, diagonal_output=True),
        "moments": la.glm_moments(x),
        "nn": la(x, pred_type="nn", link_approx="mc", generator=gen().manual_seed(0)),
        "nn samples": la.predictive_samples(
            x, pred_type="nn", n_samples=5, generator=gen().manual_seed(1)
        ),
    }
    if likelihood == "classification":
        calls["bridge"] = la(x, link_approx="bridge")
    return calls


@pytest.mark.parametrize("config", CONFIGS, ids="-".join)
def test_streaming_equals_one_pass(config):
    streamed, x = _fitted(config, memory_budget=1)
    whole, _ = _fitted(config)
    sizes = []
    first = streamed.model[0]
    hook = first.register_forward_hook(lambda m, a, o: sizes.append(len(a[0])))
    try:
        chunked = _calls(streamed, config[0], x)
    finally:
        hook.remove()
    assert max(sizes) == 1, sizes  # every forward pass saw one test input
    for name, expected in _calls(whole, config[0], x).items():
        actual = chunked[name]
        if isinstance(expected, tuple):
            for a, e in zip(actual, expected, strict=True):
                assert_close(a, e, name)
        else:
            assert_close(actual, expected, name)


def test_joint_covariance_is_not_streamed():
    streamed, x = _fitted(("regression", "all", "full"), memory_budget=1)
    whole, _ = _fitted(("regression", "all", "full"))
    for a, e in zip(streamed(x, joint=True), whole(x, joint=True), strict=True):
        assert_close(a, e, "joint")


@pytest.mark.parametrize(
    ("call", "path"),
    [
        (lambda la, x: la(x), r"GLM predictive \(link_approx='probit'\)"),
        (lambda la, x: la.glm_moments(x), r"GLM moments for N=12"),
        (lambda la, x: la(x, joint=True), r"joint GLM covariance \[N C, N C\]"),
        (
            lambda la, x: la.functional_samples(x, n_samples=10),
            r"GLM functional samples",
        ),
        (
            lambda la, x: la(x, pred_type="nn", link_approx="mc"),
            r"pred_type='nn': sampled weights \[S, P\] = \[100, 26\]",
        ),
    ],
    ids=["glm", "moments", "joint", "glm-samples", "nn"],
)
def test_tiny_max_memory_names_the_path(call, path):
    la, x = _fitted(("regression", "all", "diag"))
    la.max_memory = 64
    with pytest.raises(MemoryBudgetError, match=path + r".*Nothing was allocated"):
        call(la, x)


def test_functional_covariance_of_given_jacobians_is_checked():
    la, _ = _fitted(("regression", "all", "diag"))
    jacobians = torch.zeros(12, 2, la.n_params, dtype=torch.float64)
    la.max_memory = 1000
    assert la.functional_variance(jacobians).shape == (12, 2, 2)
    with pytest.raises(MemoryBudgetError, match=r"functional_covariance: \[N C, N C\]"):
        la.functional_covariance(jacobians)


def test_joint_is_refused_where_per_input_covariances_fit():
    """[N C, N C] grows quadratically in N: refused where [N, C, C] passes."""
    la, x = _fitted(("regression", "all", "diag"))
    x = x.repeat(100, 1)  # 1,200 inputs: joint 3 * 2400^2 * 8 B = 132 MiB
    la.max_memory = 2**20
    assert la(x)[1].shape == (1200, 2, 2)
    with pytest.raises(MemoryBudgetError, match=r"joint=False"):
        la(x, joint=True)


def test_split_inputs_tensors_tuples_and_dicts():
    x = torch.arange(10.0).reshape(5, 2)
    mask = torch.ones(3)  # not per input: shared by every chunk
    chunks = list(split_inputs({"input_ids": x, "mask": mask}, 2, "input_ids"))
    assert [len(c["input_ids"]) for c in chunks] == [2, 2, 1]
    assert all(c["mask"] is mask for c in chunks)
    pairs = list(split_inputs((x, x + 1), 3, "input_ids"))
    assert torch.equal(torch.cat([p[1] for p in pairs]), x + 1)
    doubled = stream(lambda c: (c * 2, c.sum(1)), x, 2, "input_ids")
    assert torch.equal(doubled[0], x * 2)
    assert torch.equal(doubled[1], x.sum(1))
    samples = stream(lambda c: c.expand(3, *c.shape), x, 2, "input_ids", dim=1)
    assert torch.equal(samples, x.expand(3, 5, 2))


def test_nn_weights_are_drawn_once_for_all_chunks():
    la, x = _fitted(("regression", "all", "diag"), memory_budget=1)
    samples = la.functional_samples(
        x, pred_type="nn", n_samples=3, generator=torch.Generator().manual_seed(0)
    )
    weights = la.sample(3, generator=torch.Generator().manual_seed(0))
    for s, theta in enumerate(weights):
        torch.nn.utils.vector_to_parameters(theta, la.model.parameters())
        assert_close(samples[s], la.model(x).detach(), f"network {s}")


def test_later_predictions_start_with_full_chunks():
    """The Jacobian's measured bytes per sample size the next call's first chunk.

    The explicit ``C P`` estimate allows one input per chunk here, the factored
    Jacobian all of them (NOTE [Chunks of the predictive sized from the first
    chunk's Jacobian]); results do not depend on the chunks.
    """
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(200, 300), torch.nn.Tanh(), torch.nn.Linear(300, 3)
    ).double()
    x = torch.randn(12, 200, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    whole = Laplace(model, "classification", "all", "kron")
    whole.fit([(x, y)])
    source = whole.state.source
    explicit = source._bytes_per_sample(x, jacobians=True)
    budget = next(source.jacobian_segments(x))[1].bytes_per_sample() * len(x)
    assert explicit > budget  # the first call's first chunk is one input
    streamed = Laplace(model, "classification", "all", "kron", memory_budget=budget)
    streamed.fit([(x, y)])
    sizes = []
    hook = model[0].register_forward_hook(lambda m, a, o: sizes.append(len(a[0])))
    try:
        first = streamed.glm_moments(x)
        calls = len(sizes)
        second = streamed.glm_moments(x)
    finally:
        hook.remove()
    assert sizes[0] == 1
    assert sizes[calls:] == [len(x)]  # one chunk: all inputs at once
    for chunked, once, expected in zip(
        first, second, whole.glm_moments(x), strict=True
    ):
        assert_close(chunked, expected, "first call")
        assert_close(once, expected, "second call")
