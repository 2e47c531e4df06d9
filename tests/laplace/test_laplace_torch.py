"""Same numbers as laplace-torch (when installed) for the same model and options."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayescurv import Laplace

laplace = pytest.importorskip("laplace")

# laplace-torch warns about its own defaults (link_approx, backends); not ours
pytestmark = pytest.mark.filterwarnings("ignore")

RTOL = 1e-6  # laplace-torch's backends compute parts in float32 internally


@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
@pytest.mark.parametrize("subset", ["last_layer", "all"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_evidence_and_predictive_match_laplace_torch(likelihood, subset, structure):
    torch.manual_seed(0)
    out = 3 if likelihood == "classification" else 2
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, out)).double()
    x = torch.randn(30, 4, dtype=torch.float64)
    if likelihood == "classification":
        y = torch.randint(0, out, (30,))
    else:
        y = torch.randn(30, out, dtype=torch.float64)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)  # uneven batches
    options = {"sigma_noise": 0.7} if likelihood == "regression" else {}
    results = []
    for factory in (laplace.Laplace, Laplace):
        la = factory(
            model,
            likelihood,
            subset_of_weights=subset,
            hessian_structure=structure,
            prior_precision=0.8,
            temperature=1.3,
            **options,
        )
        la.fit(loader)
        prediction = la(x[:5], pred_type="glm", link_approx="probit")
        if isinstance(prediction, tuple):
            prediction = prediction[1]
        results.append((la.log_marginal_likelihood().detach(), prediction.detach()))
    (their_evidence, their_prediction), (evidence, prediction) = results
    torch.testing.assert_close(evidence, their_evidence, rtol=RTOL, atol=0)
    torch.testing.assert_close(prediction, their_prediction, rtol=RTOL, atol=1e-12)
