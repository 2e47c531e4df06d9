"""Other libraries' APIs on bayescurv, so that switching is an import line.

* :mod:`bayescurv.compat.backpack`: BackPACK's ``backpack``/``extend`` and its
  extensions, computed by :func:`bayescurv.engine.backprop` (see
  ``docs/migrating_backpack.md``).
* :mod:`bayescurv.compat.laplace`: laplace-torch's module paths (``laplace.utils``,
  ``laplace.curvature``, ...), re-exporting bayescurv's implementations.
"""
