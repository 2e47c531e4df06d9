"""Where the curvature of a weight subset comes from, and how it is accumulated.

* :mod:`.base`: the :class:`CurvatureSource` interface (one subset of the weights:
  its parameters, per-batch curvature, GGN products, Jacobians);
* :mod:`.engine`: all weights or a subnetwork, from the backprop engine;
* :mod:`.last_layer`: the last ``nn.Linear`` layer, in closed form from its features;
* :mod:`.jacobians`: per-sample Jacobians as factored segments;
* :mod:`.builders`: per-structure accumulation into a :mod:`bayescurv.curvature`
  object (with :mod:`.eigen` for ``lowrank``).
"""

from bayescurv.laplace.sources.base import CurvatureSource, Quantity, SourceOptions
from bayescurv.laplace.sources.builders import (
    NonFiniteCurvatureError,
    StructureBuilder,
    make_builder,
)
from bayescurv.laplace.sources.engine import EngineSource
from bayescurv.laplace.sources.last_layer import (
    LastLayerSource,
    find_last_layer,
    last_layer,
)

__all__ = [
    "CurvatureSource",
    "EngineSource",
    "LastLayerSource",
    "NonFiniteCurvatureError",
    "Quantity",
    "SourceOptions",
    "StructureBuilder",
    "find_last_layer",
    "last_layer",
    "make_builder",
]
