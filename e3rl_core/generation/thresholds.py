"""Threshold policies Theta_n(e) = baseline * penalty * history (method section 4).

A policy is a small stateful controller, one per group of rollouts that share a prompt (the shape of
verl's KL controllers): the generator reports first-attempt scores and kept signals, and asks for
the threshold of a segment. Every part is returned, so each decision can be audited.

Policies (select by ``ThresholdConfig.policy``):
- ``e3rl``     group baseline mu_n + kappa*max(sigma_n, sigma_floor) over the group's first-attempt scores at segment
               n; with fewer than ``min_group`` live rollouts, a moving average of past baselines
               (warm-up of ``warmup_segments`` segments first). Penalty exp(lambda*e), history
               term phi_n (1 for a lone rollout unless ``history_reference`` is set).
- ``fixed``    a constant; no penalty, no history.
- ``zscore``   per trace: mean + z*std of this trace's earlier first-attempt scores; penalty.
- ``quantile`` the q-quantile of the group's earlier first-attempt scores; penalty.
- ``none``     never erases (scores are still recorded).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, ClassVar, Protocol, Sequence

from ..registry import Registry
from .config import ThresholdConfig


@dataclass(frozen=True)
class ThresholdParts:
    """baseline None means "no statistics yet": the segment is accepted whatever its score."""

    baseline: float | None
    penalty: float = 1.0
    history: float = 1.0

    @property
    def threshold(self) -> float | None:
        if self.baseline is None:
            return None
        return self.baseline * self.penalty * self.history


class ThresholdPolicy(Protocol):
    needs_group: ClassVar[bool]
    """True: a decision on segment n waits until every live rollout of the group has scored its
    first attempt at n (the group advances segment by segment in lockstep)."""

    def observe_first(self, row: int, segment: int, score: float) -> None: ...

    def observe_kept(self, row: int, signal: Sequence[float]) -> None: ...

    def parts(self, row: int, segment: int, erasures: int) -> ThresholdParts: ...


POLICIES: Registry[Callable[[ThresholdConfig], ThresholdPolicy]] = Registry("threshold policy")


def make_policy(config: ThresholdConfig) -> ThresholdPolicy:
    """A fresh policy for one group of rollouts."""
    return POLICIES.get(config.policy)(config)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (ddof=0, as GRPO's group statistics)."""
    n = len(values)
    mu = sum(values) / n
    return mu, math.sqrt(sum((v - mu) ** 2 for v in values) / n)


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default method)."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class _Scores:
    """First-attempt scores by segment and row, shared bookkeeping for the adaptive policies."""

    def __init__(self) -> None:
        self.by_segment: dict[int, dict[int, float]] = defaultdict(dict)

    def add(self, row: int, segment: int, score: float) -> None:
        self.by_segment[segment].setdefault(row, score)

    def before(self, segment: int, row: int | None = None) -> list[float]:
        return [
            s
            for n, rows in sorted(self.by_segment.items())
            if n < segment
            for r, s in sorted(rows.items())
            if row is None or r == row
        ]


@POLICIES.register("e3rl")
class E3RLThreshold:
    needs_group: ClassVar[bool] = True

    def __init__(self, config: ThresholdConfig) -> None:
        self.cfg = config
        self.scores = _Scores()
        self.baselines: dict[int, float | None] = {}
        self.segments_seen = 0  # segment indices folded into the fallback (the warm-up counts these)
        self.ema_baseline = 0.0  # fallback "baseline_ema"
        self.ema_mean = 0.0  # fallback "score_stats"
        self.ema_var = 0.0
        self.stats_count = 0
        self.kept_sum: dict[int, float] = defaultdict(float)
        self.kept_count: dict[int, int] = defaultdict(int)

    def observe_first(self, row: int, segment: int, score: float) -> None:
        self.scores.add(row, segment, score)

    def observe_kept(self, row: int, signal: Sequence[float]) -> None:
        self.kept_sum[row] += float(sum(signal))
        self.kept_count[row] += len(signal)

    def _fold(self, scores: list[float]) -> None:
        """Fold one segment's first-attempt scores into the fallback's moving averages."""
        m = self.cfg.ema_momentum
        mu, sigma = mean_std(scores)
        beta = mu + self.cfg.kappa * max(sigma, self.cfg.sigma_floor)
        self.ema_baseline = beta if self.segments_seen == 0 else m * self.ema_baseline + (1 - m) * beta
        # score_stats: a group contributes its mean and spread, lone scores one by one.
        items = [(mu, sigma * sigma)] if len(scores) >= self.cfg.min_group else [(s, 0.0) for s in scores]
        for x, var in items:
            if self.stats_count == 0:
                self.ema_mean, self.ema_var = x, var
            else:
                d = x - self.ema_mean
                self.ema_mean += (1 - m) * d
                self.ema_var = m * (self.ema_var + (1 - m) * d * d) + (1 - m) * var
            self.stats_count += 1
        self.segments_seen += 1

    def _fallback(self) -> float | None:
        if self.segments_seen < max(1, self.cfg.warmup_segments):
            return None
        if self.cfg.fallback == "baseline_ema":
            return self.ema_baseline
        return self.ema_mean + self.cfg.kappa * math.sqrt(self.ema_var)

    def baseline(self, segment: int) -> float | None:
        """beta_n, computed once per segment index from the first attempts at that index."""
        if segment in self.baselines:
            return self.baselines[segment]
        for earlier in sorted(k for k in self.scores.by_segment if k < segment and k not in self.baselines):
            self.baseline(earlier)  # fold segments in order, even those nobody asked about
        scores = [s for _, s in sorted(self.scores.by_segment.get(segment, {}).items())]
        if len(scores) >= self.cfg.min_group:
            mu, sigma = mean_std(scores)
            beta: float | None = mu + self.cfg.kappa * max(sigma, self.cfg.sigma_floor)
        else:
            beta = self._fallback()
        if scores:
            self._fold(scores)
        self.baselines[segment] = beta
        return beta

    def history(self, row: int) -> float:
        """phi_n = clip(trace mean / reference mean, lo, hi); 1 before any token is kept."""
        if self.kept_count[row] == 0:
            return 1.0
        own = self.kept_sum[row] / self.kept_count[row]
        if self.cfg.history_reference is not None:
            ref = self.cfg.history_reference
        else:
            ref = sum(self.kept_sum.values()) / max(1, sum(self.kept_count.values()))
        if ref <= 0:
            return 1.0
        lo, hi = self.cfg.history_clip
        return min(max(own / ref, lo), hi)

    def parts(self, row: int, segment: int, erasures: int) -> ThresholdParts:
        return ThresholdParts(
            baseline=self.baseline(segment),
            penalty=math.exp(self.cfg.penalty_lambda * erasures),
            history=self.history(row),
        )


@POLICIES.register("fixed")
class FixedThreshold:
    needs_group: ClassVar[bool] = False

    def __init__(self, config: ThresholdConfig) -> None:
        self.value = config.value

    def observe_first(self, row: int, segment: int, score: float) -> None:
        pass

    def observe_kept(self, row: int, signal: Sequence[float]) -> None:
        pass

    def parts(self, row: int, segment: int, erasures: int) -> ThresholdParts:
        return ThresholdParts(baseline=self.value)


@POLICIES.register("zscore")
class ZScoreThreshold(FixedThreshold):
    def __init__(self, config: ThresholdConfig) -> None:
        self.cfg = config
        self.scores = _Scores()

    def observe_first(self, row: int, segment: int, score: float) -> None:
        self.scores.add(row, segment, score)

    def parts(self, row: int, segment: int, erasures: int) -> ThresholdParts:
        past = self.scores.before(segment, row)
        if len(past) < max(2, self.cfg.warmup_segments):
            return ThresholdParts(baseline=None)
        mu, sigma = mean_std(past)
        return ThresholdParts(mu + self.cfg.z * sigma, math.exp(self.cfg.penalty_lambda * erasures))


@POLICIES.register("quantile")
class QuantileThreshold(ZScoreThreshold):
    def parts(self, row: int, segment: int, erasures: int) -> ThresholdParts:
        past = self.scores.before(segment)
        if len(past) < max(2, self.cfg.warmup_segments):
            return ThresholdParts(baseline=None)
        return ThresholdParts(
            quantile(past, self.cfg.quantile), math.exp(self.cfg.penalty_lambda * erasures)
        )


@POLICIES.register("none")
class NoThreshold(FixedThreshold):
    def __init__(self, config: ThresholdConfig) -> None:
        pass

    def parts(self, row: int, segment: int, erasures: int) -> ThresholdParts:
        return ThresholdParts(baseline=None)
