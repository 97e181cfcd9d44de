"""Passes by name: graphopt's own plus third-party ones found through entry points.

A plugin package declares, in its pyproject.toml::

    [project.entry-points."graphopt.passes"]
    my-pass = "my_package.passes:MyPass"

and ``graphopt optimize --passes my-pass`` finds it, no fork needed. An entry
point may name a Pass subclass or a module (importing it registers its passes).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from importlib.metadata import entry_points

from ..errors import GraphoptError
from .base import Pass

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "graphopt.passes"
_REGISTRY: dict[str, type[Pass]] = {}
_loaded = False


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    other = _REGISTRY.get(cls.name)
    if other is not None and other is not cls:
        raise ValueError(f"two passes are named {cls.name!r}: {other.__module__} and {cls.__module__}")
    _REGISTRY[cls.name] = cls
    return cls


def unregister_pass(name: str) -> None:
    """Forget a pass (tests, or a host application that replaces a pass)."""
    _REGISTRY.pop(name, None)


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module("graphopt.passes")  # graphopt's own passes register on import
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as err:  # noqa: BLE001 - a broken plugin must not break graphopt
            log.warning("could not load pass plugin %s (%s): %s", ep.name, ep.value, err)
            continue
        if inspect.isclass(obj) and issubclass(obj, Pass):
            if obj.name != ep.name:
                log.warning("plugin entry point %r names pass %r; using %r", ep.name, obj.name, obj.name)
            register_pass(obj)


def refresh_plugins() -> None:
    """Look for entry points again (after installing a plugin into a running process)."""
    global _loaded
    _loaded = False
    _load()


def available_passes() -> dict[str, type[Pass]]:
    """Every registered pass, in registration order."""
    _load()
    return dict(_REGISTRY)


def get_pass(name: str) -> Pass:
    """A new instance of the pass called ``name``."""
    passes = available_passes()
    if name not in passes:
        known = ", ".join(sorted(passes))
        raise GraphoptError(f"unknown pass {name!r}", hint=f"available passes: {known}")
    return passes[name]()


LEVELS = ("simplify", "fuse")


def default_pipeline(level: str = "fuse") -> list[str]:
    """Every lossless pass up to ``level`` ("simplify" or "fuse"), in registration order."""
    if level not in LEVELS:
        raise GraphoptError(f"unknown level {level!r}", hint=f"levels: {', '.join(LEVELS)}")
    allowed = LEVELS[: LEVELS.index(level) + 1]
    return [name for name, cls in available_passes().items() if cls.lossless and cls.level in allowed]
