"""Shared fixtures: IR verification around every pass in every test, model builders."""

from __future__ import annotations

import pytest

from graphopt.pipeline import VerifyIRInstrument, instrument_all


@pytest.fixture(autouse=True)
def _verify_ir_after_every_pass():
    """Every pipeline run in every test checks the IR after each pass that changed it."""
    with instrument_all(VerifyIRInstrument()):
        yield
