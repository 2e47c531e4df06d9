r"""The predictive distribution of a fitted posterior.

* :mod:`.predictive`: ``la(x, ...)``, functional and predictive samples, as functions
  of a :class:`~.predictive.Context`;
* :mod:`.glm`: the linearized network's Gaussian over the outputs;
* :mod:`.variance`: :math:`J \Lambda^{-1} J^\top` in closed forms per factorization;
* :mod:`.links`: probit, Laplace bridge and Monte Carlo link approximations;
* :mod:`.sampling`: networks with sampled weights (``pred_type="nn"``).
"""

from bayescurv.laplace.predict.predictive import (
    Context,
    functional_samples,
    glm_moments,
    predict,
    predictive_samples,
)

__all__ = [
    "Context",
    "functional_samples",
    "glm_moments",
    "predict",
    "predictive_samples",
]
