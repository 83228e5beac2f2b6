"""Datasets of math questions with gold answers, loaded from one SPEC string, and prompt rendering.

SPEC grammar::

    SPEC   := KIND ":" LOCATION [ "?" OPTION { "&" OPTION } ]
    OPTION := KEY "=" VALUE          (URL-decoded: write a space as + or %20)

    synthetic:train?difficulty=3&n=200&seed=0   the arith task (e3rl_core.tasks.arith); LOCATION is
                                                train or test; n=200, seed=0, mixed difficulty by default
    deepmath:/data/dm.parquet?difficulty_min=5&difficulty_max=7&topic=algebra
                                                DeepMath-103K's columns question, final_answer, difficulty,
                                                topic, r1_solution_1..3 (solution = r1_solution_1, meta has
                                                2 and 3); bounds inclusive, topic a case-insensitive substring
    aime:/data/aime24.jsonl                     columns problem, answer; optional id, solution, year
    jsonl:/data/x.jsonl?question=prompt&answer=target&id=uid
    parquet:/data/x.parquet?answer=             generic: column names default to question/answer/id; an
                                                empty ``answer=`` means no gold; other columns go to meta
    deepmath:zwhe99/DeepMath-103K?split=train   a hub dataset id (org/name) that is no local path: fetched
                                                with huggingface_hub (needs network), then every .parquet/
                                                .jsonl file of ``split`` (default train) is read

Every kind accepts ``limit=N`` (the first N examples, after filters). A LOCATION that is a local
directory is read like a hub snapshot: all of its .parquet/.jsonl files that belong to ``split``.
Parquet is read with pandas/pyarrow, JSONL line by line. Every failure is a :class:`DataError` whose
message says what to do.

Prompts: :func:`render_prompt` uses the tokenizer's chat template when it has one: one user turn,
``USER_TEMPLATE`` with the question in place of ``{question}`` (the question, then the instruction the
DeepSeek-R1, Qwen and DeepMath recipes use: "Please reason step by step, and put your final answer
within \\boxed{}."), ``add_generation_prompt=True`` so the model answers as the assistant, and
``enable_thinking`` for templates that take it (Qwen3; None keeps the template's default). Otherwise
the plain ``"Question: {question}\\nAnswer:\\n"`` template that the arith task and the demo model are
built on, unchanged.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl

from ..errors import E3RLError
from ..registry import Registry
from . import arith


class DataError(E3RLError, ValueError):
    """A dataset spec is malformed, or its file is missing, unreadable or of the wrong schema."""


log = logging.getLogger(__name__)

@dataclass
class Example:
    id: str
    question: str
    answer: str | None  # gold answer; None when the dataset has none
    difficulty: float | None = None
    topic: str | None = None
    solution: str | None = None
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Loader:
    fn: Callable[[str, dict[str, str]], list[Example]]
    options: tuple[str, ...]  # accepted option keys, besides limit; anything else is a typo


DATASETS: Registry[_Loader] = Registry("dataset")
# The user turn of chat prompts: the instruction DeepSeek-R1, Qwen2.5-Math/Qwen3 and DeepMath-103K use.
USER_TEMPLATE = "{question}\nPlease reason step by step, and put your final answer within \\boxed{}."
_FILE_SUFFIXES = (".parquet", ".jsonl")
# org/name as the hub spells it; a path ending in a data suffix is a missing file, never a hub id
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _loader(kind: str, *options: str) -> Callable:
    def deco(fn: Callable[[str, dict[str, str]], list[Example]]) -> Callable:
        DATASETS.register(kind)(_Loader(fn, options))
        return fn
    return deco


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """``"kind:location?k=v&k=v"`` -> (kind, location, options); raises DataError when malformed."""
    example = "e.g. deepmath:/data/train.parquet?difficulty_min=5&limit=100"
    if not isinstance(spec, str) or ":" not in spec:
        raise DataError(f"malformed dataset spec {spec!r}: expected KIND:LOCATION[?key=value&...], {example}")
    kind, rest = spec.split(":", 1)
    location, _, query = rest.partition("?")
    kind, location = kind.strip(), location.strip()
    if not kind or not location:
        raise DataError(f"malformed dataset spec {spec!r}: both KIND and LOCATION must be non-empty, {example}")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise DataError(f"malformed dataset spec {spec!r}: options must be key=value joined by &, {example}") from None
    options: dict[str, str] = {}
    for key, value in pairs:
        if key in options:
            raise DataError(f"malformed dataset spec {spec!r}: option {key!r} is given twice; keep one")
        options[key] = value
    return kind, location, options


def load_examples(spec: str) -> list[Example]:
    """The examples a SPEC names (see the module docstring for the grammar)."""
    kind, location, options = parse_spec(spec)
    if kind not in DATASETS:
        raise DataError(f"unknown dataset kind {kind!r} in {spec!r}; choose one of: {', '.join(DATASETS.names())}")
    loader = DATASETS.get(kind)
    unknown = sorted(set(options) - set(loader.options) - {"limit"})
    if unknown:
        valid = ", ".join(sorted(set(loader.options) | {"limit"}))
        raise DataError(f"unknown option(s) {', '.join(unknown)} for dataset kind {kind!r}; valid: {valid}")
    limit = _number(options, "limit", minimum=1)
    examples = loader.fn(location, options)
    if not examples:
        raise DataError(f"dataset {spec!r} is empty; point it at a file with rows")
    return examples[:limit] if limit is not None else examples


def render_prompt(question: str, tokenizer: Any = None, *, user_template: str = USER_TEMPLATE,
                  enable_thinking: bool | None = None) -> str:
    """The prompt text for one question: the tokenizer's chat template if any, with the user turn
    ``user_template`` ({question} replaced; no other braces are read, so ``\\boxed{}`` needs no
    escaping) and ``enable_thinking`` when not None; else the plain template."""
    template = getattr(tokenizer, "chat_template", None)
    if enable_thinking is not None and "enable_thinking" not in str(template or ""):
        # a flag that the template would silently ignore is a mistake worth reporting
        has = "has no chat template" if not template else "has a chat template that does not read it"
        raise DataError(f"enable_thinking is set but this tokenizer {has} (Qwen3's does); leave it unset")
    if "{question}" not in user_template:
        raise DataError(f"the prompt template {user_template!r} has no {{question}}; write one, "
                        f"e.g. {USER_TEMPLATE!r}")
    if not template:
        return arith.PROMPT_TEMPLATE.format(question=question)
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user_template.replace("{question}", question)}],
        tokenize=False, add_generation_prompt=True, **kwargs,
    )


def _number(options: dict[str, str], key: str, default: Any = None, *, minimum: int | None = None) -> Any:
    """An int option when ``minimum`` is given (counts, seeds), else a float one (difficulty bounds)."""
    if key not in options:
        return default
    raw = options[key].strip()
    try:
        value = float(raw) if minimum is None else int(raw)
    except ValueError:
        value = None
    if value is None or (minimum is not None and value < minimum):
        wanted = "a number" if minimum is None else f"an integer >= {minimum}"
        raise DataError(f"malformed dataset spec: {key}={options[key]!r} must be {wanted}")
    return value


def _clean(value: Any) -> Any:
    """None or NaN (JSON allows NaN) both mean 'absent'."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _text(value: Any) -> str | None:
    return None if _clean(value) is None else str(value)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines: JSON strings may hold U+2028
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a UTF-8 text file; pass a .jsonl file with one JSON object per line") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue  # a trailing blank line is common and harmless
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {lineno} is not valid JSON ({err.msg}); fix or remove that line") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {lineno} is not a JSON object; each line must be one row {{...}}")
        rows.append(row)
    return rows


def _read_parquet(path: Path) -> list[dict]:
    import pandas as pd  # imported lazily: only the file kinds need it

    try:
        frame = pd.read_parquet(path)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError or others for a corrupt file
        raise DataError(f"{path} is not a readable parquet file ({err}); re-export it or use .jsonl") from None
    # object dtype + None for missing cells gives plain Python values, as json.loads would
    frame = frame.astype(object).where(frame.notna(), None)
    return frame.to_dict("records")


def _fetch_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=["*.parquet", "*.jsonl"]))
    except Exception as err:  # offline: LocalEntryNotFoundError; unknown repo: RepositoryNotFoundError
        raise DataError(
            f"could not fetch hub dataset {repo_id!r} (and no local path has that name): the Hugging Face "
            f"hub could not be reached or has no such dataset ({type(err).__name__}); download it elsewhere "
            f"and pass a local file instead, e.g. deepmath:/data/train.parquet"
        ) from None


def _split_files(root: Path, split: str, recursive: bool = False) -> list[Path]:
    """The files of ``split`` in ``root``: a folder the user named is searched itself and, where it
    holds none, its ``data/`` folder (the hub's layout), never deeper (``aime:/`` does not walk the
    disk); a hub snapshot this module downloaded is searched whole (``recursive``)."""
    if recursive:
        files = sorted(p for p in root.rglob("*") if p.suffix in _FILE_SUFFIXES and p.is_file())
    else:
        files = sorted(p for p in root.glob("*") if p.suffix in _FILE_SUFFIXES and p.is_file())
        if not files and (root / "data").is_dir():
            files = sorted(p for p in (root / "data").glob("*") if p.suffix in _FILE_SUFFIXES and p.is_file())
    # hub layouts name the split as a path part or file-name prefix: data/train-00000-of-00002.parquet
    token = re.compile(rf"(^|[/_.-]){re.escape(split)}([/_.-]|$)")
    chosen = [p for p in files if token.search(p.relative_to(root).as_posix())]
    if not chosen:
        found = [p.relative_to(root).as_posix() for p in files] or "none"
        raise DataError(f"no .parquet/.jsonl files of split {split!r} under {root} (files: {found}); "
                        f"pass split=<name> or a single file")
    return chosen


def _read_rows(location: str, options: dict[str, str], required: list[str], expected: list[str]) -> list[dict]:
    """Rows of a file, a directory or a hub dataset, checked to have the ``required`` columns."""
    path = Path(location).expanduser()
    if path.is_dir() or (not path.exists() and _HUB_ID.match(location) and path.suffix not in _FILE_SUFFIXES):
        root = path if path.is_dir() else _fetch_hub(location)
        files = _split_files(root, options.get("split", "train"), recursive=not path.is_dir())
        log.info("dataset %s: reading %s", location, ", ".join(str(f) for f in files))
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"no such file: {location}; pass an existing .parquet or .jsonl file "
                        f"(or a hub dataset id org/name when online)")
    rows: list[dict] = []
    for file in files:
        if file.suffix not in _FILE_SUFFIXES:
            raise DataError(f"{file}: unsupported file type {file.suffix!r}; use .parquet or .jsonl")
        file_rows = _read_parquet(file) if file.suffix == ".parquet" else _read_jsonl(file)
        if not file_rows:
            continue  # an empty file has no columns to check; load_examples reports an empty dataset
        found = sorted({k for row in file_rows for k in row})
        missing = [c for c in required if c not in found]
        if missing:
            raise DataError(f"{file} lacks column(s) {missing}; found columns {found}; expected {expected} (? = optional) "
                            f"(rename the columns, or choose them in the spec for jsonl:/parquet:)")
        for i, row in enumerate(file_rows):
            if _clean(row.get(required[0])) is None:  # required[0] is the question, which cannot be blank
                raise DataError(f"{file}: row {i + 1} has no {required[0]!r}; fill it in or drop the row")
        rows += file_rows
    return rows


def _qid(question: str) -> str:
    return hashlib.sha256(question.encode()).hexdigest()[:12]  # as the arith task ids its problems


@_loader("synthetic", "difficulty", "n", "seed")
def _synthetic(location: str, options: dict[str, str]) -> list[Example]:
    if location not in ("train", "test"):
        raise DataError(f"synthetic dataset location must be train or test, got {location!r}; e.g. synthetic:train?n=200")
    difficulty = _number(options, "difficulty", minimum=1)
    if difficulty is not None and difficulty not in arith.LEVELS:
        raise DataError(f"synthetic difficulty={difficulty} is out of range; choose one of {list(arith.LEVELS)}")
    n = _number(options, "n", 200, minimum=1)
    seed = _number(options, "seed", 0, minimum=0)
    return [Example(id=p.id, question=p.question, answer=p.answer, difficulty=float(p.difficulty),
                    topic="arithmetic", solution=p.solution, meta={"task": "arith", "split": location})
            for p in arith.problems(location, n, seed=seed, difficulty=difficulty)]


@_loader("deepmath", "difficulty_min", "difficulty_max", "topic", "split")
def _deepmath(location: str, options: dict[str, str]) -> list[Example]:
    columns = ["question", "final_answer", "difficulty?", "topic?", "r1_solution_1?", "r1_solution_2?", "r1_solution_3?"]
    lo, hi = _number(options, "difficulty_min"), _number(options, "difficulty_max")  # fail before reading
    rows = _read_rows(location, options, ["question", "final_answer"], columns)
    topic = options.get("topic", "").lower()
    out = []
    for row in rows:
        difficulty = None if _clean(row.get("difficulty")) is None else float(row["difficulty"])
        # a row without a difficulty cannot satisfy a difficulty bound, so a bound drops it
        if (lo is not None or hi is not None) and (difficulty is None or not (
                (lo is None or difficulty >= lo) and (hi is None or difficulty <= hi))):
            continue
        row_topic = _text(row.get("topic"))
        if topic and topic not in (row_topic or "").lower():
            continue
        question = str(row["question"])
        out.append(Example(id=_qid(question), question=question, answer=_text(row.get("final_answer")),
                           difficulty=difficulty, topic=row_topic, solution=_text(row.get("r1_solution_1")),
                           meta={k: _text(row.get(k)) for k in ("r1_solution_2", "r1_solution_3") if k in row}))
    if rows and not out:
        filters = "&".join(f"{k}={options[k]}" for k in ("difficulty_min", "difficulty_max", "topic") if k in options)
        raise DataError(f"no DeepMath rows of {location} pass the filters {filters} ({len(rows)} rows before "
                        f"filtering); loosen them")
    return out


@_loader("aime", "split")
def _aime(location: str, options: dict[str, str]) -> list[Example]:
    rows = _read_rows(location, options, ["problem", "answer"], ["problem", "answer", "id?", "solution?", "year?"])
    out = []
    for i, row in enumerate(rows):
        year = _clean(row.get("year"))
        pid = _text(row.get("id")) or (f"aime-{year}-{i}" if year is not None else f"aime-{i}")
        out.append(Example(id=pid, question=str(row["problem"]), answer=_text(row.get("answer")), topic="competition math",
                           solution=_text(row.get("solution")), meta={"year": year} if year is not None else {}))
    return out


def _generic(location: str, options: dict[str, str]) -> list[Example]:
    q_col = options.get("question") or "question"
    a_col = options.get("answer", "answer")  # an explicit empty answer= means: no gold answers
    id_col = options.get("id") or "id"
    required = [q_col] + ([a_col] if a_col else [])
    rows = _read_rows(location, options, required, required + [f"{id_col}?"])
    out = []
    for row in rows:
        question = str(row[q_col])
        meta = {k: v for k, v in row.items() if k not in (q_col, a_col, id_col)}  # keep extra columns
        out.append(Example(id=_text(row.get(id_col)) or _qid(question), question=question,
                           answer=_text(row.get(a_col)) if a_col else None, meta=meta))
    return out


_loader("jsonl", "question", "answer", "id", "split")(_generic)
_loader("parquet", "question", "answer", "id", "split")(_generic)
