"""bayescurv: information beyond the gradient, and Bayesian deep learning on it."""

from bayescurv import curvature, engine, laplace, metrics
from bayescurv.laplace import Laplace

__all__ = ["Laplace", "curvature", "engine", "laplace", "metrics"]
__version__ = "0.1.0"
