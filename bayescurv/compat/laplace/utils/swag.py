"""laplace-torch's ``laplace.utils.swag``."""

from bayescurv.laplace.laplace_torch.swag import fit_diagonal_swag_var

__all__ = [
    "fit_diagonal_swag_var",
]
