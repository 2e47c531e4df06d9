"""bayescurv: information beyond the gradient, and Bayesian deep learning on it."""

from bayescurv import cockpit, curvature, engine, laplace, metrics, vivit
from bayescurv.laplace import Laplace

__all__ = ["Laplace", "cockpit", "curvature", "engine", "laplace", "metrics", "vivit"]
__version__ = "0.1.0"
