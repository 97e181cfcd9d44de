"""Pass infrastructure: Pass, PassManager, PassContext, instruments and the registry."""

from .base import Pass, PassResult, model_pass
from .context import PassContext
from .instruments import (
    DumpIRInstrument,
    Instrument,
    NumericsInstrument,
    PassBrokeGraph,
    PassStats,
    TimingInstrument,
    VerifyIRInstrument,
)
from .manager import PassManager, PipelineReport, instrument_all
from .registry import available_passes, default_pipeline, get_pass, refresh_plugins, register_pass, unregister_pass

__all__ = [
    "DumpIRInstrument", "Instrument", "NumericsInstrument", "Pass", "PassBrokeGraph", "PassContext",
    "PassManager", "PassResult", "PassStats", "PipelineReport", "TimingInstrument", "VerifyIRInstrument",
    "available_passes", "default_pipeline", "get_pass", "instrument_all", "model_pass", "refresh_plugins",
    "register_pass", "unregister_pass",
]
