"""laplace-torch's ``laplace.utils.metrics``."""

from bayescurv.laplace.tune.validation import RunningNLLMetric

__all__ = [
    "RunningNLLMetric",
]
