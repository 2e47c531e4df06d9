"""laplace-torch's names and forms over bayescurv's one-posterior-per-subset design.

Everything a laplace-torch user reaches for that is not a concept of its own here:

* :mod:`.flavors`: the per-(subset, structure) class names (``KronLLLaplace``, ...)
  as aliases;
* :mod:`.forms`: ``la.H`` and ``la.posterior_precision`` in laplace-torch's shapes;
* :mod:`.matrix`: its ``Kron`` and ``KronDecomposed``;
* :mod:`.backends`: its curvature interfaces (``BackPackGGN``, ``CurvlinopsEF``, ...)
  computed by bayescurv's engine;
* :mod:`.feature_extractor`, :mod:`.linalg`, :mod:`.prior_shapes`,
  :mod:`.subset_of_data`, :mod:`.swag`: its utilities.

``bayescurv.compat.laplace`` re-exports them under laplace-torch's module paths.
"""
