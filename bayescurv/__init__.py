"""bayescurv: information beyond the gradient, and Bayesian deep learning on it."""

from bayescurv import curvature, engine, laplace
from bayescurv.laplace import Laplace

__all__ = ["Laplace", "curvature", "engine", "laplace"]
__version__ = "0.1.0"
