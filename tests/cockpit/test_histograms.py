"""Gradient histograms against numpy/torch histograms of dense per-sample gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bayescurv import cockpit as ck
from tests.cockpit.conftest import TinyProblem, run_steps


def test_1d_histogram_counts_every_element(tiny: TinyProblem):
    individual = tiny.individual_gradients()
    hist = run_steps(tiny, [ck.GradHist1d(bins=13)]).history["grad_hist_1d"].values[0]
    largest = individual.abs().max().item()
    assert torch.allclose(hist.edges, torch.linspace(-largest, largest, 14).double())
    expected, _ = torch.histogram(individual.flatten(), bins=hist.edges)
    assert torch.equal(hist.counts, expected.long())
    assert hist.counts.sum() == individual.numel()


def test_1d_histogram_counts_outside_values_in_the_edge_bins(tiny: TinyProblem):
    individual = tiny.individual_gradients().flatten()
    low, high = -0.05, 0.02
    instrument = ck.GradHist1d(bins=7, range=(low, high))
    hist = run_steps(tiny, [instrument]).history["grad_hist_1d"].values[0]
    expected, _ = torch.histogram(individual.clamp(low, high), bins=hist.edges)
    assert (individual < low).any()
    assert (individual > high).any()
    assert torch.equal(hist.counts, expected.long())


def test_2d_histogram_of_parameters_and_gradients(tiny: TinyProblem):
    individual = tiny.individual_gradients()
    params = tiny.flat_params()
    instrument = ck.GradHist2d(bins=(6, 9))
    hist = run_steps(tiny, [instrument]).history["grad_hist_2d"].values[0]
    x = params.expand_as(individual).flatten().numpy()
    y = individual.flatten().numpy()
    expected, _, _ = np.histogram2d(
        x, y, bins=[hist.x_edges.numpy(), hist.y_edges.numpy()]
    )
    assert hist.counts.shape == (6, 9)
    assert np.array_equal(hist.counts.numpy(), expected.astype(np.int64))


def test_2d_histogram_with_fixed_ranges(tiny: TinyProblem):
    individual = tiny.individual_gradients()
    params = tiny.flat_params()
    instrument = ck.GradHist2d(
        bins=(4, 5), param_range=(-0.2, 0.3), grad_range=(-0.1, 0.1)
    )
    hist = run_steps(tiny, [instrument]).history["grad_hist_2d"].values[0]
    x = params.clamp(-0.2, 0.3).expand_as(individual).flatten().numpy()
    y = individual.clamp(-0.1, 0.1).flatten().numpy()
    expected, _, _ = np.histogram2d(
        x, y, bins=[hist.x_edges.numpy(), hist.y_edges.numpy()]
    )
    assert np.array_equal(hist.counts.numpy(), expected.astype(np.int64))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ck.GradHist1d(bins=0), "bins must be a positive integer"),
        (lambda: ck.GradHist1d(range=(1.0, 1.0)), "low < high"),
        (lambda: ck.GradHist2d(bins=(3, 2.5)), "bins must be a positive integer"),
        (lambda: ck.GradHist2d(grad_range=(2.0, -1.0)), "grad_range must be"),
    ],
)
def test_invalid_histogram_options(make, match):
    with pytest.raises(ValueError, match=match):
        make()
