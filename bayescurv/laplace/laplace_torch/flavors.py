"""laplace-torch's class names as aliases over the one-posterior-per-subset design.

laplace-torch has a class per (weight subset, Hessian structure) pair, e.g.
``KronLLLaplace(LLLaplace, KronLaplace)``. Here each name is an *alias*: calling it
builds the subset's posterior with that structure, and ``isinstance`` checks the
subset and the structure, so code written against laplace-torch's classes works::

    la = KronLLLaplace(model, "classification")   # a LastLayerLaplace, kron
    isinstance(la, KronLLLaplace)                 # True
    isinstance(la, KronLaplace)                   # True, as in laplace-torch
    isinstance(Laplace(model, "classification"), KronLLLaplace)  # True

The aliases carry no behaviour; a concrete one derives from the posterior class it
builds, so ``issubclass(DiagSubnetLaplace, SubnetLaplace)`` holds as in laplace-torch.
The function-space posteriors ``FunctionalLaplace`` and ``FunctionalLLLaplace``
(``hessian_structure="gp"``) are classes of their own
(:mod:`bayescurv.laplace.function_space`); as in laplace-torch they are no
``ParametricLaplace``.

Example:
    >>> from torch import nn
    >>> la = FullLaplace(nn.Linear(2, 2), "regression")
    >>> type(la).__name__, isinstance(la, FullLaplace), isinstance(la, DiagLaplace)
    ('AllWeightsLaplace', True, False)
"""

from __future__ import annotations

from typing import Any

from bayescurv.laplace.enums import HessianStructure
from bayescurv.laplace.posterior import BaseLaplace
from bayescurv.laplace.subsets import AllWeightsLaplace, LastLayerLaplace, SubnetLaplace


class Flavor(type):
    """Metaclass of the aliases: construction and ``isinstance`` by (subset, structure).

    Attributes of an alias class:
        posterior: The posterior class it builds (``None``: abstract, no calls).
        structure: The Hessian structure it builds and checks (``None``: any).
        matches: The posterior classes ``isinstance`` accepts.
        weight_space: Whether function-space posteriors (``"gp"``) are excluded.
    """

    posterior: type[BaseLaplace] | None
    structure: HessianStructure | None
    matches: tuple[type[BaseLaplace], ...]
    weight_space: bool

    def __call__(cls, model: Any, likelihood: Any, *args: Any, **kwargs: Any) -> Any:
        """Build the alias's posterior class with its structure.

        Raises:
            TypeError: For an abstract alias.
            ValueError: For a ``hessian_structure`` other than the alias's.
        """
        if cls.posterior is None:
            raise TypeError(
                f"{cls.__name__} is abstract in laplace-torch; use Laplace(...) or a "
                "concrete class such as FullLaplace or KronLLLaplace."
            )
        if cls.structure is not None:
            given = kwargs.pop("hessian_structure", cls.structure)
            if HessianStructure(given) is not cls.structure:
                raise ValueError(
                    f"{cls.__name__} is hessian_structure='{cls.structure.value}', "
                    f"got {given!r}."
                )
            kwargs["hessian_structure"] = cls.structure
        return cls.posterior(model, likelihood, *args, **kwargs)

    def __instancecheck__(cls, instance: Any) -> bool:
        if not isinstance(instance, cls.matches):
            return False
        if cls.weight_space and instance.function_space:
            return False
        return cls.structure is None or instance.hessian_structure is cls.structure

    def __subclasscheck__(cls, subclass: type) -> bool:
        if isinstance(subclass, Flavor):
            same_posterior = all(
                any(issubclass(m, mine) for mine in cls.matches)
                for m in subclass.matches
            )
            return same_posterior and cls.structure in (None, subclass.structure)
        if cls.weight_space and getattr(subclass, "function_space", False):
            return False
        return cls.structure is None and issubclass(subclass, cls.matches)


def _flavor(
    name: str,
    posterior: type[BaseLaplace] | None,
    structure: HessianStructure | None,
    matches: tuple[type[BaseLaplace], ...],
    doc: str,
    weight_space: bool = False,
) -> Flavor:
    attributes = {
        "posterior": posterior,
        "structure": structure,
        "matches": matches,
        "weight_space": weight_space,
        "__doc__": doc,
        "__module__": __name__,
    }
    return Flavor(name, () if posterior is None else (posterior,), attributes)


_ANY = (BaseLaplace,)
_FULL, _KRON = HessianStructure.FULL, HessianStructure.KRON
_DIAG, _LOWRANK = HessianStructure.DIAG, HessianStructure.LOWRANK

ParametricLaplace = _flavor(
    "ParametricLaplace",
    None,
    None,
    _ANY,
    "Any weight-space posterior (abstract).",
    weight_space=True,
)

FullLaplace = _flavor(
    "FullLaplace", AllWeightsLaplace, _FULL, _ANY, "All weights, full structure."
)
KronLaplace = _flavor(
    "KronLaplace", AllWeightsLaplace, _KRON, _ANY, "All weights, Kronecker factors."
)
DiagLaplace = _flavor(
    "DiagLaplace", AllWeightsLaplace, _DIAG, _ANY, "All weights, diagonal."
)
LowRankLaplace = _flavor(
    "LowRankLaplace", AllWeightsLaplace, _LOWRANK, _ANY, "All weights, low rank."
)
LLLaplace = _flavor(
    "LLLaplace",
    LastLayerLaplace,
    None,
    (LastLayerLaplace,),
    "The last layer, any structure (Kronecker factors when called).",
)
FullLLLaplace = _flavor(
    "FullLLLaplace", LastLayerLaplace, _FULL, (LastLayerLaplace,), "Last layer, full."
)
KronLLLaplace = _flavor(
    "KronLLLaplace",
    LastLayerLaplace,
    _KRON,
    (LastLayerLaplace,),
    "Last layer, Kronecker factors.",
)
DiagLLLaplace = _flavor(
    "DiagLLLaplace",
    LastLayerLaplace,
    _DIAG,
    (LastLayerLaplace,),
    "Last layer, diagonal.",
)
FullSubnetLaplace = _flavor(
    "FullSubnetLaplace", SubnetLaplace, _FULL, (SubnetLaplace,), "Subnetwork, full."
)
DiagSubnetLaplace = _flavor(
    "DiagSubnetLaplace", SubnetLaplace, _DIAG, (SubnetLaplace,), "Subnetwork, diagonal."
)

__all__ = [
    "DiagLLLaplace",
    "DiagLaplace",
    "DiagSubnetLaplace",
    "Flavor",
    "FullLLLaplace",
    "FullLaplace",
    "FullSubnetLaplace",
    "KronLLLaplace",
    "KronLaplace",
    "LLLaplace",
    "LowRankLaplace",
    "ParametricLaplace",
]
