"""Erasable generation: decode segment by segment, score each segment with the model's own
uncertainty, and erase + regenerate the ones whose score beats the threshold.

Contract: the generator knows token ids, logits and the KV cache; it yields events (events.py) and
knows nothing of widgets, rewards or losses. One code path serves a single prompt and a batch of
groups: a single generation is a batch of one row, where every rollback is a plain ``crop``.

Per step, every row that has fresh logits draws a token (signals from the raw logits); a row whose
segment just ended is scored and decided before its last token is fed, so an erasure costs no
forward pass: the cache rolls back to the segment start (holes in a batch, ``crop`` at the tail)
and the boundary logits, kept from when the segment began, give the retry's first token at once.
"""
from __future__ import annotations

import inspect
import math
import os
import random
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Generator, Iterator, NamedTuple, Sequence

import torch

from ..errors import ConfigError, NonFiniteLogitsError, PromptError
from ..events import DoneEvent, EraseEvent, ErrorEvent, Event, SegmentEvent, StartEvent, TokenEvent, Trace, group_traces
from . import detok
from .config import GenerationConfig
from .decision import decide
from .compile import check_compiler, compiled_forward
from .families import Masks, RowStates, inspect_model
from .kvcache import BatchKV
from .selfcheck import ensure_exact
from .sampling import choose_tokens
from .scoring import SegmentFeatures, segment_features, segment_score
from .segmenter import SEGMENTERS, make_segmenter
from .signals import entropy_from_logp, log_probs, token_signals
from .thresholds import POLICIES, ThresholdPolicy, make_policy

# Stateful families whose recurrent layers continue a multi-token prefill from a cached state
# (tests/generation/test_share_prefix.py). Mamba-style mixers (Mamba, Jamba) read a cached state
# only one token at a time, so ``share_prefix`` leaves them the plain prefill.
STATE_PREFILL_CONTINUES = frozenset({"qwen3_next", "lfm2"})

Checker = Callable[[str, str], "bool | None"]
AnswerFn = Callable[[str], "str | None"]


class RowStatus(Enum):
    """Where a row is in the step loop."""

    SAMPLE = "sample"  # has fresh logits: draws its next token
    FEED = "feed"  # has a token to feed at the next forward
    WAIT = "wait"  # scored a segment; its decision waits for the group (needs_group policies)
    DONE = "done"


class Attempt(NamedTuple):
    """One scored attempt of the current segment (a ``decision.Scored``), kept for the fallback."""

    score: float
    attempt: int
    ids: list[int]


class Ban(NamedTuple):
    """Left by an erasure (``erase.ban_greedy`` / ``ban_sampling``): the retry may not draw
    ``token`` right after ``prefix``, the erased attempt's tokens before its most uncertain one."""

    prefix: tuple[int, ...]
    token: int


class Pending(NamedTuple):
    """A scored segment whose decision is still to be made."""

    features: SegmentFeatures
    score: float


@dataclass
class _Row:
    """Mutable state of one rollout while it is generated."""

    index: int
    trace_id: str
    group: int
    policy: ThresholdPolicy
    prompt_ids: list[int]
    max_kept: int
    rng: random.Random
    gold: str | None
    detok: detok.DetokState
    prev_base: float = 0.0
    status: RowStatus = RowStatus.SAMPLE
    to_feed: int | None = None
    pos: int = 0  # position id of the next fed token
    step: int = 0
    kept_ids: list[int] = field(default_factory=list)
    kept_signal: list[float] = field(default_factory=list)
    total_erasures: int = 0
    first_scored: set[int] = field(default_factory=set)
    # current segment
    seg: int = 0
    attempt: int = 0
    seg_erasures: int = 0
    seg_start_pos: int = 0
    seg_ids: list[int] = field(default_factory=list)
    seg_entropy: list[float] = field(default_factory=list)
    seg_surprisal: list[float] = field(default_factory=list)
    seg_text: str = ""
    seg_cols: list[int] = field(default_factory=list)
    seg_detok: detok.DetokState | None = None
    attempts: list[Attempt] = field(default_factory=list)
    bans: dict[int, list[Ban]] = field(default_factory=dict)  # by position in the segment
    replay: list[int] | None = None
    restored_from: int | None = None
    new_segment: bool = False
    pending: Pending | None = None


@dataclass
class RunStats:
    """Counters of the last ``stream`` call (memory is the KV cache, the part that grows)."""

    forwards: int = 0
    crops: int = 0
    compactions: int = 0
    peak_columns: int = 0
    peak_capacity: int = 0
    kv_bytes_per_column: int = 0

    @property
    def peak_kv_bytes(self) -> int:
        """Peak bytes of the cache's columns in use."""
        return self.peak_columns * self.kv_bytes_per_column

    @property
    def peak_kv_allocated(self) -> int:
        """Peak bytes the cache held allocated (the growing cache's buffer runs up to 2x ahead)."""
        return max(self.peak_capacity, self.peak_columns) * self.kv_bytes_per_column


class ErasableGenerator:
    """E3RL decoding over any transformers causal LM that takes a transformers ``Cache``
    (``GenerationConfig.kv_cache``: a ``DynamicCache`` or the in-place ``GrowingCache``).

    ``stream`` yields the events of a batch of groups as they happen; ``generate`` returns traces.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        config: GenerationConfig | None = None,
        *,
        model_name: str | None = None,
        checker: Checker | None = None,
        answer_fn: AnswerFn | None = None,
        self_check: bool = True,
    ) -> None:
        """checker(text, gold) and answer_fn(text) fill the done event's ``correct`` and ``answer``
        (a task's answer checking, e.g. ``e3rl_core.tasks.rewards``); without them both are None,
        since the engine knows tokens, not tasks. A model of a family no test covers is checked once
        for exact erasure (``selfcheck``) and refused if it fails."""
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or GenerationConfig()
        # Fail on unknown names before any work, listing the valid ones.
        SEGMENTERS.get(self.config.segment.mode)
        POLICIES.get(self.config.threshold.policy)
        self.segmenter = make_segmenter(self.config.segment)
        self.model_name = model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        # What erasure needs per layer family (windows counted in positions, recurrent states
        # snapshotted); a family it cannot make exact is refused here, before any generation.
        self.layout = inspect_model(model)
        self.masks = Masks(self.layout, next(model.parameters()).dtype)
        self.checker = checker
        self.answer_fn = answer_fn
        self.device = next(model.parameters()).device
        self.eos_ids = _eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)
        self.context = _context_length(model.config)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._has_logits_to_keep = "logits_to_keep" in params
        self._decode_forward: Callable[..., Any] = model
        if self.config.compile:
            check_compiler(self.device)
            self._decode_forward = compiled_forward(model)
        self.last_stats = RunStats()
        self.decoder = detok.Decoder(tokenizer)
        self._token_texts: dict[int, str] = {}
        if self_check:
            ensure_exact(self)

    def token_text(self, token_id: int) -> str:
        """One token's text on its own (memoized), for top-k alternatives."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    # ----------------------------------------------------------------- prompts
    def fits(self, n_tokens: int) -> bool:
        """Whether a prompt of ``n_tokens`` leaves room for at least one new token: the one rule
        ``encode`` enforces, and that eval and training use to leave overlong prompts out."""
        return self.context is None or n_tokens < self.context

    def text_ids(self, text: str) -> list[int]:
        """Token ids of prompt text, with the tokenizer's special tokens (its BOS) unless the text
        already starts with the BOS token: a chat template rendered it (Llama-3, DeepSeek-R1), and
        adding special tokens again would give the model two BOS tokens it never saw in training."""
        bos = getattr(self.tokenizer, "bos_token", None)
        rendered = isinstance(bos, str) and bool(bos) and text.startswith(bos)
        return self.tokenizer(text, add_special_tokens=not rendered)["input_ids"]

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt (text as ``text_ids`` tokenizes it; ids are taken as they are)."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise PromptError("the prompt is empty; give the model some text to continue")
            ids = self.text_ids(prompt)
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise PromptError("the prompt has no tokens; give the model some text to continue")
        if not self.fits(len(ids)):
            raise PromptError(
                f"the prompt has {len(ids)} tokens but the model's context is {self.context}; "
                f"shorten it to at most {self.context - 1} tokens"
            )
        return ids

    # ---------------------------------------------------------------- public API
    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]], **kwargs: Any) -> list[Trace]:
        """Run ``stream`` to the end and return one Trace per rollout (group-major order)."""
        return group_traces(self.stream(prompts, **kwargs))

    def stream(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        *,
        group_size: int = 1,
        seed: int | Sequence[int] | None = None,
        golds: Sequence[str | None] | None = None,
        trace_prefix: str | None = None,
        train_step: int | None = None,
        max_new: Sequence[int] | None = None,
    ) -> Iterator[Event]:
        """Generate ``group_size`` rollouts for each prompt, all in one batch.

        seed: one int (row r of the batch uses seed + r) or one seed per row; None draws one and
        records it in each start event. golds: the known answers, one per prompt, for ``done``.
        trace_prefix: the batch id (random if None); trace ids are ``<batch>-<group>-<index>``.
        train_step: recorded in each start event by the trainer. max_new: a smaller budget of kept
        tokens per prompt than ``max_new_tokens`` (a decision's keep branch, whose segment already
        used part of the trace's budget)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        if not prompts:
            raise PromptError("no prompts given")
        if group_size < 1:
            raise ConfigError(f"group_size must be >= 1, got {group_size}")
        encoded = [self.encode(p) for p in prompts]
        n_rows = len(encoded) * group_size
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little") >> 1
        seeds = [seed + r for r in range(n_rows)] if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != n_rows:
            raise ConfigError(f"got {len(seeds)} seeds for {n_rows} rows; give one int or one per row")
        if golds is not None and len(golds) != len(encoded):
            raise ConfigError(f"got {len(golds)} gold answers for {len(encoded)} prompts")
        if max_new is not None and (len(max_new) != len(encoded) or min(max_new) < 1):
            raise ConfigError(f"max_new needs one budget >= 1 per prompt ({len(encoded)}), got {list(max_new)}")
        prefix = trace_prefix or uuid.uuid4().hex[:8]
        cfg = self.config
        rows: list[_Row] = []
        for g, ids in enumerate(encoded):
            policy = make_policy(cfg.threshold)
            for k in range(group_size):
                r = len(rows)
                rng = random.Random(seeds[r])
                room = cfg.max_new_tokens if max_new is None else min(cfg.max_new_tokens, max_new[g])
                room = room if self.context is None else min(room, self.context - len(ids))
                rows.append(
                    _Row(
                        index=r, trace_id=f"{prefix}-{g}-{k}", group=g, policy=policy, prompt_ids=ids,
                        max_kept=room, rng=rng, gold=None if golds is None else golds[g],
                        detok=detok.start_state(ids), pos=len(ids), seg_start_pos=len(ids),
                    )
                )
        config_dict = cfg.to_dict()
        for row in rows:
            yield StartEvent(
                trace_id=row.trace_id, model=self.model_name,
                prompt=prompts[row.group] if isinstance(prompts[row.group], str) else self.tokenizer.decode(row.prompt_ids),
                prompt_ids=row.prompt_ids, config=config_dict, seed=seeds[row.index],
                group_index=row.index % group_size, group_id=row.group, gold=row.gold,
                batch=prefix, train_step=train_step,
            )
        yield from _Run(self, rows).events()


class _Run:
    """One batch being decoded: the rows, the cache and the current logits.

    Per step: rows with fresh logits draw (a retry draws at once), waiting rows whose group is
    complete are decided in row order, repeat until nothing changes, then one forward feeds every
    row that has a token. ``schedule.decision_order`` rebuilds this order (the audit's what-if)
    from recorded traces, so a change here shows in tests/app/test_audit.py.
    """

    def __init__(self, gen: ErasableGenerator, rows: list[_Row]) -> None:
        self.gen = gen
        self.cfg = gen.config
        self.rows = rows
        self.kv = BatchKV(len(rows), gen.device, self.cfg.kv_cache, gen.layout, gen.model.config)
        self.states = RowStates(self.kv.cache)
        self.signal_name = self.cfg.score.signal
        self.window = self.cfg.smoothing_window
        self.weights = (self.cfg.score.weight_base, self.cfg.score.weight_max, self.cfg.score.weight_delta)
        self.cap = self.cfg.trace_erase_cap
        self.stats = RunStats()
        gen.last_stats = self.stats
        self.cur: torch.Tensor | None = None  # (B, V) float32 logits for each row's next token
        self.boundary: torch.Tensor | None = None  # (B, V) logits at each row's segment start

    # ------------------------------------------------------------------ model
    def _forward(self, input_ids: torch.Tensor, valid: torch.Tensor, position_ids: torch.Tensor, keep: int,
                 fed: torch.Tensor, first_row_only: bool = False) -> torch.Tensor:
        """Append the (B, n) columns ``input_ids`` (``valid``: real or a hole, ``fed``: (B,) the
        row takes part) at ``position_ids``; returns the last ``keep`` logits (B, keep, V).
        ``first_row_only``: every row's columns are recorded, but only row 0 goes through the model
        (a prefix every row shares; ``kv.repeat_first_row`` then copies its entries)."""
        n = input_ids.shape[1]
        mask = self.kv.attention_mask(valid, position_ids)
        pending = self.kv.pending_positions(n)
        if first_row_only:
            input_ids, position_ids, mask, pending, fed = (t[:1] for t in (input_ids, position_ids, mask, pending, fed))
        attention_mask = self.gen.masks(mask, pending, n, fed)
        kwargs: dict[str, Any] = {
            "input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            self.gen._cache_kw: self.kv.cache, "use_cache": True,
        }
        if self.gen._has_logits_to_keep:
            kwargs["logits_to_keep"] = keep
        # Decode steps (one token per row) may go through the compiled forward; prefills never do.
        forward = self.gen.model
        if input_ids.shape[1] == 1 and self.cfg.compile:
            forward = self.gen._decode_forward
            # A contiguous mask keeps its strides the same from step to step: no recompilation.
            kwargs["attention_mask"] = (
                {k: m.contiguous() for k, m in attention_mask.items()} if isinstance(attention_mask, dict)
                else attention_mask.contiguous())
        logits = forward(**kwargs).logits
        self.kv.advance(n)
        return logits[:, -keep:].float()  # (B, keep, V)

    def _shared_length(self) -> int:
        """How many leading prompt tokens every row shares and may prefill once
        (``share_prefix``): all the common ones but the last ``window + 1`` of the shortest
        prompt, which each row prefills itself (B_0 reads their logits)."""
        if not self.cfg.share_prefix or len(self.rows) < 2:
            return 0
        layout = self.gen.layout
        if layout.stateful and layout.model_type not in STATE_PREFILL_CONTINUES:
            return 0  # its recurrent layers cannot take a second prompt chunk: the plain prefill
        first = self.rows[0].prompt_ids
        common = min(len(r.prompt_ids) for r in self.rows)
        for r in self.rows[1:]:
            common = next((i for i, (a, b) in enumerate(zip(first, r.prompt_ids[:common])) if a != b), common)
        need = self.window + 1 if self.cfg.score.first_reference == "prompt_tail" else 1
        return max(0, min(common, min(len(r.prompt_ids) for r in self.rows) - need))

    def _prefill_shared(self, n: int) -> None:
        """Feed the first ``n`` prompt tokens (the same in every row) as one row, then copy that
        row's cache entries to every row: a prefix shared by B rows costs one row's forward."""
        B, dev = len(self.rows), self.gen.device
        ids = torch.tensor([self.rows[0].prompt_ids[:n]], device=dev).expand(B, n)
        pos = torch.arange(n, device=dev)[None].expand(B, n)
        everyone = torch.ones(B, dtype=torch.long, device=dev)
        self._forward(ids, torch.ones_like(ids), pos, 1, everyone, first_row_only=True)
        self.kv.repeat_first_row()
        self.states.repeat(B)

    def _even_out(self, fed: list[int]) -> None:
        """Recurrent states would read padding between a shared prefix and a row's own tokens as
        input, so a stateful model feeds the longer rows' extra tokens first, in steps of equal
        length, while the other rows sit out with their states held, until every row has the same
        number of prompt tokens left (the final prefill then has no padding)."""
        dev = self.gen.device
        while True:
            left = {r.index: len(r.prompt_ids) - fed[r.index] for r in self.rows}
            top = max(left.values())
            lower = [n for n in left.values() if n < top]
            if not lower:
                return
            n = top - max(lower)
            going = [i for i, m in left.items() if m == top]
            ids = torch.full((len(self.rows), n), self.gen.pad_id, dtype=torch.long)
            valid = torch.zeros_like(ids)
            pos = torch.zeros_like(ids)
            for i in going:
                ids[i] = torch.tensor(self.rows[i].prompt_ids[fed[i] : fed[i] + n])
                valid[i] = 1
                pos[i] = torch.arange(fed[i], fed[i] + n)
            fed_rows = valid[:, 0].to(dev)
            with self.states.hold([i for i in left if i not in going]):
                self._forward(ids.to(dev), valid.to(dev), pos.to(dev), 1, fed_rows)
            for i in going:
                fed[i] += n

    def _prefill(self) -> None:
        B = len(self.rows)
        skip = self._shared_length()
        fed = [skip] * B  # prompt tokens of each row already in the cache
        if skip:
            self._prefill_shared(skip)
            if self.gen.layout.stateful:
                self._even_out(fed)
        longest = max(len(r.prompt_ids) - fed[r.index] for r in self.rows)
        ids = torch.full((B, longest), self.gen.pad_id, dtype=torch.long)
        valid = torch.zeros((B, longest), dtype=torch.long)
        start = torch.tensor(fed)[:, None]
        for r in self.rows:
            n = len(r.prompt_ids) - fed[r.index]
            ids[r.index, longest - n :] = torch.tensor(r.prompt_ids[fed[r.index]:])  # left padding
            valid[r.index, longest - n :] = 1
        pos = (valid.cumsum(1) - 1).clamp_min(0) + start
        dev = self.gen.device
        keep = min(longest, self.window + 1) if self.cfg.score.first_reference == "prompt_tail" else 1
        everyone = torch.ones(B, dtype=torch.long, device=dev)
        logits = self._forward(ids.to(dev), valid.to(dev), pos.to(dev), keep, everyone)
        self.states.mark_segment_start(range(B))
        self.stats.kv_bytes_per_column = self.kv.nbytes() // max(1, self.kv.length)
        self.stats.peak_columns = self.kv.length
        self.stats.peak_capacity = self.kv.capacity()
        self.cur = logits[:, -1].clone()
        self.boundary = self.cur.clone()
        if keep > 1:
            # B_0: mean signal of the prompt's last tokens (those the kept logits can score).
            ent, sur = token_signals(logits[:, :-1], ids[:, longest - keep + 1 :].to(dev))  # (B, keep-1)
            sig = (sur if self.signal_name == "surprisal" else ent).cpu()
            # Both the scored token and the position that predicts it must be real (not padding),
            # or a short prompt's B_0 would depend on what else is in the batch.
            mask = valid[:, longest - keep + 1 :].bool() & valid[:, longest - keep : -1].bool()
            for r in self.rows:
                vals = sig[r.index][mask[r.index]]
                r.prev_base = float(vals.mean()) if len(vals) else 0.0
        self._check_finite(self.rows, entropy_from_logp(log_probs(self.cur)))
        for r in self.rows:
            r.seg_detok = r.detok.copy()

    def _check_finite(self, ready: list[_Row], entropy: torch.Tensor) -> None:
        # The entropy is NaN exactly when the logits hold a NaN, a +inf, or only -inf (nothing
        # can be drawn), so checking n values covers the whole (n, V) block.
        bad = ~torch.isfinite(entropy)
        if bool(bad.any()):
            r = ready[int(bad.nonzero()[0])]
            position = len(r.prompt_ids) + len(r.kept_ids) + len(r.seg_ids)
            raise NonFiniteLogitsError(
                f"the model produced non-finite logits for trace {r.trace_id} at step {r.step} "
                f"(sequence position {position}); check the weights for NaN/inf or load the model "
                f"in float32 instead of float16",
                row=r.index, step=r.step, position=position,
            )

    # ------------------------------------------------------------------- loop
    def events(self) -> Iterator[Event]:
        try:
            with torch.no_grad():
                self._prefill()
            while True:
                # Draw and decide until every row either has a token to feed or is waiting, so
                # that no row sits out a forward it could have used.
                while True:
                    yield from self._sample_phase()
                    if not (yield from self._resolve_waits()):
                        break
                feeding = [r for r in self.rows if r.status is RowStatus.FEED]
                if not feeding:
                    if all(r.status is RowStatus.DONE for r in self.rows):
                        return
                    waiting = [(r.trace_id, r.seg) for r in self.rows if r.status is RowStatus.WAIT]
                    raise RuntimeError(f"group barrier cannot resolve; waiting rows: {waiting}")
                with torch.no_grad():
                    self._feed(feeding)
        except NonFiniteLogitsError as err:
            row = self.rows[err.row]
            yield ErrorEvent(trace_id=row.trace_id, message=str(err), step=err.step)
            raise

    def _sample_phase(self) -> Iterator[Event]:
        """Every row with fresh logits draws a token, until none has: a retry draws its first
        token in the same phase as the erasure, from the boundary logits."""
        while True:
            ready = [r for r in self.rows if r.status is RowStatus.SAMPLE]
            if not ready:
                return
            with torch.no_grad():
                toks, ent, sur, tops = self._draw(ready)
            for r, t, h, s, top in zip(ready, toks, ent, sur, tops):
                yield from self._take_token(r, t, h, s, top)

    def _draw(self, ready: list[_Row]) -> tuple[list[int], list[float], list[float], list[Any]]:
        """One token per ready row, with its entropy, surprisal and (optionally) top-k."""
        if len(ready) == len(self.rows):
            logits = self.cur  # the common case: every row draws (rows are in index order)
        else:
            logits = self.cur[torch.tensor([r.index for r in ready], device=self.gen.device)]  # (n, V)
        logp = log_probs(logits)  # (n, V)
        ent = entropy_from_logp(logp)  # (n,)
        self._check_finite(ready, ent)
        temps, bans = self._draw_settings(ready)
        sampling = self.cfg.sampling
        toks = choose_tokens(logits, temps, [r.rng for r in ready], bans, sampling.top_k, sampling.top_p)
        for i, r in enumerate(ready):
            if r.replay is not None:
                toks[i] = r.replay[len(r.seg_ids)]
        sur = -logp.gather(-1, toks.unsqueeze(-1)).squeeze(-1)  # (n,)
        tops: list[Any] = [None] * len(ready)
        if self.cfg.record_top_k:
            k = min(self.cfg.record_top_k, logp.shape[-1])
            vals, ids = logp.topk(k, dim=-1)  # (n, k)
            tops = [[[i, self.gen.token_text(i), round(math.exp(v), 6)] for i, v in zip(ri, rv)]
                    for ri, rv in zip(ids.tolist(), vals.tolist())]
        return toks.tolist(), ent.tolist(), sur.tolist(), tops

    def _draw_settings(self, ready: list[_Row]) -> tuple[list[float], list[list[int]]]:
        """Each row's temperature (raised per retry when sampling) and banned token ids."""
        sampling, erase_cfg = self.cfg.sampling, self.cfg.erase
        temps, bans = [], []
        for r in ready:
            t = sampling.temperature
            if t > 0:
                t += sampling.retry_temperature_step * r.seg_erasures
            temps.append(t)
            ban_on = erase_cfg.ban_greedy if t <= 0 else erase_cfg.ban_sampling
            bans.append(self._bans_at(r) if ban_on and r.bans else [])
        return temps, bans

    def _bans_at(self, r: _Row) -> list[int]:
        k = len(r.seg_ids)
        prefix = tuple(r.seg_ids)
        return [ban.token for ban in r.bans.get(k, []) if ban.prefix == prefix]

    def _take_token(self, r: _Row, tok: int, ent: float, sur: float, top: Any = None) -> Iterator[Event]:
        delta = detok.push(self.gen.decoder, r.detok, tok)
        yield TokenEvent(
            trace_id=r.trace_id, step=r.step, token_id=tok, text=delta, entropy=ent, surprisal=sur,
            segment=r.seg, attempt=r.attempt, index=len(r.kept_ids) + len(r.seg_ids), top=top,
        )
        r.step += 1
        r.seg_ids.append(tok)
        r.seg_entropy.append(ent)
        r.seg_surprisal.append(sur)
        r.seg_text += delta
        if not self._segment_ended(r, tok, delta):
            r.to_feed, r.status = tok, RowStatus.FEED
            return
        yield from self._score_segment(r)

    def _segment_ended(self, r: _Row, tok: int, delta: str) -> bool:
        length = len(r.seg_ids)
        if r.replay is not None:
            return length == len(r.replay)
        return (
            tok in self.gen.eos_ids
            or len(r.kept_ids) + length >= r.max_kept
            or self.gen.segmenter.is_boundary(length, r.seg_text, delta)
        )

    def _score_segment(self, r: _Row) -> Iterator[Event]:
        x = r.seg_surprisal if self.signal_name == "surprisal" else r.seg_entropy
        feats = segment_features(x, r.kept_signal, r.prev_base, self.window)
        score = segment_score(feats, self.weights)
        r.attempts.append(Attempt(score, r.attempt, list(r.seg_ids)))
        r.pending = Pending(feats, score)
        if r.seg_erasures == 0 and r.replay is None and r.seg not in r.first_scored:
            r.first_scored.add(r.seg)
            r.policy.observe_first(r.index, r.seg, score)
        if r.policy.needs_group and r.replay is None:
            r.status = RowStatus.WAIT
        else:
            yield from self._decide(r)

    def _resolve_waits(self) -> Generator[Event, None, int]:
        """Decide the waiting rows whose group has scored every live first attempt at their
        segment; returns how many were decided."""
        decided = 0
        for r in self.rows:
            if r.status is not RowStatus.WAIT:
                continue
            live = [o for o in self.rows if o.group == r.group and o.status is not RowStatus.DONE]
            if all(r.seg in o.first_scored for o in live):
                decided += 1
                yield from self._decide(r)
        return decided

    # -------------------------------------------------------------- decisions
    def _decide(self, r: _Row) -> Iterator[Event]:
        feats, score = r.pending
        parts = r.policy.parts(r.index, r.seg, r.seg_erasures)
        d = decide(
            score, parts.threshold, policy=self.cfg.threshold.policy, attempts=r.attempts,
            segment_erasures=r.seg_erasures, trace_erasures=r.total_erasures,
            restored=r.replay is not None, erase=self.cfg.erase, cap=self.cap,
        )
        start = len(r.kept_ids)
        yield SegmentEvent(
            trace_id=r.trace_id, segment=r.seg, attempt=r.attempt, start=start, end=start + len(r.seg_ids),
            score=score, features=feats.to_dict(), baseline=parts.baseline, penalty=parts.penalty,
            history=parts.history, threshold=parts.threshold, decision=d.decision, reason=d.reason,
            restored_from=r.restored_from,
        )
        r.pending = None
        if d.decision != "erase":
            yield from self._accept(r, feats)
        elif d.restore is None:
            yield from self._erase(r, replay=None, restored_from=None)
        else:
            best = next(a for a in r.attempts if a.attempt == d.restore)
            yield from self._erase(r, replay=best.ids, restored_from=best.attempt)

    def _erase(self, r: _Row, replay: list[int] | None, restored_from: int | None) -> Iterator[Event]:
        before = self.kv.valid_count(r.index)
        self.kv.invalidate(r.index, r.seg_cols)
        after = self.kv.valid_count(r.index)
        start = len(r.kept_ids)
        yield EraseEvent(
            trace_id=r.trace_id, segment=r.seg, attempt=r.attempt, start=start, end=start + len(r.seg_ids),
            text=r.seg_text, cache_len_before=before, cache_len_after=after,
        )
        greedy = self.cfg.sampling.temperature <= 0
        if r.replay is None and (self.cfg.erase.ban_greedy if greedy else self.cfg.erase.ban_sampling):
            # Diverge where the doubt was: the retry may not repeat this attempt's token at its most
            # uncertain position (given the same prefix). Never the first token blindly.
            x = r.seg_surprisal if self.signal_name == "surprisal" else r.seg_entropy
            k = max(range(len(x)), key=x.__getitem__)
            r.bans.setdefault(k, []).append(Ban(tuple(r.seg_ids[:k]), r.seg_ids[k]))
        r.total_erasures += 1
        r.seg_erasures += 1
        r.attempt += 1
        r.replay, r.restored_from = replay, restored_from
        self._reset_segment(r)
        r.pos = r.seg_start_pos
        self.states.roll_back(r.index)
        r.detok = r.seg_detok.copy()
        self.cur[r.index] = self.boundary[r.index]
        r.status = RowStatus.SAMPLE
        if self.kv.crop_tail():
            self.stats.crops += 1

    def _accept(self, r: _Row, feats: SegmentFeatures) -> Iterator[Event]:
        x = r.seg_surprisal if self.signal_name == "surprisal" else r.seg_entropy
        last = r.seg_ids[-1]
        r.kept_ids.extend(r.seg_ids)
        r.kept_signal.extend(x)
        r.policy.observe_kept(r.index, x)
        r.prev_base = feats.base
        finished = last in self.gen.eos_ids or len(r.kept_ids) >= r.max_kept
        r.seg_detok = r.detok.copy()
        r.seg += 1
        r.attempt = r.seg_erasures = 0
        r.attempts, r.bans, r.replay, r.restored_from = [], {}, None, None
        self._reset_segment(r)
        if finished:
            r.status = RowStatus.DONE
            self.kv.release(r.index)
            yield self._done(r, "eos" if last in self.gen.eos_ids else "length")
        else:
            r.to_feed, r.status, r.new_segment = last, RowStatus.FEED, True

    @staticmethod
    def _reset_segment(r: _Row) -> None:
        r.seg_ids, r.seg_entropy, r.seg_surprisal, r.seg_cols = [], [], [], []
        r.seg_text = ""

    def _done(self, r: _Row, reason: str) -> DoneEvent:
        text = self.gen.tokenizer.decode(r.kept_ids, skip_special_tokens=True)
        answer = self.gen.answer_fn(text) if self.gen.answer_fn is not None else None
        correct = None
        if r.gold is not None and self.gen.checker is not None:
            correct = self.gen.checker(text, r.gold)
        return DoneEvent(
            trace_id=r.trace_id, text=text, token_ids=list(r.kept_ids), tokens_generated=r.step,
            erasures=r.total_erasures, answer=answer, correct=correct, finish_reason=reason,
        )

    # ------------------------------------------------------------------- feed
    def _feed(self, feeding: list[_Row]) -> None:
        B = len(self.rows)
        kv = self.kv
        if kv.length >= 64 and kv.reclaimable() > self.cfg.erase.compact_ratio * kv.length:
            remap = kv.compact().tolist()
            self.stats.compactions += 1
            for r in self.rows:
                r.seg_cols = [remap[r.index][c] for c in r.seg_cols]
        ids = [self.gen.pad_id] * B
        pos = [0] * B
        valid = [0] * B
        for r in feeding:
            ids[r.index], pos[r.index], valid[r.index] = r.to_feed, r.pos, 1
        dev = self.gen.device
        fed = torch.tensor(valid, device=dev)
        # A live row that sits out this forward is fed padding: its recurrent state (if any) must
        # come out as it went in.
        idle = [r.index for r in self.rows if not valid[r.index] and r.status is not RowStatus.DONE]
        with self.states.hold(idle):
            logits = self._forward(
                torch.tensor(ids, device=dev)[:, None], fed[:, None], torch.tensor(pos, device=dev)[:, None], 1, fed
            )[:, -1]  # (B, V)
        self.stats.forwards += 1
        self.stats.peak_columns = max(self.stats.peak_columns, kv.length)
        self.stats.peak_capacity = max(self.stats.peak_capacity, kv.capacity())
        col = kv.length - 1
        idx = torch.tensor([r.index for r in feeding], device=dev)
        self.cur[idx] = logits[idx]
        for r in feeding:
            r.pos += 1
            r.to_feed, r.status = None, RowStatus.SAMPLE
            if r.new_segment:
                # The fed token closed the previous segment; the next one starts after it.
                self.boundary[r.index] = self.cur[r.index]
                r.seg_start_pos = r.pos
                r.new_segment = False
                self.states.mark_segment_start((r.index,))
            else:
                r.seg_cols.append(col)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    gen_cfg = getattr(model, "generation_config", None)
    for source in (getattr(gen_cfg, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return ids


def _context_length(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
