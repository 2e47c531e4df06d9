"""validate, get_nll and the running NLL metric."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.nn import functional as F

from bayescurv import Laplace
from bayescurv.laplace.tune.validation import RunningNLLMetric, get_nll, validate
from tests.conftest import assert_close
from tests.laplace.conftest import make_problem

F64 = torch.float64


def test_running_nll_matches_the_offline_nll():
    gen = torch.Generator().manual_seed(0)
    metric = RunningNLLMetric(ignore_index=-7)
    probs, targets = [], []
    for _ in range(4):
        p = torch.softmax(torch.randn(3, 5, 4, generator=gen, dtype=F64), -1)
        t = torch.randint(0, 4, (3, 5), generator=gen)
        t[torch.rand(3, 5, generator=gen) < 0.4] = -7
        metric.update(p, t)
        probs.append(p)
        targets.append(t)
    expected = F.nll_loss(
        torch.cat(probs).log().flatten(end_dim=-2),
        torch.cat(targets).flatten(),
        ignore_index=-7,
    )
    assert_close(metric.compute(), expected, "running NLL")
    metric.reset()
    with pytest.raises(ValueError, match="no valid targets"):
        metric.compute()
    with pytest.raises(ValueError, match="plus a class axis"):
        metric.update(probs[0], targets[0][:, :2])


class MeanSquaredError:
    """A running metric of the predictive mean only: ``update(mean, targets)``."""

    def __init__(self) -> None:
        self.reset()

    def update(self, mean: Tensor, targets: Tensor) -> None:
        self.total += (mean - targets).square().sum(0)
        self.count += len(targets)

    def compute(self) -> Tensor:
        return self.total / self.count

    def reset(self) -> None:
        self.total, self.count = 0.0, 0


@pytest.fixture(scope="module")
def fitted() -> dict[str, object]:
    out = {}
    for likelihood in ("classification", "regression"):
        problem = make_problem(likelihood)
        la = Laplace(problem.model, likelihood, "all", "full")
        la.fit(problem.loader())
        out[likelihood] = (la, problem)
    return out


def test_validate_classification(fitted):
    la, problem = fitted["classification"]
    probs = la(problem.x, pred_type="glm", link_approx="probit")
    expected = float(get_nll(probs, problem.y))
    assert validate(la, problem.loader(), get_nll) == pytest.approx(expected)
    metric = validate(la, problem.loader(), RunningNLLMetric())
    assert metric == pytest.approx(expected)


def test_validate_regression(fitted):
    la, problem = fitted["regression"]
    f_mu, f_var = la(problem.x, pred_type="glm")

    def gaussian_nll(mean: Tensor, var: Tensor, y: Tensor) -> Tensor:
        return F.gaussian_nll_loss(mean, y, var.diagonal(dim1=1, dim2=2))

    expected = float(gaussian_nll(f_mu, f_var, problem.y))
    assert validate(la, problem.loader(), gaussian_nll) == pytest.approx(expected)
    # a metric of the mean only gets (mean, targets); per-output values are summed
    expected_mse = float((f_mu - problem.y).square().mean(0).sum())
    assert validate(la, problem.loader(), MeanSquaredError()) == pytest.approx(
        expected_mse
    )


def test_validate_errors(fitted):
    la, problem = fitted["classification"]
    with pytest.raises(ValueError, match="loss must be callable or a metric"):
        validate(la, problem.loader(), 3.0)
    with pytest.raises(ValueError, match="yielded no batches"):
        validate(la, [], get_nll)
