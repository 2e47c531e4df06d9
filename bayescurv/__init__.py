"""bayescurv: information beyond the gradient, and Bayesian deep learning on it."""

from bayescurv import curvature, engine, vivit

__all__ = ["curvature", "engine", "vivit"]
__version__ = "0.1.0"
