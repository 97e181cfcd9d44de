"""graphopt's own passes (installed as ``graphopt.passes``); importing registers them.

Import order is the default pipeline's order: cleanup, then fusions.
"""

from . import cleanup, fusion  # noqa: F401
