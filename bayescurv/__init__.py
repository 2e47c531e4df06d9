"""bayescurv: information beyond the gradient, and Bayesian deep learning on it."""

from bayescurv import engine

__all__ = ["engine"]
__version__ = "0.1.0"
