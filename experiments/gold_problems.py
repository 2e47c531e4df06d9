"""The gold-standard problems: data, tiny tanh networks, one fixed prior, the MAP.

Three small Bayesian neural networks on which NUTS is affordable on a CPU:

* ``regression``: the 1-D gap toy of :func:`experiments.data.gap_toy` (``sin 3x`` with
  noise 0.1, a gap in the inputs), evaluated on a grid over ``[-3, 3]``;
* ``moons``: scikit-learn's two moons, evaluated on a test set and on a grid around
  the data (where the predictive should become uncertain);
* ``digits``: scikit-learn's 8x8 digits (the split of
  :func:`experiments.data.digits_loaders`) with a net of a few hidden units.

Every problem fixes one Gaussian prior (the same for the MAP, NUTS and Laplace) and,
for regression, the noise. The MAP minimizes the negative log joint of the
:class:`~bayescurv.laplace.pyro_model.BayesianNetwork` itself (full batch, Adam then
L-BFGS), so MAP, Laplace and NUTS share one posterior.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from sklearn.datasets import make_moons
from torch import Tensor, nn
from torch.nn.utils import vector_to_parameters

from bayescurv.laplace.pyro_model import BayesianNetwork
from experiments import data as datasets


@dataclass(frozen=True)
class Data:
    """Training and test tensors (float64 inputs) of one problem.

    Attributes:
        x_train: ``[N, D]``.
        y_train: ``[N, 1]`` (regression) or class indices ``[N]``.
        x_test: ``[M, D]`` test inputs.
        y_test: Test targets.
        regions: Boolean masks ``[M]`` of named test regions (``"all"`` first).
        x_grid: ``[G, D]`` inputs for plots and the far-from-data distance
            (``None`` if the problem has none besides the test set).
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    regions: dict[str, Tensor]
    x_grid: Tensor | None = None


@dataclass(frozen=True)
class NutsSettings:
    """NUTS budget of a problem: chains, warm-up and kept draws per chain."""

    chains: int = 4
    warmup: int = 300
    samples: int = 300
    max_tree_depth: int = 8
    """Trees of at most ``2**depth - 1`` leapfrog steps (a cap on the cost)."""


@dataclass(frozen=True)
class Problem:
    """One gold-standard problem.

    Attributes:
        name: Its key.
        likelihood: ``"regression"`` or ``"classification"``.
        widths: Layer widths of the tanh MLP (input, hidden..., output).
        prior_precision: The fixed prior precision of every weight.
        sigma_noise: Regression noise (1 for classification).
        make_data: ``seed -> Data``.
        nuts: The NUTS budget.
        description: One line for the report.
    """

    name: str
    likelihood: str
    widths: tuple[int, ...]
    prior_precision: float
    sigma_noise: float
    make_data: Callable[[int], Data]
    nuts: NutsSettings
    description: str

    def network(self, seed: int) -> nn.Sequential:
        """A float64 tanh MLP of :attr:`widths`, initialized by ``seed``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layers: list[nn.Module] = []
            for fan_in, fan_out in itertools.pairwise(self.widths):
                if layers:
                    layers.append(nn.Tanh())
                layers.append(nn.Linear(fan_in, fan_out))
            return nn.Sequential(*layers).double().eval()

    def bayesian(self, net: nn.Module) -> BayesianNetwork:
        """``net`` with the problem's prior and likelihood over all its weights."""
        return BayesianNetwork(
            net,
            self.likelihood,
            prior_precision=self.prior_precision,
            sigma_noise=self.sigma_noise,
        )

    @property
    def num_weights(self) -> int:
        """Number of weights of the network."""
        return sum(
            (fan_in + 1) * fan_out
            for fan_in, fan_out in itertools.pairwise(self.widths)
        )


def regression_data(seed: int) -> Data:
    """The gap toy: 100 training points, the noisy grid over ``[-3, 3]`` as test."""
    toy = datasets.gap_toy(n_train=100, seed=seed)
    regions = {k: v[:, 0] for k, v in toy.regions().items()}
    grid = toy.x_grid.double()
    return Data(
        toy.x_train.double(),
        toy.y_train.double(),
        grid,
        toy.y_grid.double(),
        {"all": torch.ones(len(grid), dtype=torch.bool), **regions},
        grid,
    )


def moons_data(seed: int) -> Data:
    """Two moons (noise 0.2): 150 training, 500 test points, a grid around them."""
    x, y = make_moons(n_samples=650, noise=0.2, random_state=seed)
    x, y = torch.tensor(x), torch.tensor(y)
    axes = (
        torch.linspace(-2.5, 3.5, 41, dtype=torch.float64),
        torch.linspace(-2.0, 2.5, 31, dtype=torch.float64),
    )
    grid = torch.cartesian_prod(*axes)
    return Data(
        x[:150],
        y[:150],
        x[150:],
        y[150:],
        {"all": torch.ones(500, dtype=torch.bool)},
        grid,
    )


def digits_data(seed: int) -> Data:
    """The digits split of ``experiments.data`` (1,401 train, 270 test), flat."""
    loaders = datasets.digits_loaders(seed=seed, layout="flat")
    x_train, y_train = loaders.train.dataset.tensors
    x_test, y_test = loaders.test.dataset.tensors
    regions = {"all": torch.ones(len(y_test), dtype=torch.bool)}
    return Data(x_train.double(), y_train, x_test.double(), y_test, regions)


PROBLEMS: dict[str, Problem] = {
    "regression": Problem(
        "regression",
        "regression",
        (1, 10, 1),
        prior_precision=1.0,
        sigma_noise=0.1,
        make_data=regression_data,
        nuts=NutsSettings(warmup=400, samples=600),
        description="1-D gap toy, 100 points, MLP 1-10-1 tanh, sigma 0.1",
    ),
    "moons": Problem(
        "moons",
        "classification",
        (2, 10, 2),
        prior_precision=1.0,
        sigma_noise=1.0,
        make_data=moons_data,
        nuts=NutsSettings(),
        description="two moons (noise 0.2), 150 points, MLP 2-10-2 tanh",
    ),
    "digits": Problem(
        "digits",
        "classification",
        (64, 4, 10),
        prior_precision=1.0,
        sigma_noise=1.0,
        make_data=digits_data,
        nuts=NutsSettings(samples=500),
        description="8x8 digits, 1,401 points, MLP 64-4-10 tanh",
    ),
}
"""The problems of the study, by name."""

QUICK_NUTS = NutsSettings(chains=2, warmup=40, samples=40, max_tree_depth=6)
"""The NUTS budget of ``--quick`` (a smoke test, not a gold standard)."""


def quick(problem: Problem) -> Problem:
    """The problem with the smoke-test NUTS budget."""
    return replace(problem, nuts=QUICK_NUTS)


def train_map(problem: Problem, data: Data, seed: int, steps: int = 2000) -> nn.Module:
    """The MAP of the problem's posterior from the initialization ``seed``.

    Full-batch Adam on the mean negative log joint, then L-BFGS on the sum until the
    gradient vanishes (Laplace expands around a stationary point): ``steps`` of each
    at most.

    Returns:
        The network (eval mode) at the MAP.
    """
    net = problem.network(seed)
    model = problem.bayesian(net)
    weights = model.map_weights().clone().requires_grad_()

    def objective() -> Tensor:
        return -model.log_joint(weights, data.x_train, data.y_train)

    adam = torch.optim.Adam([weights], lr=1e-2)
    for _ in range(steps):
        adam.zero_grad()
        (objective() / len(data.x_train)).backward()
        adam.step()
    lbfgs = torch.optim.LBFGS(
        [weights],
        max_iter=steps,
        history_size=50,
        tolerance_grad=1e-9,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        lbfgs.zero_grad()
        value = objective()
        value.backward()
        return value

    lbfgs.step(closure)
    vector_to_parameters(weights.detach(), net.parameters())
    return net
