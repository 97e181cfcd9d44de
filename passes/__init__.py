"""graphopt's own passes (installed as ``graphopt.passes``); importing registers them."""

from . import cleanup  # noqa: F401
