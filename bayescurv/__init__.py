"""bayescurv: information beyond the gradient, and Bayesian deep learning on it."""

from bayescurv import curvature, engine

__all__ = ["curvature", "engine"]
__version__ = "0.1.0"
