"""Configuration and hooks that travel with a pipeline run (TVM's PassContext)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .instruments import Instrument


@dataclass
class PassContext:
    """What passes may read: per-pass options, instruments, passes disabled by name.

    ``config`` keys are ``"<pass name>.<option>"`` (e.g. ``"fold-constants.max_growth"``),
    so options of different passes never collide and the CLI can set any of them.
    """

    config: dict[str, Any] = field(default_factory=dict)
    instruments: list[Instrument] = field(default_factory=list)
    disabled: set[str] = field(default_factory=set)
    max_iterations: int = 10

    def option(self, pass_name: str, key: str, default: Any = None) -> Any:
        return self.config.get(f"{pass_name}.{key}", default)
