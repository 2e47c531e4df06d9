"""Other libraries' APIs on bayescurv, so that switching is an import line.

* :mod:`bayescurv.compat.laplace`: laplace-torch's module paths (``laplace.utils``,
  ``laplace.curvature``, ...), re-exporting bayescurv's implementations.
"""
