r"""Function-space Laplace: the linearized network as a GP (``hessian_structure="gp"``).

* :mod:`.posterior`: :class:`FunctionalLaplace` (all weights) and
  :class:`FunctionalLLLaplace` (last layer), laplace-torch's names and arguments;
* :mod:`.rows`: Jacobian rows and the empirical NTK between them (factored);
* :mod:`.kernel`: :class:`NTKKernel`, the NTK as a ``gpytorch`` kernel;
* :mod:`.anchors`: the anchor points' Jacobian rows, kept or recomputed;
* :mod:`.spectral`: the posterior's one form (anchors, projection, spectrum);
* :mod:`.exact`, :mod:`.nystrom`, :mod:`.variational`: its three builders;
* :mod:`.roots`: roots of the output Hessians (no inverse of a singular one);
* :mod:`.predictive`, :mod:`.tuning`, :mod:`.serialization`: ``la(x)``, the
  evidence and its tuning, ``state_dict``;
* :mod:`.exact_gp`: gpytorch's ``ExactGP`` of the linearized network (regression).

See ``docs/function_space.md``.
"""

from bayescurv.laplace.function_space.kernel import NTKKernel, decode_rows, encode_rows
from bayescurv.laplace.function_space.options import FunctionalApproximation
from bayescurv.laplace.function_space.posterior import (
    FunctionalLaplace,
    FunctionalLLLaplace,
    FunctionSpaceLaplace,
)
from bayescurv.laplace.function_space.state import FunctionSpaceState, PriorChangeError

__all__ = [
    "FunctionSpaceLaplace",
    "FunctionSpaceState",
    "FunctionalApproximation",
    "FunctionalLLLaplace",
    "FunctionalLaplace",
    "NTKKernel",
    "PriorChangeError",
    "decode_rows",
    "encode_rows",
]
