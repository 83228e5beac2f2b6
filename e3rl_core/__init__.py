"""E^3RL core: erasable generation driven by the model's own token uncertainty.

Data flows one way: prompt -> ErasableGenerator -> events -> (UI | trainer | audit | eval).
This package never imports the UI.
"""
from .errors import ConfigError, E3RLError, ModelLoadError, NonFiniteLogitsError, PromptError, TraceFormatError
from .events import Trace, TraceWriter, group_traces, read_events, write_events
from .generation.config import (
    EraseConfig,
    GenerationConfig,
    SamplingConfig,
    ScoreConfig,
    SegmentConfig,
    ThresholdConfig,
)
from .generation.generator import ErasableGenerator
from .models import load_model
from .overrides import apply_overrides

__all__ = [
    "ConfigError", "E3RLError", "EraseConfig", "ErasableGenerator", "GenerationConfig", "ModelLoadError",
    "NonFiniteLogitsError", "PromptError", "SamplingConfig", "ScoreConfig", "SegmentConfig",
    "ThresholdConfig", "Trace", "TraceFormatError", "TraceWriter", "apply_overrides", "group_traces",
    "load_model", "read_events", "write_events",
]
__version__ = "0.1.0"
