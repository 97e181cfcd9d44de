"""graphopt's own passes (installed as ``graphopt.passes``); importing registers them.

Import order is the default pipeline's order: cleanup, simplification, then fusions. ``prune`` is
lossy, so it registers but never joins the default pipeline.
"""

from . import cleanup, simplify, fusion, prune  # noqa: F401, I001 - order = pipeline order
