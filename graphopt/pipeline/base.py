"""What a pass is: a small object (or decorated function) over the IR that says what it changed."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from ..ir import Model
    from .context import PassContext


@dataclass
class PassResult:
    """``changes`` counts what the pass did (nodes removed, rewrites applied, ...)."""

    changes: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def modified(self) -> bool:
        return self.changes > 0


class Pass(ABC):
    """A transformation of a Model in place.

    Subclasses set ``name`` (how users and pipelines refer to it), ``description``,
    ``lossless`` (False for quantize/prune: never in the default pipeline) and
    ``level``: "simplify" for passes that only remove or fold what is redundant,
    "fuse" for passes that introduce fused operators for a runtime.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    lossless: ClassVar[bool] = True
    level: ClassVar[str] = "simplify"

    @abstractmethod
    def run(self, model: Model, ctx: PassContext) -> PassResult:
        """Transform ``model`` in place and report what changed."""

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


def model_pass(name: str, *, description: str = "", lossless: bool = True,
               level: str = "simplify") -> Callable[[Callable], type[Pass]]:
    """Turn ``fn(model, ctx) -> int | PassResult`` into a Pass class (the function's
    docstring becomes the description)."""

    def wrap(fn: Callable[[Model, PassContext], int | PassResult]) -> type[Pass]:
        def run(self: Pass, model: Model, ctx: PassContext) -> PassResult:
            result = fn(model, ctx)
            return result if isinstance(result, PassResult) else PassResult(int(result))

        doc = description or (fn.__doc__ or "").strip().split("\n")[0]
        cls = type(fn.__name__, (Pass,), {"name": name, "description": doc, "lossless": lossless, "level": level,
                                         "run": run, "__doc__": fn.__doc__, "__module__": fn.__module__})
        return cls

    return wrap
