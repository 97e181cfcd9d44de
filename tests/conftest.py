"""Shared fixtures: IR verification around every pass in every test, the model zoo."""

from __future__ import annotations

from types import ModuleType

import pytest

from graphopt.pipeline import VerifyIRInstrument, instrument_all


@pytest.fixture(autouse=True)
def _verify_ir_after_every_pass():
    """Every pipeline run in every test checks the IR after each pass that changed it."""
    with instrument_all(VerifyIRInstrument()):
        yield


# zoo fixtures
@pytest.fixture(scope="session")
def zoo() -> ModuleType:
    """The model zoo (``tools.zoo``): ``zoo.build(name)`` gives a verified, cached ``.onnx`` path,
    ``zoo.make_inputs(zoo.MODELS[name])`` valid inputs, ``zoo.load_data(name)`` real data."""
    import tools.zoo

    return tools.zoo
