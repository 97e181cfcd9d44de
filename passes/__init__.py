"""graphopt's own passes (installed as ``graphopt.passes``); importing registers them.

Import order is the default pipeline's order: cleanup, then fusions. ``prune`` is
lossy, so it registers but never joins the default pipeline.
"""

from . import cleanup, fusion, prune  # noqa: F401
