"""bayescurv: information beyond the gradient, and Bayesian deep learning on it."""

from bayescurv import curvature, engine, metrics

__all__ = ["curvature", "engine", "metrics"]
__version__ = "0.1.0"
