"""Hyperparameters from the data: the evidence and tuning on it or on validation data.

* :mod:`.evidence`: the Laplace evidence of (fitted state, hyperparameters);
* :mod:`.spectral`: its :math:`O(P)` form for a scalar prior from the spectrum;
* :mod:`.prior`: ``optimize_prior_precision(method="marglik")`` (Adam on the evidence);
* :mod:`.gridsearch`: ``method="gridsearch"`` on a validation loss;
* :mod:`.marglik_training`: evidence-based training of weights and hyperparameters.
"""
