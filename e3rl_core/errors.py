"""Errors the library raises. Every message says what went wrong and what to do about it."""
from __future__ import annotations


class E3RLError(Exception):
    """Base class: an error whose message is meant for the user, printed without a traceback."""


class ConfigError(E3RLError, ValueError):
    """A configuration value is out of range, of the wrong type, or names nothing known."""


class ModelLoadError(E3RLError):
    """A model or tokenizer could not be loaded from the given path or hub id."""


class PromptError(E3RLError, ValueError):
    """A prompt is empty or does not fit the model's context."""


class NonFiniteLogitsError(E3RLError, FloatingPointError):
    """The model produced NaN or inf logits; the message names the row, step and position."""

    def __init__(self, message: str, *, row: int, step: int, position: int) -> None:
        super().__init__(message)
        self.row = row
        self.step = step
        self.position = position


class TraceFormatError(E3RLError, ValueError):
    """A trace file line is not a valid event."""
