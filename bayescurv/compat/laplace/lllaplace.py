"""laplace-torch's ``laplace.lllaplace``: the last-layer Laplace classes."""

from bayescurv.compat.laplace._pending import pending

__all__ = []

# names resolved on first use (not in __all__ until every one is provided)
__getattr__ = pending(
    __name__, ["LLLaplace", "FullLLLaplace", "KronLLLaplace", "DiagLLLaplace"]
)
