"""The audit: every erasure decision as a table row, exports, trace files, and what-if re-scoring.

Pure functions over events and pandas (no gradio). ``what_if`` re-judges the *recorded* attempts of
a trace's group under other threshold parameters by replaying the real threshold policy over the
recorded segment features; what the model would have generated after a changed decision is unknown,
so only decisions on attempts that exist can change.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Sequence

import pandas as pd

from e3rl_core.errors import E3RLError, TraceFormatError
from e3rl_core.exports import FORMULA_STARTS, spreadsheet_safe, write_csv  # noqa: F401  (re-exported)
from e3rl_core.events import (
    Event,
    SegmentEvent,
    StartEvent,
    TokenEvent,
    Trace,
    check_trace,
    dumps,
    group_traces,
    is_gzip,
    open_events,
    parse_events,
    write_events,
)
from e3rl_core.generation.config import GenerationConfig, ThresholdConfig
from e3rl_core.generation.decision import ScoredAttempt, decide, margin, near_threshold
from e3rl_core.generation.schedule import decision_order
from e3rl_core.generation.scoring import SegmentFeatures, segment_score
from e3rl_core.generation.thresholds import make_policy
from e3rl_core.overrides import with_values

from .render import clip

COLUMNS = ["trace", "source", "segment", "attempt", "base", "max", "delta", "score", "baseline", "penalty",
           "history", "threshold", "margin", "near_threshold", "decision", "reason", "erased_text", "replacement", "answer", "correct",
           "correct_without_erasure", "flipped"]


def counterfactual_twins(traces: Sequence[Trace]) -> dict[str, Trace]:
    """Trace id of an erasure-on rollout -> the erasure-off rollout of the same prompt, seed and
    settings otherwise (what the Counterfactual button generates), when one was recorded."""
    def key(tr: Trace) -> tuple:
        cfg = dict(tr.start.config)
        cfg["erase"] = {k: v for k, v in cfg.get("erase", {}).items() if k != "enabled"}
        return tr.start.prompt, tr.start.seed, json.dumps(cfg, sort_keys=True)

    off = {key(t): t for t in traces if not t.start.config.get("erase", {}).get("enabled", True)}
    return {t.trace_id: off[key(t)] for t in traces
            if t.start.config.get("erase", {}).get("enabled", True) and key(t) in off}


MAX_TRACE_FILE_BYTES = 96 * 2**20
"""The largest trace file an upload may be, as stored (plain or gzip): gradio refuses a larger one
before it reaches the disk. A G = 8 x 16k-token group with top-5 alternatives is about 70 MB of JSONL."""
MAX_TRACE_TEXT_BYTES = 128 * 2**20
"""The most JSONL text one file may hold once decompressed: reading stops there, so a small gzip
file that inflates to gigabytes costs no more than this."""
MAX_SESSION_TRACE_BYTES = 128 * 2**20
"""JSONL text (decompressed) one browser session holds loaded at once; its events stay in the
server's memory, at most about MEMORY_PER_TEXT_BYTE times this."""
MAX_SERVER_TRACE_BYTES = 512 * 2**20
"""JSONL text all sessions of one server hold loaded at once (about 1.8 GB of memory at
MEMORY_PER_TEXT_BYTE): past it, a load is refused until sessions end or expire."""
MEMORY_PER_TEXT_BYTE = 3.5
"""Bytes of server memory a loaded event costs per byte of its JSONL text (3.1 measured on long
rollouts with top-5 alternatives, once ``_compact``; 5.3 before), tested in tests/app/test_audit_gz.py."""
MAX_CELL_CHARS = 1000
"""Characters of a text cell the tables show (exports keep every character)."""


def decisions_frame(traces: Sequence[Trace], source: str = "session") -> pd.DataFrame:
    """One row per segment decision (first attempts and retries) of the given traces."""
    rows = []
    twins = counterfactual_twins(traces)
    for tr in traces:
        segs = tr.segments
        twin = twins.get(tr.trace_id)
        twin_correct = twin.done.correct if twin is not None and twin.done else None
        texts: dict[tuple[int, int], str] = {}
        for t in tr.tokens:
            texts[(t.segment, t.attempt)] = texts.get((t.segment, t.attempt), "") + t.text
        done = tr.done
        for s in segs:
            erased = s.decision == "erase"
            rows.append({
                "trace": tr.trace_id, "source": source, "segment": s.segment, "attempt": s.attempt,
                "base": s.features.get("base"), "max": s.features.get("max"), "delta": s.features.get("delta"),
                "score": s.score, "baseline": s.baseline, "penalty": s.penalty, "history": s.history,
                "threshold": s.threshold, "margin": margin(s.score, s.threshold),
                "near_threshold": near_threshold(s.score, s.threshold), "decision": s.decision, "reason": s.reason,
                "erased_text": texts.get((s.segment, s.attempt), "") if erased else "",
                "replacement": texts.get((s.segment, s.attempt + 1), "") if erased else "",
                "answer": done.answer if done else None, "correct": done.correct if done else None,
                "correct_without_erasure": twin_correct,
                "flipped": None if twin_correct is None or done is None or done.correct is None
                else bool(done.correct) != bool(twin_correct),
            })
    return pd.DataFrame(rows, columns=COLUMNS)


def filter_frame(df: pd.DataFrame, only_erasures: bool = False, trace: str = "", sort_by: str = "",
                 descending: bool = True, only_flipped: bool = False) -> pd.DataFrame:
    """only_flipped: erasures in rollouts whose answer correctness differs from their erasure-off
    counterfactual (run the Counterfactual to record one)."""
    out = df
    if only_erasures or only_flipped:
        out = out[out["decision"] == "erase"]
    if only_flipped:
        out = out[out["flipped"] == True]  # noqa: E712 (column holds True/False/None)
    if trace:
        out = out[out["trace"].astype(str).str.contains(trace, regex=False)]
    if sort_by and sort_by in out.columns:
        out = out.sort_values(sort_by, ascending=not descending, kind="stable")
    return out


MAX_EXPORTS = 64
"""Export folders kept at once (all sessions); past it the oldest are removed first."""


def export_dir(root: str | os.PathLike[str], max_age_s: float = 3600.0) -> Path:
    """A new folder under ``root`` for one export. Each export gets its own, so the files keep their
    plain names (e3rl-audit.csv, ...) while two sessions exporting at once never overwrite each
    other's; folders of exports older than ``max_age_s`` are removed on the way (the browser has
    long since fetched them)."""
    base = Path(root)
    base.mkdir(parents=True, exist_ok=True)
    cutoff = time.time() - max_age_s
    exports = []
    for old in base.glob("export-*"):
        try:
            if old.is_dir() and old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)
            elif old.is_dir():
                exports.append((old.stat().st_mtime, old))
        except OSError:
            pass  # removed by another session meanwhile
    for _, old in sorted(exports)[: max(0, len(exports) - MAX_EXPORTS + 1)]:  # the oldest past the bound
        shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=base, prefix="export-"))


def export(df: pd.DataFrame, directory: str | os.PathLike[str], stem: str = "e3rl-audit", compress: bool = False,
           traces: Sequence[Trace] = ()) -> list[Path]:
    """Write the table as CSV and JSONL, and ``traces`` (the table's rollouts) as a trace file the
    Audit tab loads again; with ``compress`` the two JSONL files are gzipped (``.jsonl.gz``).
    Each file is written under a temporary name and renamed, so a reader never sees half of one."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    gz = ".gz" if compress else ""
    csv, rows, events = d / f"{stem}.csv", d / f"{stem}.jsonl{gz}", d / f"{stem}-traces.jsonl{gz}"
    # Every text cell quoted: one holding a line break or carriage return stays one cell.
    writers = [(csv, lambda p: write_csv(df, p)),
               (rows, lambda p: df.to_json(p, orient="records", lines=True, force_ascii=False,
                                           compression="gzip" if compress else None))]
    if traces:  # the trace writer picks gzip by the name's .gz, which the temporary name keeps
        writers.append((events, lambda p: write_events((e for t in traces for e in t.events), p)))
    for path, write in writers:
        tmp = path.with_name(f".tmp-{path.name}")
        write(tmp)
        os.replace(tmp, path)
    return [path for path, _ in writers]


def _compact(event: Event) -> Event:
    """A loaded event made smaller in place: its repeated strings (trace id, token texts, which
    come from one vocabulary) shared, and a token's top-k alternatives held as tuples. A token
    event with top-5 costs 3.1 bytes per byte of JSONL text so, 5.3 as parsed."""
    event.trace_id = sys.intern(event.trace_id)
    if isinstance(event, TokenEvent):
        event.text = _shared(event.text)
        if event.top:
            event.top = tuple((t[0], _shared(t[1]), *t[2:]) if isinstance(t, list) and len(t) > 1 else t
                              for t in event.top)
    return event


def _shared(text: Any) -> Any:
    return sys.intern(text) if isinstance(text, str) and len(text) <= 64 else text  # a long text is rarely repeated


class TraceTooLarge(E3RLError):
    """A trace file holds more JSONL text than may be loaded."""


def _bounded_lines(fh: IO[bytes], limit: int, read: list[int]) -> Iterator[bytes]:
    """The file's lines, one at a time; raises TraceTooLarge once more than ``limit`` bytes were
    read (each line is read with at most the bytes left, so one endless line costs no more).
    ``read[0]`` counts the bytes read so far."""
    while True:
        line = fh.readline(limit - read[0] + 1)
        if not line:
            return
        read[0] += len(line)
        if read[0] > limit:
            raise TraceTooLarge(f"more than {limit / 2**20:.0f} MiB of JSONL text")
        yield line


def load_trace_file(path: str | os.PathLike[str], name: str | None = None) -> list[Trace]:
    """Traces from a JSONL event file, plain or gzip; see ``read_trace_file``."""
    return read_trace_file(path, name)[0]


def read_trace_file(path: str | os.PathLike[str], name: str | None = None,
                    max_text_bytes: int = MAX_TRACE_TEXT_BYTES) -> tuple[list[Trace], int]:
    """Traces from a JSONL event file, plain or gzip (told by its first bytes, whatever its name),
    validated, and the bytes of JSONL text read. The file is streamed: what stays in memory is its
    events, and reading stops once ``max_text_bytes`` of text were read (TraceTooLarge). Errors say
    what is wrong and where; ``name``: the file as its user named it (an upload's original name),
    which errors use instead of the path."""
    p = Path(path)
    name = name or p.name
    if not p.is_file():
        raise E3RLError(f"no such trace file: {name}")
    if p.stat().st_size > MAX_TRACE_FILE_BYTES:
        raise E3RLError(f"{name} is {p.stat().st_size / 2**20:.0f} MiB; load at most "
                        f"{MAX_TRACE_FILE_BYTES // 2**20} MiB of traces at once (gzip it or split the file)")
    read = [0]
    try:
        with open_events(p) as fh:
            lines = _bounded_lines(fh, max_text_bytes, read)
            events = [_compact(e) for e in parse_events(lines, name, allow_truncated=True)]
    except UnicodeDecodeError:
        raise TraceFormatError(f"{name} is not a UTF-8 text file; load a JSONL trace written by e3rl") from None
    except TraceTooLarge as err:
        raise TraceTooLarge(f"{name} holds {err}; load at most {max_text_bytes // 2**20} MiB of traces "
                            f"at once (split the file)") from None
    except TraceFormatError as err:  # its message starts with the name read
        raise TraceFormatError(f"{err}; load a JSONL trace written by e3rl") from None
    if not events:
        raise TraceFormatError(f"{name} holds no events; load a JSONL trace written by e3rl generate --trace-out")
    traces = group_traces(events)
    starts = [t for t in traces if not any(isinstance(e, StartEvent) for e in t.events)]
    if starts:
        raise TraceFormatError(f"{name}: trace {starts[0].trace_id!r} has no start event; the file is incomplete")
    for t in traces:  # before anything (replay, what-if) loops over what it claims
        check_trace(t, name)
    return traces, read[0]


@dataclass(eq=False)
class LoadedTraces:
    """The trace files one browser session loaded: their traces (each trace id once), the digests
    of the files read (the same file twice adds nothing) and their total size on disk."""

    traces: list[Trace] = field(default_factory=list)
    digests: set[str] = field(default_factory=set)
    nbytes: int = 0

    def add(self, path: str | os.PathLike[str], name: str, max_bytes: int = MAX_SESSION_TRACE_BYTES,
            known: Iterable[str] = (), server_room: int | None = None) -> str:
        """Load one file (plain or gzip) into the session; returns what happened, in a line. Traces
        whose id is loaded already (or in ``known``: the session's own) are skipped, so no decision
        is listed twice. ``nbytes`` counts JSONL text (decompressed), which is what memory follows.
        ``server_room``: what the server's budget for all sessions has left (None: no such budget).
        Raises E3RLError, changing nothing, for a bad file or one over the session's or server's budget."""
        p = Path(path)
        if not p.is_file() or p.stat().st_size > MAX_TRACE_FILE_BYTES:
            load_trace_file(p, name)  # raises the error that says so
        digest = _digest(p)
        if digest in self.digests:
            return f"{name} is loaded already; nothing added"
        room = max_bytes - self.nbytes
        over = (f"this session holds {self.nbytes / 2**20:.1f} MiB of loaded traces and {name} would pass the "
                f"{max_bytes // 2**20} MiB a session may hold; reload the page to start over")
        if server_room is not None and server_room < room:
            room = max(server_room, 0)
            over = (f"{name} would pass the {MAX_SERVER_TRACE_BYTES // 2**20} MiB of loaded traces this server "
                    f"holds for all its sessions together ({room / 2**20:.1f} MiB left); try again later (a closed "
                    f"page frees its traces), or load a smaller file")
        if not is_gzip(p) and p.stat().st_size > room:  # plain text: its size is known before reading
            raise E3RLError(over)
        try:
            traces, size = read_trace_file(p, name, max_text_bytes=min(MAX_TRACE_TEXT_BYTES, room))
        except TraceTooLarge:
            if room < MAX_TRACE_TEXT_BYTES:  # the session's (or server's) budget stopped it, not the file's
                raise E3RLError(over) from None
            raise
        seen = {t.trace_id for t in self.traces} | set(known)
        new = [t for t in traces if t.trace_id not in seen]
        self.traces.extend(new)
        self.digests.add(digest)
        self.nbytes += size
        skipped = len(traces) - len(new)
        return f"loaded {len(new)} trace(s) from {name}" + (f" ({skipped} loaded already, skipped)" if skipped else "")

    def clear(self) -> None:
        self.traces, self.digests, self.nbytes = [], set(), 0


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class TraceSessions:
    """Every browser session's loaded traces, by session id, so that they can be freed when the
    session ends (the page is closed: the Audit tab's unload handler) or its state expires (its
    ``gr.State``'s time to live: the delete callback)."""

    def __init__(self) -> None:
        self._by_session: dict[str, LoadedTraces] = {}
        self._lock = threading.Lock()

    def of(self, session: str | None) -> LoadedTraces:
        """The session's loaded traces (empty at first); a session without an id gets its own,
        unregistered (its state's time to live still frees it)."""
        if not session:
            return LoadedTraces()
        with self._lock:
            return self._by_session.setdefault(session, LoadedTraces())

    def end(self, session: str | None) -> None:
        """The session ended: free its traces."""
        with self._lock:
            loaded = self._by_session.pop(session or "", None)
        if loaded is not None:
            loaded.clear()  # gradio keeps a closed session's state an hour; emptied here, it holds nothing

    def release(self, loaded: Any) -> None:
        """A session's state was deleted (its time to live passed): free it and forget its session."""
        if not isinstance(loaded, LoadedTraces):
            return
        with self._lock:
            for key in [k for k, v in self._by_session.items() if v is loaded]:
                del self._by_session[key]
        loaded.clear()

    def __contains__(self, session: str) -> bool:
        return session in self._by_session

    def __len__(self) -> int:
        return len(self._by_session)

    def total_bytes(self) -> int:
        """Bytes of trace text all live sessions hold."""
        with self._lock:
            return sum(loaded.nbytes for loaded in self._by_session.values())

    def bytes_of(self, session: str) -> int:
        """Bytes of trace files the session holds (0 for one that holds none)."""
        loaded = self._by_session.get(session)
        return loaded.nbytes if loaded is not None else 0


SESSIONS = TraceSessions()
"""This server's live sessions' loaded traces (one per process, like the model store's models)."""


def release(loaded: Any) -> None:
    """``SESSIONS.release``, as the plain function a ``gr.State`` takes for its delete callback (gradio
    deep-copies its components' settings on every page load: a bound method would take SESSIONS,
    with every session's traces, along)."""
    SESSIONS.release(loaded)


MAX_ID_CHARS = 96
"""Characters of a trace id the tables and the trace list show; a longer one (a loaded file's ids
may be anything) is shown by ``shown_id``, which the replay resolves back to the trace."""


def shown_id(trace_id: str) -> str:
    """A trace id as shown: whole up to MAX_ID_CHARS, else its start and a digest of the whole, so
    two long ids sharing a start stay apart and the shown form names one trace."""
    if len(trace_id) <= MAX_ID_CHARS:
        return trace_id
    digest = hashlib.sha256(trace_id.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{trace_id[:MAX_ID_CHARS - 14]}…#{digest}"


def display_frame(df: pd.DataFrame, limit: int = MAX_CELL_CHARS) -> pd.DataFrame:
    """The table as shown: text cells cut to ``limit`` characters (a loaded file may hold a token of
    megabytes); trace ids shown by ``shown_id``, which selecting a row replays."""
    out = df.copy()
    for col in out.columns:
        if col == "trace":
            out[col] = out[col].map(lambda v: shown_id(v) if isinstance(v, str) else v)
        elif out[col].dtype == object:
            out[col] = out[col].map(lambda v: clip(v, limit) if isinstance(v, str) else v)
    return out



def traces_to_jsonl(traces: Iterable[Trace]) -> str:
    return "".join(dumps(e) + "\n" for t in traces for e in t.events)  # strict JSON, as trace files are


WHAT_IF_COLUMNS = ["trace", "segment", "attempt", "score", "new_score", "threshold", "new_threshold", "decision",
                   "new_decision", "reason", "new_reason", "changed"]


WHAT_IF_BUDGET_S = 20.0
"""The what-if's bound on one call: gradio cannot stop a running handler (a client that leaves does
not stop it), so the replay checks the time itself and stops with a one-line message. Its work is
linear in the group's recorded attempts (1,600 rollouts, 10,024 decisions: 1.9 s on a 2-core CPU),
so only a group far past any generated one reaches it."""


def what_if(group: Sequence[Trace], overrides: dict[str, Any], budget_s: float | None = None) -> pd.DataFrame:
    """Re-judge the recorded attempts of one group under other threshold/score parameters.

    overrides: ``{"threshold.kappa": 0.5, "threshold.policy": "fixed", "threshold.value": 1.0,
    "score.weight_base": 0.5, "erase.budget": 3, ...}``. Returns one row per recorded attempt with
    the recorded and the re-judged threshold, decision and reason, and whether erasing changed.
    The attempts are replayed in the order the generator decided them and judged by the rule it
    ran (``generation.decision``), so unchanged settings give back every recorded decision."""
    cfg = with_values(GenerationConfig.from_dict(group[0].start.config), overrides)
    weights = (cfg.score.weight_base, cfg.score.weight_max, cfg.score.weight_delta)
    policy = make_policy(cfg.threshold)
    kept = [_kept_signal(tr, cfg.score.signal) for tr in group]
    total = [0] * len(group)  # erasures spent per trace under the new rules (the per-trace cap)
    tried: dict[tuple[int, int], list[ScoredAttempt]] = {}  # (row, segment) -> attempts so far
    rows = []
    deadline = time.monotonic() + (WHAT_IF_BUDGET_S if budget_s is None else budget_s)
    for n, (step, i, s) in enumerate(decision_order([tr.segments for tr in group], policy.needs_group)):
        if n % 256 == 0 and time.monotonic() > deadline:
            raise E3RLError(f"the what-if of this group ({len(group)} rollouts) needs more than "
                            f"{WHAT_IF_BUDGET_S if budget_s is None else budget_s:g} s; load a smaller trace file "
                            f"(one group) to re-judge it")
        score = _rescore(s, weights)
        if step == "score":
            if s.attempt == 0:
                policy.observe_first(i, s.segment, score)
            continue
        attempts = tried.setdefault((i, s.segment), [])
        attempts.append(ScoredAttempt(score, s.attempt))
        thr = policy.parts(i, s.segment, s.attempt).threshold
        d = decide(score, thr, policy=cfg.threshold.policy, attempts=attempts, segment_erasures=s.attempt,
                   trace_erasures=total[i], restored=s.reason == "restored", erase=cfg.erase,
                   cap=cfg.trace_erase_cap)
        if d.decision == "erase":
            total[i] += 1
        rows.append(dict(zip(WHAT_IF_COLUMNS, (
            group[i].trace_id, s.segment, s.attempt, s.score, score, s.threshold, thr, s.decision, d.decision,
            s.reason, d.reason, (s.decision == "erase") != (d.decision == "erase")))))
        if s.decision != "erase" and s.segment in kept[i]:
            # What was recorded as kept, whatever the new decision: later attempts were generated
            # after it, and the policy's history term must see what the generator's saw.
            policy.observe_kept(i, kept[i][s.segment])
    return pd.DataFrame(rows, columns=WHAT_IF_COLUMNS)


def _kept_signal(trace: Trace, signal: str) -> dict[int, list[float]]:
    """The kept tokens' signal (entropy or surprisal) by segment."""
    per: dict[int, list[float]] = {}
    for t in trace.kept_tokens():
        per.setdefault(t.segment, []).append(t.entropy if signal == "entropy" else t.surprisal)
    return per


def _rescore(s: SegmentEvent, weights: tuple[float, float, float]) -> float:
    f = s.features
    return segment_score(SegmentFeatures(base=f["base"], max=f["max"], delta=f["delta"]), weights)


def recorded_thresholds(trace: Trace, names: Sequence[str]) -> list[Any]:
    """The trace's own threshold settings (``ThresholdConfig`` field names), each at
    ThresholdConfig's default where the trace did not record it: where the what-if starts."""
    recorded, default = trace.start.config.get("threshold", {}), ThresholdConfig()
    return [recorded.get(name, getattr(default, name)) for name in names]


def what_if_summary(df: pd.DataFrame) -> str:
    """The what-if's line: how many recorded decisions the new settings change."""
    changed = int(df["changed"].sum()) if len(df) else 0
    return f"{changed} of {len(df)} recorded decisions would change"


def group_of(traces: Sequence[Trace], trace_id: str) -> list[Trace]:
    """The traces generated in the same batch and group as ``trace_id`` (its group-mates)."""
    target = next((t for t in traces if t.trace_id == trace_id), None)
    if target is None:
        raise E3RLError(f"no trace {trace_id!r} loaded")
    key = (target.start.batch, target.start.group_id)
    return [t for t in traces if (t.start.batch, t.start.group_id) == key]



PROMPT_EXCERPT_CHARS = 48


def prompt_excerpt(prompt: str, limit: int = PROMPT_EXCERPT_CHARS) -> str:
    """A prompt's question on one line: the task template's "Question:" line when there is one, else
    the prompt's last non-empty line (a chat template puts the user's text last), cut to ``limit``."""
    lines = [ln.strip() for ln in str(prompt).splitlines() if ln.strip()]
    asked = [ln for ln in lines if ln.lower().startswith("question:")]
    text = (asked[0][len("question:"):].strip() if asked else next(
        (ln for ln in reversed(lines) if not ln.startswith("<") and ln.lower() != "answer:"), lines[-1] if lines else ""))
    return text if len(text) <= limit else text[:limit - 1] + "…"


def trace_labels(traces: Sequence[Trace]) -> list[tuple[str, str]]:
    """(label, shown id) of each trace, for a trace list: the prompt's question, the rollout within
    its group, the seed, "erasure off" (and "counterfactual" when it is the twin of an erasure-on
    rollout), where it comes from (a training step, a loaded file's source) and the id itself."""
    twins = {t.trace_id for t in counterfactual_twins(traces).values()}
    out = []
    for t in traces:
        if not t.events:
            continue
        s = t.start
        parts = [f"“{prompt_excerpt(s.prompt)}”", f"rollout {s.group_index}", f"seed {s.seed}"]
        if not s.config.get("erase", {}).get("enabled", True):
            parts.append("counterfactual (erasure off)" if t.trace_id in twins else "erasure off")
        if s.train_step is not None:
            parts.append(f"training step {s.train_step}")
        out.append((" · ".join(parts) + f" · {shown_id(t.trace_id)}", shown_id(t.trace_id)))
    return out


PAGE_ROWS = 100
"""Rows a table shows at once: a long run's thousands of decisions stay out of the page's DOM
(the export and the API endpoints give every row)."""


def page_of(df: pd.DataFrame, page: int, rows: int = PAGE_ROWS) -> tuple[pd.DataFrame, int, int]:
    """(rows of 1-based page ``page``, clamped to the pages there are; the page shown; the number of pages)."""
    pages = max(1, -(-len(df) // rows))
    page = min(max(1, int(page or 1)), pages)
    return df.iloc[(page - 1) * rows: page * rows], page, pages


def page_line(total: int, page: int, pages: int, rows: int = PAGE_ROWS) -> str:
    """The line under a paged table: which rows are shown of how many."""
    if total == 0:
        return "no rows"
    first, last = (page - 1) * rows + 1, min(page * rows, total)
    return f"rows {first:,}–{last:,} of {total:,} (page {page} of {pages})"


def what_if_view(df: pd.DataFrame) -> pd.DataFrame:
    """The what-if table as shown: the decisions that change first (in their recorded order), then
    the rest, with ``changed`` as the first column so a narrow page still shows it."""
    if df.empty:
        return df[["changed", *[c for c in df.columns if c != "changed"]]]
    order = df.assign(_rank=~df["changed"].astype(bool)).sort_values("_rank", kind="stable").drop(columns="_rank")
    return order[["changed", *[c for c in df.columns if c != "changed"]]]
