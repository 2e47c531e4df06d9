"""bayescurv: information beyond the gradient, and Bayesian deep learning on it."""

from bayescurv import cockpit, curvature, engine, laplace, metrics, recipes, vivit
from bayescurv.laplace import Laplace

__all__ = [
    "Laplace",
    "cockpit",
    "curvature",
    "engine",
    "laplace",
    "metrics",
    "recipes",
    "vivit",
]
__version__ = "0.1.0"
