"""The conformance suite every curvature structure inherits.

A structure's test class implements ``make`` (a data term from a generator, default
scale and no prior) and ``dense`` (the float64 reference of that data term built from
the raw inputs with plain torch ops) plus two error fixtures, and gets every test below.
Each case is the posterior ``make(...).scaled(SCALE).add_prior(prior)`` for every prior
structure in ``prior_kinds``, compared with ``SCALE * dense + diag(prior)``.
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import Tensor

from bayescurv.curvature import (
    CurvatureMatrix,
    Dense,
    Diagonal,
    NotPositiveDefiniteError,
    PriorStructure,
    structure_from_state_dict,
)
from tests.conftest import assert_close

SCALE = 1.7  # scalar data-term scale used by every case
LOOSE_SAMPLES = 20_000  # default run: catches a wrong scale or a transposed root
TIGHT_SAMPLES = 1_000_000  # montecarlo run: ~7x smaller standard errors
Z_MAX = 5.5  # largest accepted standardized error of a mean or covariance entry
FLOAT32_RTOL = 1e-4  # float32 copies (``to``) against the float64 reference
FLOAT32_ATOL = 1e-5


@dataclass
class Case:
    """A posterior under test and its dense float64 reference precision."""

    base: CurvatureMatrix
    posterior: CurvatureMatrix
    reference: Tensor
    prior: Tensor


def per_parameter(value: Tensor, block_sizes: tuple[int, ...]) -> Tensor:
    """Reference expansion of a 0-d, ``[B]`` or ``[P]`` tensor to ``[P]``."""
    num_params = sum(block_sizes)
    if value.ndim == 0:
        return value.expand(num_params)
    if value.shape[0] == len(block_sizes):
        return torch.repeat_interleave(value, torch.tensor(block_sizes))
    return value


def make_prior(
    kind: PriorStructure, block_sizes: tuple[int, ...], seed: int = 1
) -> Tensor:
    """A positive prior precision of the given structure (entries in [0.5, 1.5])."""
    gen = torch.Generator().manual_seed(seed)
    shape = {
        PriorStructure.SCALAR: (),
        PriorStructure.LAYERWISE: (len(block_sizes),),
        PriorStructure.DIAG: (sum(block_sizes),),
    }[kind]
    return 0.5 + torch.rand(shape, generator=gen, dtype=torch.float64)


def reference_precision(
    data: Tensor,
    block_sizes: tuple[int, ...],
    scale: Tensor | float,
    prior: Tensor | float,
) -> Tensor:
    """``scale * data + diag(prior)``.

    A per-block scale scales block rows: the whole block, as the data term is then
    block-diagonal.
    """
    scale = torch.as_tensor(scale, dtype=data.dtype)
    prior = torch.as_tensor(prior, dtype=data.dtype)
    rows = per_parameter(scale, block_sizes)[:, None]
    return rows * data + torch.diag(per_parameter(prior, block_sizes))


def covariance_zscores(samples: Tensor, cov: Tensor) -> tuple[Tensor, Tensor]:
    r"""Largest standardized errors of the sample mean and second moment.

    For :math:`x \sim \mathcal{N}(0, \Sigma)`, the entry :math:`\hat\Sigma_{ij}` of
    :math:`\frac1n \sum x x^\top` has variance
    :math:`(\Sigma_{ij}^2 + \Sigma_{ii}\Sigma_{jj}) / n` and :math:`\bar x_i` has
    variance :math:`\Sigma_{ii} / n`.
    """
    n = samples.shape[0]
    second_moment = samples.mT @ samples / n
    variance = (cov.square() + torch.outer(cov.diagonal(), cov.diagonal())) / n
    cov_z = ((second_moment - cov).abs() / variance.sqrt()).max()
    mean_z = (samples.mean(0).abs() / (cov.diagonal() / n).sqrt()).max()
    return mean_z, cov_z


class CurvatureConformance(ABC):
    """Tests every :class:`CurvatureMatrix` passes; subclass and implement ``make``."""

    prior_kinds: ClassVar[tuple[PriorStructure, ...]] = tuple(PriorStructure)
    """Prior structures the structure supports (parametrizes ``prior_kind``)."""
    cheap_prior_kinds: ClassVar[tuple[PriorStructure, ...]] = (PriorStructure.SCALAR,)
    """Prior structures whose re-evaluation reuses the cached decomposition."""
    has_data_eigenvalues: ClassVar[bool] = True
    """Whether ``data_eigenvalues`` is available (scalar scale)."""
    allowed_refactor_size: ClassVar[int] = 0
    """Largest matrix a re-evaluation may decompose (e.g. a ``[k, k]`` capacitance)."""

    @abstractmethod
    def make(self, generator: torch.Generator) -> CurvatureMatrix:
        """A float64 data term (scale 1, no prior)."""

    @abstractmethod
    def dense(self, obj: CurvatureMatrix) -> Tensor:
        """Reference dense data term of ``obj``, from its raw inputs."""

    @abstractmethod
    def make_with_nan(self) -> CurvatureMatrix:
        """Construct the structure from inputs containing NaN (must raise)."""

    @abstractmethod
    def make_singular(self) -> CurvatureMatrix:
        """An exactly singular data term (no prior)."""

    # ------------------------------------------------------------------ fixtures
    @pytest.fixture
    def case(self, prior_kind: PriorStructure) -> Case:
        base = self.make(torch.Generator().manual_seed(0))
        prior = make_prior(prior_kind, base.block_sizes)
        posterior = base.scaled(SCALE).add_prior(prior)
        reference = reference_precision(
            self.dense(base), base.block_sizes, SCALE, prior
        )
        return Case(base, posterior, reference, prior)

    # ------------------------------------------------------ against the reference
    def test_dense(self, case: Case) -> None:
        assert case.posterior.dense().dtype == torch.float64
        assert_close(case.posterior.dense(), case.reference, "dense")
        assert_close(case.base.dense(), self.dense(case.base), "data term")

    def test_diagonal(self, case: Case) -> None:
        assert_close(case.posterior.diagonal(), case.reference.diagonal(), "diagonal")

    @pytest.mark.parametrize("cols", [None, 3], ids=["vector", "matrix"])
    def test_mvp(self, case: Case, cols: int | None) -> None:
        v = self._rhs(case, cols)
        assert_close(case.posterior.mvp(v), case.reference @ v, "mvp")

    @pytest.mark.parametrize("cols", [None, 3], ids=["vector", "matrix"])
    def test_solve(self, case: Case, cols: int | None) -> None:
        v = self._rhs(case, cols)
        expected = torch.linalg.solve(case.reference, v)
        assert_close(case.posterior.solve(v), expected, "solve")

    def test_logdet(self, case: Case) -> None:
        assert_close(case.posterior.logdet(), torch.logdet(case.reference), "logdet")

    def test_inverse(self, case: Case) -> None:
        expected = torch.linalg.inv(case.reference)
        assert_close(case.posterior.inverse(), expected, "inverse")
        assert_close(
            case.posterior.inverse_diagonal(), expected.diagonal(), "inverse_diagonal"
        )

    def test_inv_quad_form_batch(self, case: Case) -> None:
        gen = torch.Generator().manual_seed(2)
        jac = torch.randn(
            4, 3, case.base.num_params, generator=gen, dtype=torch.float64
        )
        expected = jac @ torch.linalg.inv(case.reference) @ jac.mT
        assert_close(case.posterior.inv_quad_form_batch(jac), expected, "J S J^T")

    def test_logdet_gradient(self, prior_kind: PriorStructure) -> None:
        base = self.make(torch.Generator().manual_seed(0))
        prior = make_prior(prior_kind, base.block_sizes).requires_grad_()
        scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
        value = base.logdet_with_prior(prior, scale)
        grads = torch.autograd.grad(value, (prior, scale))
        dense = reference_precision(self.dense(base), base.block_sizes, scale, prior)
        expected = torch.logdet(dense)
        expected_grads = torch.autograd.grad(expected, (prior, scale))
        assert_close(value, expected, "logdet")
        assert_close(grads[0], expected_grads[0], "d logdet / d prior")
        assert_close(grads[1], expected_grads[1], "d logdet / d scale")

    def test_data_eigenvalues(self) -> None:
        """The spectrum of the scaled data term: eigvalsh, and scalar-prior logdets."""
        base = self.make(torch.Generator().manual_seed(0))
        values = base.scaled(SCALE).data_eigenvalues()
        if not self.has_data_eigenvalues:
            assert values is None
            return
        data = SCALE * self.dense(base)
        assert_close(values.sort().values, torch.linalg.eigvalsh(data), "spectrum")
        eye = torch.eye(base.num_params, dtype=torch.float64)
        for factor, prior in ((1.0, 0.3), (2.5, 4.0)):
            expected = torch.logdet(factor * data + prior * eye)
            assert_close((factor * values + prior).log().sum(), expected, "logdet")

    def test_per_block_scale(self) -> None:
        base = self.make(torch.Generator().manual_seed(0))
        scale = torch.linspace(1.0, 2.0, base.num_blocks, dtype=torch.float64)
        if not type(base).supports_block_scale:
            with pytest.raises(ValueError, match="scale is not supported"):
                base.scaled(scale)
            return
        posterior = base.scaled(scale).add_prior(0.5)
        expected = reference_precision(self.dense(base), base.block_sizes, scale, 0.5)
        assert_close(posterior.dense(), expected, "dense")
        assert_close(posterior.logdet(), torch.logdet(expected), "logdet")

    # ------------------------------------------------------------------ sampling
    def test_sample_covariance(self, case: Case) -> None:
        gen = torch.Generator().manual_seed(0)
        samples = case.posterior.sample(LOOSE_SAMPLES, generator=gen)
        assert samples.shape == (LOOSE_SAMPLES, case.base.num_params)
        mean_z, cov_z = covariance_zscores(samples, torch.linalg.inv(case.reference))
        assert mean_z < Z_MAX
        assert cov_z < Z_MAX

    @pytest.mark.montecarlo
    def test_sample_covariance_tight(self, case: Case) -> None:
        gen = torch.Generator().manual_seed(0)
        chunks = [
            case.posterior.sample(TIGHT_SAMPLES // 4, generator=gen) for _ in "abcd"
        ]
        mean_z, cov_z = covariance_zscores(
            torch.cat(chunks), torch.linalg.inv(case.reference)
        )
        assert mean_z < Z_MAX
        assert cov_z < Z_MAX

    def test_sample_generator_is_reproducible(self, case: Case) -> None:
        first = case.posterior.sample(5, generator=torch.Generator().manual_seed(3))
        second = case.posterior.sample(5, generator=torch.Generator().manual_seed(3))
        assert torch.equal(first, second)
        assert first.dtype == torch.float64
        with pytest.raises(ValueError, match="positive int"):
            case.posterior.sample(0)

    # --------------------------------------------- immutability, caching, state
    def test_add_prior_returns_new_object(self, case: Case) -> None:
        before = case.base.dense().clone()
        twice = (
            case.base.scaled(SCALE)
            .add_prior(case.prior / 4)
            .add_prior(case.prior * 0.75)
        )
        assert_close(twice.dense(), case.reference, "prior added in two steps")
        assert torch.equal(case.base.dense(), before)
        assert case.base.prior_precision.item() == 0.0

    def test_new_prior_reuses_decomposition(
        self, decomposition_sizes: list[int]
    ) -> None:
        base = self.make(torch.Generator().manual_seed(0))
        base.add_prior(1.0).logdet()  # the one-time decomposition
        decomposition_sizes.clear()
        for kind in self.cheap_prior_kinds:
            prior = make_prior(kind, base.block_sizes).requires_grad_()
            scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
            base.logdet_with_prior(prior, scale).backward()
            base.add_prior(prior.detach() * 10).logdet()
        assert all(size <= self.allowed_refactor_size for size in decomposition_sizes)

    def test_state_dict_round_trip(
        self, case: Case, decomposition_sizes: list[int]
    ) -> None:
        case.base.add_prior(1.0).logdet()  # cache the decomposition before saving
        buffer = io.BytesIO()
        torch.save([case.posterior.state_dict(), case.base.state_dict()], buffer)
        buffer.seek(0)
        posterior_state, base_state = torch.load(buffer, weights_only=True)
        restored = type(case.posterior).from_state_dict(posterior_state)
        assert_close(restored.dense(), case.reference, "restored dense")
        assert_close(restored.logdet(), torch.logdet(case.reference), "restored logdet")
        assert restored.block_names == case.posterior.block_names
        generic = structure_from_state_dict(posterior_state)
        assert type(generic) is type(case.posterior)
        decomposition_sizes.clear()
        structure_from_state_dict(base_state).add_prior(1.0).logdet()
        assert all(size <= self.allowed_refactor_size for size in decomposition_sizes)
        other = Dense if not isinstance(case.posterior, Dense) else Diagonal
        with pytest.raises(ValueError, match="holds a"):
            other.from_state_dict(posterior_state)

    def test_to_float32(self, case: Case) -> None:
        single = case.posterior.to(torch.float32)
        assert single.dtype == torch.float32
        assert single.sample(2).dtype == torch.float32
        tolerances = {"rtol": FLOAT32_RTOL, "atol": FLOAT32_ATOL}
        torch.testing.assert_close(
            single.dense().double(), case.reference, **tolerances
        )
        expected = torch.logdet(case.reference)
        torch.testing.assert_close(single.logdet().double(), expected, **tolerances)

    # -------------------------------------------------------------------- errors
    def test_invalid_prior_raises(self) -> None:
        base = self.make(torch.Generator().manual_seed(0))
        name = type(base).__name__
        with pytest.raises(
            ValueError, match=rf"{name}: prior precision must be non-neg"
        ):
            base.add_prior(-1.0)
        with pytest.raises(ValueError, match=rf"{name}: prior precision contains NaN"):
            base.add_prior(float("nan"))
        with pytest.raises(
            ValueError, match=rf"shape \[{base.num_params}\]; got shape"
        ):
            base.add_prior(torch.ones(base.num_params + 1))
        with pytest.raises(ValueError, match=rf"{name}: scale must be non-negative"):
            base.scaled(-2.0)

    def test_wrong_shapes_raise(self) -> None:
        base = self.make(torch.Generator().manual_seed(0)).add_prior(1.0)
        p = base.num_params
        with pytest.raises(ValueError, match=rf"expected a tensor of shape \[{p}\]"):
            base.solve(torch.zeros(p + 1, dtype=torch.float64))
        with pytest.raises(ValueError, match=rf"\[{p}, K\], got \[{p}, 2, 1\]"):
            base.mvp(torch.zeros(p, 2, 1, dtype=torch.float64))
        with pytest.raises(ValueError, match=rf"\[N, C, {p}\], got \[2, {p}\]"):
            base.inv_quad_form_batch(torch.zeros(2, p, dtype=torch.float64))

    def test_nonfinite_input_raises(self) -> None:
        with pytest.raises(ValueError, match="NaN or inf") as info:
            self.make_with_nan()
        assert type(self.make(torch.Generator())).__name__ in str(info.value)

    def test_singular_raises(self) -> None:
        singular = self.make_singular()
        match = f"{type(singular).__name__}: the precision is not positive definite"
        operations = [
            singular.logdet,
            singular.inverse,
            lambda: singular.solve(
                torch.ones(singular.num_params, dtype=torch.float64)
            ),
            lambda: singular.sample(3),
        ]
        for operation in operations:
            with pytest.raises(NotPositiveDefiniteError, match=match):
                operation()

    # ------------------------------------------------------------------- helpers
    @staticmethod
    def _rhs(case: Case, cols: int | None) -> Tensor:
        gen = torch.Generator().manual_seed(5)
        shape = (
            (case.base.num_params,) if cols is None else (case.base.num_params, cols)
        )
        return torch.randn(shape, generator=gen, dtype=torch.float64)
