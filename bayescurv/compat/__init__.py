"""Other libraries' APIs on bayescurv, so that switching is an import line.

* :mod:`bayescurv.compat.backpack`: BackPACK's ``backpack``/``extend`` and its
  extensions, computed by :func:`bayescurv.engine.backprop` (see
  ``docs/migrating_backpack.md``).

The Laplace layer mirrors laplace-torch's API directly (``bayescurv.Laplace``).
"""

from bayescurv.compat import backpack

__all__ = ["backpack"]
