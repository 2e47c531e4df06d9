"""laplace-torch's ``laplace.marglik_training``."""

from bayescurv.laplace.tune.marglik_training import marglik_training

__all__ = [
    "marglik_training",
]
