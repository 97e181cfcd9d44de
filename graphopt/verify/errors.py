"""The verification module's user-facing error."""

from __future__ import annotations

from graphopt.errors import GraphoptError


class VerificationError(GraphoptError):
    """Verification cannot run as asked: a missing or ill-typed input, a shape that
    cannot be bound, a model onnxruntime cannot load or run. The message names the
    input or model concerned.
    """
