"""Trace events: the one stream that the UI, trainer, audit log and evaluator all consume.

One JSON object per line (JSONL). Field meanings are documented in docs/trace-format.md.
``event_from_dict(event.to_dict()) == event`` for every event, and so does a JSONL round trip.
A file whose name ends in ``.gz`` is written gzipped; a gzipped file is read as such whatever its
name (told by its first bytes).
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import re
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar, Iterable, Iterator, TextIO, Union

from .errors import TraceFormatError


@dataclass
class StartEvent:
    kind: ClassVar[str] = "start"
    trace_id: str
    model: str
    prompt: str
    prompt_ids: list[int]
    config: dict[str, Any]
    seed: int
    group_index: int
    """Position of this rollout within its group (0..G-1)."""
    group_id: int = 0
    """Which group (prompt) of the batch this rollout belongs to."""
    gold: str | None = None
    batch: str = ""
    """The id of the ``stream()`` call that produced this rollout, shared by every row of it: a
    group is the rollouts with the same ``batch`` and ``group_id``."""
    train_step: int | None = None
    """The training step whose rollouts these are (1-based); None outside training. Not the
    token events' ``step``, which orders tokens within one trace."""


@dataclass
class TokenEvent:
    kind: ClassVar[str] = "token"
    trace_id: str
    step: int
    """Order of generation within the trace, erased tokens included."""
    token_id: int
    text: str
    entropy: float
    surprisal: float
    segment: int
    attempt: int
    index: int = 0
    """Position in the completion the token was generated at (kept prefix length + offset)."""
    top: list[list[Any]] | None = None
    """With ``record_top_k`` > 0: the k most likely tokens as [token_id, text, probability]."""


@dataclass
class SegmentEvent:
    kind: ClassVar[str] = "segment"
    trace_id: str
    segment: int
    attempt: int
    start: int
    end: int
    """Completion token span [start, end) of this attempt."""
    score: float
    features: dict[str, float]
    baseline: float | None
    penalty: float
    history: float
    threshold: float | None
    decision: str
    """accept | erase | forced_accept"""
    reason: str = ""
    """Why: below_threshold, above_threshold, warmup, no_threshold, disabled, budget, trace_cap,
    fallback (this attempt discarded for a better earlier one) or restored."""
    restored_from: int | None = None


@dataclass
class EraseEvent:
    kind: ClassVar[str] = "erase"
    trace_id: str
    segment: int
    attempt: int
    start: int
    end: int
    text: str
    cache_len_before: int
    """KV entries of this rollout (prompt + kept + attempt so far) before the rollback..."""
    cache_len_after: int
    """...and after it: the rollback point, the segment start."""


@dataclass
class DoneEvent:
    kind: ClassVar[str] = "done"
    trace_id: str
    text: str
    token_ids: list[int]
    tokens_generated: int
    erasures: int
    answer: str | None
    correct: bool | None
    finish_reason: str = "eos"
    """eos | length"""


@dataclass
class ErrorEvent:
    kind: ClassVar[str] = "error"
    trace_id: str
    message: str
    step: int = -1


Event = Union[StartEvent, TokenEvent, SegmentEvent, EraseEvent, DoneEvent, ErrorEvent]
EVENT_TYPES: dict[str, type] = {
    c.kind: c for c in (StartEvent, TokenEvent, SegmentEvent, EraseEvent, DoneEvent, ErrorEvent)
}


def event_to_dict(event: Event) -> dict[str, Any]:
    return {"event": event.kind, **dataclasses.asdict(event)}


def event_from_dict(data: dict[str, Any]) -> Event:
    """Build an event from its dict, with an error that names what is missing or unknown."""
    if not isinstance(data, dict) or "event" not in data:
        raise TraceFormatError("not an event: expected a JSON object with an 'event' field")
    kind = data["event"]
    cls = EVENT_TYPES.get(kind)
    if cls is None:
        raise TraceFormatError(f"unknown event {kind!r}; expected one of {sorted(EVENT_TYPES)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    payload = {k: v for k, v in data.items() if k != "event"}
    missing = [
        n for n, f in fields.items()
        if n not in payload and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise TraceFormatError(f"{kind} event lacks field(s) {missing}")
    unknown = sorted(set(payload) - set(fields))
    if unknown:
        raise TraceFormatError(f"{kind} event has unknown field(s) {unknown}")
    if cls is StartEvent and "batch" not in payload:
        payload.update(_legacy_start_fields(str(payload["trace_id"]), payload))
    if cls in (TokenEvent, SegmentEvent):
        _revive_non_finite(payload)
    return cls(**payload)


def json_number(value: Any) -> Any:
    """A value read from strict JSON, with the strings written for non-finite floats turned back into floats."""
    return NON_FINITE.get(value, value) if isinstance(value, str) else value


def _revive_non_finite(payload: dict[str, Any]) -> None:
    """Turn the strings ``dumps`` writes for non-finite floats back into floats, in the float
    fields of token and segment events only (a token's text may well be "NaN")."""
    for name in ("entropy", "surprisal", "score", "baseline", "penalty", "history", "threshold"):
        if name in payload:
            payload[name] = json_number(payload[name])
    if isinstance(payload.get("features"), dict):
        payload["features"] = {k: json_number(v) for k, v in payload["features"].items()}
    if isinstance(payload.get("top"), list):  # [token_id, text, probability]: only the probability
        payload["top"] = [[*t[:2], json_number(t[2]), *t[3:]] if isinstance(t, list) and len(t) > 2 else t
                          for t in payload["top"]]


# Trace ids written before start events carried batch/train_step: "<batch>-<group>-<index>", and
# the trainer's batches were "s<step>r<rank>d<round>". Only files of that age are read this way.
_LEGACY_ID = re.compile(r"^(?P<batch>.+)-(?P<group>\d+)-(?P<index>\d+)$")
_LEGACY_TRAIN_BATCH = re.compile(r"^s(?P<step>\d+)r\d+d\d+$")


def _legacy_start_fields(trace_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """batch, group_id and train_step of a start event from an old file, recovered from its id."""
    m = _LEGACY_ID.match(trace_id)
    if m is None:  # not a generator id: the rollout is a batch of its own
        return {"batch": trace_id}
    out: dict[str, Any] = {"batch": m["batch"]}
    if "group_id" not in payload:
        out["group_id"] = int(m["group"])
    if "train_step" not in payload:
        t = _LEGACY_TRAIN_BATCH.match(m["batch"])
        out["train_step"] = int(t["step"]) if t else None
    return out


# RFC 8259 JSON has no NaN or infinity, and parsers outside Python reject Python's bare NaN. A
# non-finite value can still come from the model (an infinite surprisal where a logit is -inf, a
# score built from one) and is worth keeping, so it is written as one of these strings; null would
# be ambiguous where null already means "none yet" (a segment's threshold).
NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _non_finite_name(x: float) -> str:
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def finite_json(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float (in nested dicts, lists and tuples) replaced by
    ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``, so that it encodes as strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else _non_finite_name(obj)
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def strict_dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that always writes strict JSON: non-finite floats become the strings of
    ``NON_FINITE`` (see ``finite_json``) instead of bare ``NaN``/``Infinity``. The trace, eval and
    training writers all go through it."""
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError:  # rare: only a record holding a non-finite float pays for the walk
        return json.dumps(finite_json(obj), allow_nan=False, **kwargs)


def dumps(event: Event) -> str:
    """One event as one line of strict JSON (non-finite floats as strings, read back by
    ``event_from_dict``)."""
    return strict_dumps(event_to_dict(event), ensure_ascii=False)


GZIP_MAGIC = b"\x1f\x8b"


def is_gzip(path: str | os.PathLike[str]) -> bool:
    """Whether the file starts with gzip's magic bytes (its name may say otherwise)."""
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def open_events(path: str | os.PathLike[str]) -> IO[bytes]:
    """A trace file opened for reading its bytes, decompressed when it is gzip."""
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


class TraceWriter:
    """Appends events to a JSONL file, one flushed line each, so a killed run keeps what it wrote.
    A name ending in ``.gz`` writes gzip, flushed at most every ``GZ_FLUSH_S`` seconds (a flush
    per line would cost a deflate block per line, a third more bytes): a killed run's file reads
    (``read_events(..., allow_truncated=True)``) up to what was flushed."""

    GZ_FLUSH_S = 0.5

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._gz = self.path.name.endswith(".gz")
        self._fh: TextIO = (gzip.open(self.path, "wt", encoding="utf-8") if self._gz
                            else open(self.path, "w", encoding="utf-8"))
        self._flushed = time.monotonic()

    def write(self, event: Event) -> None:
        self._fh.write(dumps(event) + "\n")
        if not self._gz or time.monotonic() - self._flushed >= self.GZ_FLUSH_S:
            self._fh.flush()
            self._flushed = time.monotonic()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_events(events: Iterable[Event], path: str | os.PathLike[str]) -> None:
    """Write a trace file (gzip when the name ends in ``.gz``). Flushed once at the end, not per
    line as ``TraceWriter`` does: a file written whole has no partial state worth keeping."""
    p = Path(path)
    opener = gzip.open if p.name.endswith(".gz") else open
    with opener(p, "wt", encoding="utf-8") as fh:
        for e in events:
            fh.write(dumps(e) + "\n")


def parse_events(lines: Iterable[bytes | str], where: str, *, allow_truncated: bool = False) -> Iterator[Event]:
    """Events from JSONL lines (as a file yields them, newline kept), one at a time. A malformed
    line raises TraceFormatError naming ``where`` and the line; a last line cut off mid-write (no
    newline), or a gzip stream that ends early, ends the events when ``allow_truncated`` (a run
    killed while writing). Bytes are decoded as UTF-8 (UnicodeDecodeError if they are not)."""
    lines = iter(lines)
    no = 0
    while True:
        try:
            line = next(lines)
        except StopIteration:
            return
        except EOFError:  # gzip: the stream stops before its end marker
            if allow_truncated:
                return
            raise TraceFormatError(f"{where}: the compressed file ends early (pass allow_truncated=True to read "
                                   f"what it holds)") from None
        except (gzip.BadGzipFile, zlib.error) as err:
            raise TraceFormatError(f"{where}: not a readable gzip file ({err})") from None
        no += 1
        text = line.decode("utf-8") if isinstance(line, bytes) else line
        if not text.strip():
            continue
        try:
            yield event_from_dict(json.loads(text))
        except (json.JSONDecodeError, TraceFormatError, TypeError) as err:
            last = not text.endswith("\n")  # no newline: the writer was cut off
            if last and allow_truncated:
                return
            hint = " (the file ends mid-line; pass allow_truncated=True to drop it)" if last else ""
            raise TraceFormatError(f"{where}:{no}: {err}{hint}") from None


def iter_events(path: str | os.PathLike[str], *, allow_truncated: bool = False) -> Iterator[Event]:
    """The events of a JSONL trace file (plain or gzip), read line by line: only one line at a time
    is held besides the events the caller keeps."""
    p = Path(path)
    if not p.is_file():
        raise TraceFormatError(f"trace file not found: {p}")
    with open_events(p) as fh:
        yield from parse_events(fh, str(p), allow_truncated=allow_truncated)


def read_events(path: str | os.PathLike[str], *, allow_truncated: bool = False) -> list[Event]:
    """Read a JSONL trace file (plain or gzip). A malformed line raises TraceFormatError naming the
    line; a last line cut off mid-write is dropped when ``allow_truncated`` (a run killed while
    writing)."""
    p = Path(path)
    if not p.is_file():  # checked here, not in the generator, so the error comes at the call
        raise TraceFormatError(f"trace file not found: {p}")
    return list(iter_events(p, allow_truncated=allow_truncated))


@dataclass
class Trace:
    """The events of one rollout, with the views every consumer needs."""

    events: list[Event] = field(default_factory=list)

    @property
    def trace_id(self) -> str:
        return self.events[0].trace_id if self.events else ""

    @property
    def start(self) -> StartEvent:
        return next(e for e in self.events if isinstance(e, StartEvent))

    @property
    def done(self) -> DoneEvent | None:
        return next((e for e in self.events if isinstance(e, DoneEvent)), None)

    @property
    def tokens(self) -> list[TokenEvent]:
        return [e for e in self.events if isinstance(e, TokenEvent)]

    @property
    def segments(self) -> list[SegmentEvent]:
        return [e for e in self.events if isinstance(e, SegmentEvent)]

    @property
    def erasures(self) -> list[EraseEvent]:
        return [e for e in self.events if isinstance(e, EraseEvent)]

    def kept_tokens(self) -> list[TokenEvent]:
        """Token events left after removing every erased attempt: the final completion."""
        erased = {(e.segment, e.attempt) for e in self.erasures}
        return [t for t in self.tokens if (t.segment, t.attempt) not in erased]


def group_traces(events: Iterable[Event]) -> list[Trace]:
    """Split an interleaved event stream into traces, in order of first appearance."""
    traces: dict[str, Trace] = {}
    for e in events:
        traces.setdefault(e.trace_id, Trace()).events.append(e)
    return list(traces.values())


def check_trace(trace: Trace, where: str) -> None:
    """Refuse, in one line naming ``where``, the trace and the field, a trace whose recorded
    numbers disagree with its own events: every loop over a loaded trace is then bounded by the
    tokens the file holds (a segment claiming 10**12 tokens is refused, not stepped through).

    Checked: segments numbered in order from 0 and attempts from 0 within each; each attempt's span
    [start, end) as long as its recorded tokens and starting where the kept text ends; each erasure
    the span of an erased attempt; the done event's kept tokens and counts."""
    tid = trace.trace_id
    tokens: dict[tuple[int, int], int] = {}
    for t in trace.tokens:
        tokens[(t.segment, t.attempt)] = tokens.get((t.segment, t.attempt), 0) + 1

    def bad(field: str, why: str) -> TraceFormatError:
        return TraceFormatError(f"{where}: trace {tid!r}: {field} {why}; the file does not describe what was "
                                f"generated, load a trace written by e3rl")

    kept, seg, attempt, erased = 0, 0, -1, set()
    for s in trace.segments:
        if s.segment == seg + 1 and attempt >= 0:
            seg, attempt = s.segment, -1
        if s.segment != seg or s.attempt != attempt + 1:
            raise bad(f"segment {s.segment} attempt {s.attempt}", f"out of order (expected segment {seg} "
                                                                  f"attempt {attempt + 1} or segment {seg + 1})")
        attempt = s.attempt
        n = tokens.get((s.segment, s.attempt), 0)
        if not (s.start == kept and s.end - s.start == n):
            raise bad(f"segment {s.segment} attempt {s.attempt} span [{s.start}, {s.end})",
                      f"disagrees with its {n} recorded tokens after {kept} kept ones")
        if s.decision == "erase":
            erased.add((s.segment, s.attempt, s.start, s.end))
        else:
            kept = s.end
    for e in trace.erasures:
        if (e.segment, e.attempt, e.start, e.end) not in erased:
            raise bad(f"erase event of segment {e.segment} attempt {e.attempt}", "matches no erased attempt")
    done = trace.done
    if done is not None:
        if done.erasures != len(trace.erasures):
            raise bad("done.erasures", f"is {done.erasures}, but the trace holds {len(trace.erasures)} erase events")
        if trace.tokens and done.tokens_generated != len(trace.tokens):
            raise bad("done.tokens_generated", f"is {done.tokens_generated}, but {len(trace.tokens)} tokens are "
                                               f"recorded")
        if trace.segments and len(done.token_ids) != kept:
            raise bad("done.token_ids", f"holds {len(done.token_ids)} tokens, but the kept segments {kept}")

