"""E^3RL core: erasable generation driven by the model's own token uncertainty.

Data flows one way: prompt -> ErasableGenerator -> events -> (UI | trainer | audit | eval).
This package never imports the UI.
"""
from .config import (
    EraseConfig,
    GenerationConfig,
    SamplingConfig,
    ScoreConfig,
    SegmentConfig,
    ThresholdConfig,
    apply_overrides,
)
from .errors import ConfigError, E3RLError, ModelLoadError, NonFiniteLogitsError, PromptError, TraceFormatError
from .events import Trace, TraceWriter, group_traces, read_events, write_events
from .generator import ErasableGenerator
from .model_io import load_model

__all__ = [
    "ConfigError", "E3RLError", "EraseConfig", "ErasableGenerator", "GenerationConfig", "ModelLoadError",
    "NonFiniteLogitsError", "PromptError", "SamplingConfig", "ScoreConfig", "SegmentConfig",
    "ThresholdConfig", "Trace", "TraceFormatError", "TraceWriter", "apply_overrides", "group_traces",
    "load_model", "read_events", "write_events",
]
__version__ = "0.1.0"
