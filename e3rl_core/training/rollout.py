"""Rollout traces -> training tensors, and the rollout metrics of a step.

The trainer trains on exactly what the generator's event stream says was kept (nanochat's engine
gives token columns plus masks; here the trace does): the final sequence is ``prompt_ids`` +
``done.token_ids``, each completion token carries the segment its kept attempt belonged to, and
erased attempts are simply not in the sequence (loss mask 0 by construction).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..events import DoneEvent, SegmentEvent, StartEvent, Trace


@dataclass
class RolloutBatch:
    """R rollouts right-padded to T = longest prompt + completion.

    input_ids (R, T) long; attention_mask (R, T) long; completion_mask (R, T) float, 1 on trained
    completion tokens; segment_ids (R, T) long, segment of each completion token, -1 elsewhere;
    n_segments (R,) long; rewards (R,) float, NaN where the reward abstained; group_ids (R,) long
    (local group index); truncated (R,) bool; parent (R,) long: -1 for a rollout, else the row of
    the rollout whose erased attempt this row holds (``erased_rows``); healed (R, N) float: 1 on a
    rollout's kept segments that replaced an erased attempt (``erased_rows``; reading R2), N = the
    most segments of a row."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    segment_ids: torch.Tensor
    n_segments: torch.Tensor
    rewards: torch.Tensor
    group_ids: torch.Tensor
    truncated: torch.Tensor
    parent: torch.Tensor | None = None
    healed: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.parent is None:
            self.parent = torch.full((self.input_ids.shape[0],), -1, dtype=torch.long)
        if self.healed is None:
            n = int(self.n_segments.max()) if self.n_segments.numel() else 0
            self.healed = torch.zeros((self.input_ids.shape[0], max(n, 1)))

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def rows(self, idx: slice) -> "RolloutBatch":
        return RolloutBatch(**{k: getattr(self, k)[idx] for k in self.__dataclass_fields__})


def kept_segments(trace: Trace) -> list[int]:
    """Segment index of each kept completion token, renumbered 0..N-1 in order of appearance."""
    raw = [t.segment for t in trace.kept_tokens()]
    order: dict[int, int] = {}
    return [order.setdefault(s, len(order)) for s in raw]


def erased_attempts(trace: Trace) -> list[tuple[list[int], list[int]]]:
    """(kept prefix, erased tokens) of each erased attempt: the context it was generated in (the
    completion's tokens before the segment start) and what was erased.

    An attempt that was erased and later restored by the fallback (its tokens replayed and kept)
    is left out: its tokens are in the completion, and penalizing them here would pull against
    the advantage they get there."""
    done = trace.done
    assert isinstance(done, DoneEvent)
    by_attempt: dict[tuple[int, int], list[int]] = {}
    for t in trace.tokens:
        by_attempt.setdefault((t.segment, t.attempt), []).append(t.token_id)
    restored = {(s.segment, s.restored_from) for s in trace.segments
                if s.restored_from is not None and s.decision != "erase"}
    return [(list(done.token_ids[: e.start]), by_attempt[(e.segment, e.attempt)])
            for e in trace.erasures
            if by_attempt.get((e.segment, e.attempt)) and (e.segment, e.attempt) not in restored]


def healed_columns(healed: torch.Tensor, n: int) -> torch.Tensor:
    """``RolloutBatch.healed`` as (R, n): cut or zero-padded to the n segment columns of an allocation."""
    if healed.shape[1] >= n:
        return healed[:, :n]
    return torch.nn.functional.pad(healed, (0, n - healed.shape[1]))


def healed_segments(trace: Trace) -> list[int]:
    """The kept segments (numbered as ``kept_segments`` numbers them) that replaced an erased
    attempt: the other half of each pair ``erased_attempts`` gives."""
    restored = {(s.segment, s.restored_from) for s in trace.segments
                if s.restored_from is not None and s.decision != "erase"}
    raw = {e.segment for e in trace.erasures if (e.segment, e.attempt) not in restored}
    order: dict[int, int] = {}
    for t in trace.kept_tokens():
        order.setdefault(t.segment, len(order))
    return sorted(order[s] for s in raw if s in order)


def build_batch(
    traces: Sequence[Trace], rewards: Sequence[float | None], pad_id: int, *, mask_truncated: bool = False,
    erased_rows: bool = False,
) -> RolloutBatch:
    """Tensors for the loss from finished traces (group-major order, as the generator yields).

    ``erased_rows`` appends one row per erased attempt (prompt + kept prefix + erased tokens, only the
    erased tokens in the mask), for the optional negative advantage on erased attempts (readings R1
    and R2), and marks each rollout's segments that replaced one (``healed``, R2)."""
    seqs, comps, segs, groups, trunc, healed = [], [], [], [], [], []
    extra: list[tuple[list[int], int, int, int]] = []  # (ids, loss start, parent row, group)
    group_index: dict[tuple[str, int], int] = {}
    if not traces:
        z = torch.zeros(0, 1, dtype=torch.long)
        return RolloutBatch(z, z, z.float(), z - 1, torch.zeros(0, dtype=torch.long), torch.zeros(0),
                            torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool))
    for tr in traces:
        start, done = tr.start, tr.done
        assert isinstance(start, StartEvent) and isinstance(done, DoneEvent), "rollout without start/done"
        seg = kept_segments(tr)
        if len(seg) != len(done.token_ids):
            raise RuntimeError(f"trace {tr.trace_id}: {len(seg)} kept token events but {len(done.token_ids)} tokens")
        seqs.append(list(start.prompt_ids) + list(done.token_ids))
        comps.append(len(start.prompt_ids))
        segs.append(seg)
        # A group is one prompt of one generate call (group_id alone restarts at 0 in every call,
        # e.g. in each round of dynamic sampling).
        groups.append(group_index.setdefault((start.batch, start.group_id), len(group_index)))
        trunc.append(done.finish_reason == "length")
        healed.append(healed_segments(tr) if erased_rows else [])
        if erased_rows:
            for prefix, tokens in erased_attempts(tr):
                ids = list(start.prompt_ids) + prefix + tokens
                extra.append((ids, len(ids) - len(tokens), len(seqs) - 1, groups[-1]))
    parents = [-1] * len(seqs)
    rewards = list(rewards) + [None] * len(extra)  # erased rows take no part in group statistics
    for ids, loss_start, parent, group in extra:
        seqs.append(ids)
        comps.append(loss_start)
        segs.append([0] * (len(ids) - loss_start))
        groups.append(group)
        trunc.append(False)
        parents.append(parent)
        healed.append([])
    R, T = len(seqs), max(len(s) for s in seqs)
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)
    attention = torch.zeros((R, T), dtype=torch.long)
    seg_ids = torch.full((R, T), -1, dtype=torch.long)
    for i, (s, p, sg) in enumerate(zip(seqs, comps, segs)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention[i, : len(s)] = 1
        if sg:
            seg_ids[i, p : len(s)] = torch.tensor(sg)
    truncated = torch.tensor(trunc, dtype=torch.bool)
    n_segments = torch.tensor([max(sg) + 1 if sg else 0 for sg in segs], dtype=torch.long)
    healed_mask = torch.zeros((R, max(int(n_segments.max()), 1)))
    for i, hs in enumerate(healed):
        healed_mask[i, hs] = 1.0
    mask = (seg_ids >= 0).float()
    if mask_truncated:
        mask = mask * (~truncated).float()[:, None]
    return RolloutBatch(
        input_ids=input_ids, attention_mask=attention, completion_mask=mask, segment_ids=seg_ids,
        n_segments=n_segments, healed=healed_mask,
        rewards=torch.tensor([math.nan if r is None else float(r) for r in rewards], dtype=torch.float32),
        group_ids=torch.tensor(groups, dtype=torch.long), truncated=truncated,
        parent=torch.tensor(parents, dtype=torch.long),
    )


def rollout_metrics(traces: Sequence[Trace], rewards: Sequence[float | None]) -> dict[str, float]:
    """Sums and counts over a batch of traces; ``finish_metrics`` turns (all-reduced) sums into means."""
    segs = [e for tr in traces for e in tr.events if isinstance(e, SegmentEvent)]
    kept = [t for tr in traces for t in tr.kept_tokens()]
    valid = [r for r in rewards if r is not None]
    dones = [tr.done for tr in traces]
    return {
        "rollouts": float(len(traces)),
        "reward_sum": float(sum(valid)),
        "reward_sq_sum": float(sum(r * r for r in valid)),
        "reward_count": float(len(valid)),
        "correct": float(sum(bool(d.correct) for d in dones if d is not None)),
        "entropy_sum": float(sum(t.entropy for t in kept)),
        "surprisal_sum": float(sum(t.surprisal for t in kept)),
        "tokens_generated": float(sum(d.tokens_generated for d in dones if d is not None)),
        "tokens_kept": float(len(kept)),
        "segments": float(len(segs)),
        "erase_decisions": float(sum(s.decision == "erase" for s in segs)),
        "truncated": float(sum(d.finish_reason == "length" for d in dones if d is not None)),
    }


def finish_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Means of the summed rollout metrics (safe on empty batches)."""
    n = max(sums["rollouts"], 1.0)
    rc = max(sums["reward_count"], 1.0)
    mean = sums["reward_sum"] / rc
    kept = max(sums["tokens_kept"], 1.0)
    return {
        "reward_mean": mean,
        "reward_std": math.sqrt(max(sums["reward_sq_sum"] / rc - mean * mean, 0.0)),
        "accuracy": sums["correct"] / n,
        "entropy_mean": sums["entropy_sum"] / kept,
        "surprisal_mean": sums["surprisal_sum"] / kept,
        "erase_rate": sums["erase_decisions"] / max(sums["segments"], 1.0),
        "tokens_generated": sums["tokens_generated"],
        "tokens_kept": sums["tokens_kept"],
        "tokens_erased": sums["tokens_generated"] - sums["tokens_kept"],
        "completion_length_mean": sums["tokens_kept"] / n,
        "truncated_fraction": sums["truncated"] / n,
        "rollouts": sums["rollouts"],
    }


def zero_variance_counts(traces: Sequence[Trace], rewards: Sequence[float | None]) -> dict[str, float]:
    """Groups among ``traces`` (one prompt of one generate call) and how many of them have no signal:
    all valid rewards equal, so every advantage is 0 (sums, for ``distributed.sum_floats``)."""
    groups: dict[tuple[str, int], list[float | None]] = {}
    for tr, r in zip(traces, rewards):
        start = tr.start
        assert isinstance(start, StartEvent)
        groups.setdefault((start.batch, start.group_id), []).append(r)
    return {"groups": float(len(groups)), "zero_variance": float(sum(not group_has_signal(g) for g in groups.values()))}


def group_has_signal(rewards: Sequence[float | None]) -> bool:
    """DAPO's dynamic-sampling filter: a group whose valid rewards are not all equal."""
    valid = [r for r in rewards if r is not None]
    return len(set(valid)) > 1

