"""bayescurv: information beyond the gradient, and Bayesian deep learning on it."""

from bayescurv import curvature, engine, metrics, vivit

__all__ = ["curvature", "engine", "metrics", "vivit"]
__version__ = "0.1.0"
