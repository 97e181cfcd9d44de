"""User-facing errors.

Everything a user can cause (a bad file, a bad flag, a graph that is not a DAG)
raises a :class:`GraphoptError`; the CLI prints its message and exits non-zero
without a traceback. Anything else is a bug in graphopt and keeps its traceback.
"""

from __future__ import annotations


class GraphoptError(Exception):
    """An error in the user's input, with a message meant for people."""

    def __init__(self, message: str, *, node: str | None = None, hint: str | None = None) -> None:
        self.node = node
        self.hint = hint
        text = message if node is None else f"{message} (node {node!r})"
        if hint:
            text = f"{text}\n  hint: {hint}"
        super().__init__(text)


class ModelLoadError(GraphoptError):
    """The model file cannot be read: corrupt protobuf, bad external data, bad path."""


class GraphStructureError(GraphoptError):
    """The graph is not well formed: dangling edge, cycle, duplicate names."""


class ModelSaveError(GraphoptError):
    """The output cannot be written where or how the user asked."""
