r"""A network with a Gaussian prior on (some of) its weights, as a Pyro model.

:class:`BayesianNetwork` is the model a Laplace approximation approximates, written
for Pyro: latent weights :math:`\theta` (one flat site ``"weights"``, ``[P]``), the
other weights fixed at their values when the model is built (the MAP), and the
likelihood of :mod:`bayescurv.laplace.likelihoods`:

.. math::
    \theta \sim \mathcal{N}(\mu_0, \operatorname{diag}(\pi)^{-1}), \qquad
    \log p(\mathcal{D} \mid \theta) = \frac{1}{T} \sum_n
    \log p(y_n \mid f(x_n; \theta)),

with ``Categorical(logits=f)`` (classification, also per position and for reward
modeling's pairs), ``Normal(f, sigma_noise)`` (regression) or ``Bernoulli(logits=f)``
(binary), tempered by ``poutine.scale(1 / T)``.
Its posterior therefore has the negative log density whose GGN the Laplace fit takes:
:math:`\Lambda = \frac{1}{T\sigma^2} H + \operatorname{diag}(\pi)`. Use it with NUTS,
SVI, ``Predictive`` or the Laplace guide of :mod:`bayescurv.laplace.pyro`.

Sites: ``"weights"`` (latent, ``[P]``), ``"f"`` (deterministic network outputs,
``[N, ...]``) and ``"obs"`` (observed targets), inside the plate ``"data"`` of size
``N`` at dimension ``-1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import Tensor, nn

from bayescurv.curvature import prior as priors
from bayescurv.laplace.enums import Likelihood, parse

WEIGHTS_SITE = "weights"
"""The latent site: the flat vector of the Bayesian weights, ``[P]``."""
OUTPUT_SITE = "f"
"""The deterministic site of the network outputs, ``[N, ...]``."""
OBSERVED_SITE = "obs"
"""The likelihood's site (observed when targets are given)."""
DATA_PLATE = "data"
"""The plate over data points, at dimension ``-1``."""

_OWNER = "BayesianNetwork"


# NOTE [The network is not a submodule]
# A PyroModule turns every plain nn.Module child into a ``pyro.module`` statement:
# its parameters would become learnable Pyro parameters (SVI would train the weights
# that are meant to be latent or fixed), and the statement breaks ``torch.func``
# transforms of the model (e.g. its Hessian). The network is therefore kept as a
# plain attribute; all its parameters are passed to ``functional_call`` explicitly.


def _scalar(value: float | Tensor) -> float | Tensor:
    """A one-entry tensor ``[1]`` (laplace-torch's scalar form) as 0-d."""
    if isinstance(value, Tensor) and value.shape == (1,):
        return value.reshape(())
    return value


class BayesianNetwork(PyroModule):
    r"""A network with a Gaussian prior on its weights ``parameters``, a Pyro model.

    The flat vector of the Bayesian weights is the named parameter tensors
    flattened row-major and concatenated in the order given (then restricted to
    ``indices``), as a Laplace approximation's flat vector (``la.mean``). Every
    other parameter keeps the value it has when the model is built (a copy: later
    changes to ``net`` do not affect the model); buffers are read from ``net``.

    Args:
        net: The network; called as ``net(x)`` with the weights swapped in by
            ``torch.func.functional_call`` (left unchanged; put it in eval mode for
            dropout or batch norm as a Laplace fit does).
        likelihood: ``"classification"``, ``"regression"`` or ``"binary"``.
        prior_precision: :math:`\pi > 0`: a scalar, ``[B]`` (per parameter tensor)
            or ``[P]``.
        prior_mean: :math:`\mu_0`: a scalar or ``[P]``.
        sigma_noise: Regression noise, a scalar or ``[K]`` (per output); ``1``
            otherwise.
        temperature: :math:`T > 0`, dividing the log likelihood.
        parameters: Names (as in ``net.named_parameters()``) of the Bayesian
            tensors; default all trainable ones, in ``named_parameters`` order.
        indices: Entries of the concatenated tensors that are Bayesian (a
            subnetwork), 1-D integer; default all.

    Raises:
        ValueError: For unknown or repeated parameter names, bad indices, or a
            prior, noise or temperature of the wrong shape or sign.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from pyro import poutine
        >>> model = BayesianNetwork(nn.Linear(2, 1), "regression", prior_precision=4.0)
        >>> model.num_weights, model.prior_scale[:2]
        (3, tensor([0.5000, 0.5000]))
        >>> trace = poutine.trace(model).get_trace(torch.zeros(5, 2))
        >>> trace.nodes["weights"]["value"].shape, trace.nodes["f"]["value"].shape
        (torch.Size([3]), torch.Size([5, 1]))
    """

    def __init__(
        self,
        net: nn.Module,
        likelihood: Likelihood | str,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        sigma_noise: float | Tensor = 1.0,
        temperature: float = 1.0,
        parameters: Sequence[str] | None = None,
        indices: Tensor | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"{_OWNER}: net must be an nn.Module, got {type(net)}.")
        self.__dict__["net"] = net  # see NOTE [The network is not a submodule]
        self.likelihood = parse(Likelihood, likelihood, "likelihood")
        self.fixed = {n: p.detach().clone() for n, p in net.named_parameters()}
        self.names = self._check_names(parameters)
        self.indices = self._check_indices(indices)
        self.block_sizes = self._block_sizes()
        like = next(iter(self.fixed.values()))
        precision = priors.per_parameter(
            priors.as_precision(
                _scalar(prior_precision), self.block_sizes, like=like, owner=_OWNER
            ),
            self.block_sizes,
        )
        if (precision <= 0).any():
            raise ValueError(f"{_OWNER}: prior_precision must be positive.")
        self.register_buffer("prior_scale", precision.rsqrt().clone())
        self.register_buffer("prior_loc", self._prior_mean(prior_mean, like))
        self.register_buffer("sigma_noise", self._noise(sigma_noise, like))
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(
                f"{_OWNER}: temperature must be positive, got {temperature}."
            )
        self.temperature = float(temperature)

    # ------------------------------------------------------------------ checks
    def _check_names(self, parameters: Sequence[str] | None) -> list[str]:
        trainable = [n for n, p in self.net.named_parameters() if p.requires_grad]
        names = trainable if parameters is None else list(parameters)
        unknown = [n for n in names if n not in self.fixed]
        if not names or unknown or len(set(names)) != len(names):
            raise ValueError(
                f"{_OWNER}: parameters must be distinct names of net's parameters "
                f"{list(self.fixed)}, got {names}."
            )
        return names

    def _check_indices(self, indices: Tensor | None) -> Tensor | None:
        if indices is None:
            return None
        total = sum(self.fixed[n].numel() for n in self.names)
        if (
            not isinstance(indices, Tensor)
            or indices.ndim != 1
            or indices.is_floating_point()
            or indices.dtype == torch.bool
            or indices.numel() == 0
        ):
            raise ValueError(f"{_OWNER}: indices must be a non-empty 1-D int tensor.")
        indices = indices.long().sort().values
        if indices.unique().numel() != indices.numel() or not (
            0 <= indices[0] and indices[-1] < total
        ):
            raise ValueError(
                f"{_OWNER}: indices must be distinct and lie in [0, {total}) (the "
                "entries of the named parameters)."
            )
        return indices

    def _block_sizes(self) -> list[int]:
        sizes = [self.fixed[n].numel() for n in self.names]
        if self.indices is None:
            return sizes
        ends = torch.tensor(sizes).cumsum(0)
        block = torch.bucketize(self.indices.cpu(), ends, right=True)
        counts = torch.bincount(block, minlength=len(sizes)).tolist()
        return [c for c in counts if c > 0]

    def _prior_mean(self, value: float | Tensor, like: Tensor) -> Tensor:
        mean = torch.as_tensor(_scalar(value), dtype=like.dtype, device=like.device)
        if mean.ndim != 0 and mean.shape != (self.num_weights,):
            raise ValueError(
                f"{_OWNER}: prior_mean must be a scalar or of shape "
                f"[{self.num_weights}], got {list(mean.shape)}."
            )
        return mean.expand(self.num_weights).clone()

    def _noise(self, value: float | Tensor, like: Tensor) -> Tensor:
        sigma = torch.as_tensor(value, dtype=like.dtype, device=like.device)
        sigma = sigma.reshape(()) if sigma.shape == (1,) else sigma
        if sigma.ndim > 1 or not bool((sigma > 0).all()):
            raise ValueError(
                f"{_OWNER}: sigma_noise must be a positive scalar or [K], got {sigma}."
            )
        if self.likelihood is not Likelihood.REGRESSION and not bool(
            (sigma == 1).all()
        ):
            raise ValueError(
                f"{_OWNER}: sigma_noise is a regression parameter; likelihood="
                f"'{self.likelihood.value}' needs sigma_noise=1."
            )
        return sigma.detach().clone()

    # ---------------------------------------------------------------- weights
    @property
    def num_weights(self) -> int:
        """``P``, the number of Bayesian weights."""
        return sum(self.block_sizes)

    def map_weights(self) -> Tensor:
        """The Bayesian weights' values when the model was built, flat ``[P]``."""
        flat = torch.cat([self.fixed[n].flatten() for n in self.names])
        return flat if self.indices is None else flat[self.indices.to(flat.device)]

    def prior(self) -> dist.Distribution:
        r"""The prior :math:`\mathcal{N}(\mu_0, \operatorname{diag}(\pi)^{-1})`.

        Returns:
            A Pyro ``Normal`` with event shape ``[P]``.
        """
        return dist.Normal(self.prior_loc, self.prior_scale).to_event(1)

    def _tensors(self, weights: Tensor) -> dict[str, Tensor]:
        """All parameters of ``net`` with the flat weights ``[P]`` written in.

        Weights of another dtype (e.g. float64 draws of a posterior whose curvature
        is kept in float64 for a float32 network) take the parameters' dtype.
        """
        current = torch.cat([self.fixed[n].flatten() for n in self.names])
        flat = weights.to(current.dtype)
        if self.indices is not None:
            flat = current.index_put((self.indices.to(current.device),), flat)
        tensors, start = dict(self.fixed), 0
        for name in self.names:
            size = self.fixed[name].numel()
            tensors[name] = flat[start : start + size].reshape(self.fixed[name].shape)
            start += size
        return tensors

    def outputs(self, weights: Tensor, x: Tensor) -> Tensor:
        """The network's outputs at the flat weights.

        Args:
            weights: ``[P]`` or batched ``[..., P]`` (evaluated with ``vmap``).
            x: Inputs ``[N, ...]``.

        Returns:
            ``[N, ...]`` or ``[..., N, ...]``.
        """
        if weights.shape[-1:] != (self.num_weights,):
            raise ValueError(
                f"{_OWNER}: expected weights of shape [..., {self.num_weights}], got "
                f"{list(weights.shape)}."
            )

        def call(flat: Tensor) -> Tensor:
            return torch.func.functional_call(self.net, self._tensors(flat), (x,))

        if weights.ndim == 1:
            return call(weights)
        flat = weights.reshape(-1, self.num_weights)
        out = torch.func.vmap(call)(flat)
        return out.reshape(*weights.shape[:-1], *out.shape[1:])

    def log_joint(self, weights: Tensor, x: Tensor, y: Tensor) -> Tensor:
        r"""The model's log joint density, computed directly (no Pyro trace).

        .. math::
            \log p(\theta) + \frac{1}{T} \sum_n \log p(y_n \mid f(x_n; \theta)),

        the same value as the trace of :meth:`forward` (``log_prob_sum``) at a
        fraction of the cost: its negative is the potential energy of HMC / NUTS
        (``pyro.infer.NUTS(potential_fn=...)``).

        Args:
            weights: ``[P]`` or batched ``[..., P]``.
            x: Inputs ``[N, ...]``.
            y: Targets (as in :meth:`forward`).

        Returns:
            ``[]`` or ``[...]``.
        """
        f = self.outputs(weights, x)
        likelihood = self.observation(f, f.ndim - weights.ndim).log_prob(y).sum(-1)
        return self.prior().log_prob(weights) + likelihood / self.temperature

    # ------------------------------------------------------------ the model
    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Sample weights, run the network, score (or sample) the targets.

        Args:
            x: Inputs ``[N, ...]``.
            y: Targets (class indices ``[N]`` for classification, else like the
                output ``[N, ...]``), or ``None`` to sample them.

        Returns:
            The network outputs ``[..., N, ...]`` (batch dimensions of enclosing
            plates, e.g. ``Predictive(parallel=True)``, first).
        """
        weights = pyro.sample(WEIGHTS_SITE, self.prior())
        # NOTE [Batched weights]: batch dimensions of the weights (vectorized
        # plates, e.g. Predictive(parallel=True)) all lie left of the data plate; a
        # trailing size-1 batch dimension is the data plate's own slot.
        batch = weights.shape[:-1]
        if batch and batch[-1] == 1:
            weights, batch = weights.squeeze(-2), batch[:-1]
        f = self.outputs(weights, x)
        event_dim = f.ndim - len(batch) - 1
        with pyro.plate(DATA_PLATE, len(x)):
            pyro.deterministic(OUTPUT_SITE, f, event_dim=event_dim)
            with pyro.poutine.scale(scale=1.0 / self.temperature):
                pyro.sample(OBSERVED_SITE, self.observation(f, event_dim), obs=y)
        return f

    def observation(self, f: Tensor, event_dim: int) -> dist.Distribution:
        r"""The likelihood :math:`p(y \mid f)` of outputs with ``event_dim`` dims.

        Classification (and reward modeling, fitted as classification on pairs)
        takes logits ``[..., C]`` or, per position, ``[..., C, *T]`` (targets
        ``[..., *T]``, as ``CrossEntropyLoss``).
        """
        if self.likelihood in {Likelihood.CLASSIFICATION, Likelihood.REWARD_MODELING}:
            positions = event_dim - 1
            logits = f.movedim(-1 - positions, -1) if positions else f
            return dist.Categorical(logits=logits).to_event(positions)
        if self.likelihood is Likelihood.REGRESSION:
            return dist.Normal(f, self.sigma_noise).to_event(event_dim)
        return dist.Bernoulli(logits=f).to_event(event_dim)
