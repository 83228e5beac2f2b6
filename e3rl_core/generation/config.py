"""Configuration dataclasses for erasable generation, one per component.

Every field that reconstructs an unstated detail of the paper ([R] in
``docs/method.md``, copied from the design notes) carries the default given there, so that it can
be changed when the paper's exact choice is known. Building a config from flat settings
(``section.field=value``) is ``e3rl_core.overrides``.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..overrides import build, require_finite

SIGNALS = ("surprisal", "entropy")
KV_CACHES = ("dynamic", "static")


@dataclass
class SamplingConfig:
    """How tokens are drawn. Signals are always computed from the raw logits, before any warping."""

    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    retry_temperature_step: float = 0.0
    """[R] Added to the temperature for each erasure already spent on the segment (sampling only)."""

    def __post_init__(self) -> None:
        require_finite(self, "sampling")
        if not self.temperature >= 0:
            raise ConfigError(f"sampling.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"sampling.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.retry_temperature_step < 0:
            raise ConfigError("sampling.retry_temperature_step must be >= 0")


@dataclass
class SegmentConfig:
    """How the completion is cut into local decision windows (paper: N non-overlapping segments)."""

    mode: str = "fixed"
    """Segmenter registry name: ``fixed`` (windows of ``segment_tokens``) or ``delimiter``."""
    segment_tokens: int = 512
    """Window length for ``fixed``; the longest segment for ``delimiter``. Paper default 512."""
    snap_to_newline: bool = False
    """[R] ``fixed`` only: end a window at the first ``snap_to`` within +-``snap_window`` of its length."""
    snap_window: int = 32
    """[R] Half-width of the snapping window, in tokens."""
    snap_to: str = "\n"
    """[R] The boundary ``snap_to_newline`` snaps to: ``\\n`` (any line) or ``\\n\\n`` (the blank line
    between reasoning steps of thinking models such as Qwen3 and DeepSeek-R1)."""
    delimiters: tuple[str, ...] = ("\n", ". ")
    """[R] ``delimiter`` mode: a segment ends once its text ends with one of these."""

    def __post_init__(self) -> None:
        require_finite(self, "segment")
        if self.segment_tokens < 1:
            raise ConfigError(f"segment.segment_tokens must be >= 1, got {self.segment_tokens}")
        if self.snap_to_newline and not 0 <= self.snap_window < self.segment_tokens:
            raise ConfigError("segment.snap_window must be in [0, segment_tokens)")
        if self.snap_to_newline and not self.snap_to:
            raise ConfigError("segment.snap_to must be a non-empty string, e.g. \\n or \\n\\n")
        self.delimiters = tuple(self.delimiters)
        if self.mode == "delimiter" and not all(self.delimiters):
            raise ConfigError("segment.delimiters must be non-empty strings")


@dataclass
class ScoreConfig:
    """Segment score U_n = a*B_n + b*M_n + c*D_n (method section 3)."""

    signal: str = "surprisal"
    """Decision signal: ``surprisal`` (-log p of the sampled token; default, see method section 1)
    or ``entropy`` (predictive entropy). Both are always recorded."""
    weight_base: float = 0.5
    """a: weight of the base uncertainty B_n (mean of the smoothed signal)."""
    weight_max: float = 0.3
    """b: weight of the extreme deviation M_n (max of the raw signal)."""
    weight_delta: float = 0.2
    """c: weight of the gradient anomaly D_n = max(B_n - B_{n-1}, 0)."""
    smoothing_window: int | None = None
    """[R] Trailing moving-average width; None = 8 for ``delimiter`` mode, 32 for ``fixed``."""
    first_reference: str = "prompt_tail"
    """[R] B_0 for the first segment's D: ``prompt_tail`` (signal over the prompt's last tokens) or ``zero``."""

    def __post_init__(self) -> None:
        require_finite(self, "score")
        if self.signal not in SIGNALS:
            raise ConfigError(f"unknown score.signal {self.signal!r}; choose one of: {', '.join(SIGNALS)}")
        if self.smoothing_window is not None and self.smoothing_window < 1:
            raise ConfigError("score.smoothing_window must be >= 1 (or unset for the mode's default)")
        if self.first_reference not in ("prompt_tail", "zero"):
            raise ConfigError("score.first_reference must be 'prompt_tail' or 'zero'")


@dataclass
class ThresholdConfig:
    """Threshold policy Theta_n(e) and its parameters (method section 4)."""

    policy: str = "e3rl"
    """Registry name: ``e3rl``, ``fixed``, ``zscore``, ``quantile`` or ``none``."""
    kappa: float = 1.0
    """[R] e3rl: beta_n = mu_n + kappa * sigma_n over the group's first-attempt scores."""
    sigma_floor: float = 0.0
    """[R] e3rl: beta_n = mu_n + kappa * max(sigma_n, sigma_floor). A group that writes the same line
    has sigma ~ 0, so its threshold is its mean and near-identical rows are erased by float noise
    (the decision-effects audit of the shipped model: 79 such erasures, none helped); a floor (in
    score units, nats) keeps a margin there. 0 = the plain group statistic."""
    min_group: int = 4
    """[R] e3rl: with fewer live rollouts than this, use the moving average instead of the group."""
    fallback: str = "baseline_ema"
    """[R] e3rl with fewer than ``min_group`` live rollouts: ``baseline_ema`` = moving average of past
    baselines (a lone rollout's baseline is its score); ``score_stats`` = moving mean + kappa * moving
    std of past first-attempt scores."""
    ema_momentum: float = 0.9
    """[R] e3rl: momentum of the fallback's moving averages."""
    warmup_segments: int = 2
    """[R] Segments scored before adaptive policies may erase (no statistics yet)."""
    penalty_lambda: float = 0.3
    """[R] Gamma(e) = exp(lambda * e): each erasure already spent raises the bar (adaptive policies)."""
    history_clip: tuple[float, float] = (0.8, 1.25)
    """[R] Clip range of the history term phi_n."""
    history_reference: float | None = None
    """[R] Reference signal mean for phi_n; None = the group's running mean over kept tokens."""
    value: float = 2.0
    """``fixed``: the threshold itself, in units of the score."""
    z: float = 1.5
    """``zscore``: erase when U_n exceeds the trace's mean + z * std of earlier scores."""
    quantile: float = 0.9
    """``quantile``: erase when U_n exceeds this quantile of the earlier first-attempt scores."""

    def __post_init__(self) -> None:
        require_finite(self, "threshold")
        self.history_clip = tuple(self.history_clip)  # type: ignore[assignment]
        lo, hi = self.history_clip
        if not 0 < lo <= 1 <= hi:
            raise ConfigError("threshold.history_clip must satisfy 0 < low <= 1 <= high")
        if not 0 <= self.ema_momentum < 1:
            raise ConfigError("threshold.ema_momentum must be in [0, 1)")
        if self.sigma_floor < 0:
            raise ConfigError(f"threshold.sigma_floor must be >= 0, got {self.sigma_floor}")
        if self.fallback not in ("baseline_ema", "score_stats"):
            raise ConfigError("threshold.fallback must be 'baseline_ema' or 'score_stats'")
        if self.min_group < 2:
            raise ConfigError("threshold.min_group must be >= 2 (a std needs two scores)")
        if self.warmup_segments < 0:
            raise ConfigError("threshold.warmup_segments must be >= 0")
        if not 0 < self.quantile < 1:
            raise ConfigError("threshold.quantile must be in (0, 1)")


@dataclass
class EraseConfig:
    """The erase operator (method section 5)."""

    enabled: bool = True
    """False scores and records every segment but never erases."""
    budget: int = 5
    """K: erasures allowed per segment (paper: Erase@5)."""
    max_per_trace: int | None = None
    """[R] Cap on erasures per trace; None = 2N with N = max_new_tokens / segment_tokens."""
    fallback: str = "best"
    """[R] When the budget is spent: keep the attempt with the lowest score (``best``) or the ``last``."""
    ban_greedy: bool = True
    """[R] Greedy decoding: in the retry, exclude the erased attempt's token at its most uncertain position."""
    ban_sampling: bool = False
    """[R] Apply the same exclusion when sampling (a fresh draw already diverges)."""
    compact_ratio: float = 0.5
    """Batched groups: compact the KV cache when this share of its columns are masked holes."""

    def __post_init__(self) -> None:
        require_finite(self, "erase")
        if self.budget < 0:
            raise ConfigError("erase.budget must be >= 0")
        if self.max_per_trace is not None and self.max_per_trace < 0:
            raise ConfigError("erase.max_per_trace must be >= 0 (or unset for 2N)")
        if self.fallback not in ("best", "last"):
            raise ConfigError("erase.fallback must be 'best' or 'last'")
        if not 0 < self.compact_ratio <= 1:
            raise ConfigError("erase.compact_ratio must be in (0, 1]")


@dataclass
class GenerationConfig:
    """Everything erasable generation needs, by section. Paper defaults: 16 segments x 512 tokens."""

    max_new_tokens: int = 8192
    """Longest final completion (kept tokens); erased tokens do not count."""
    record_top_k: int = 0
    """Record the k most likely tokens and their probabilities with each token event (0 = off;
    the app uses 5 for its hover cards)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    erase: EraseConfig = field(default_factory=EraseConfig)
    kv_cache: str = "static"
    """Where decoding keeps keys and values: ``static`` (default; a preallocated buffer per layer
    written in place, growing by doubling, so a step copies only the new token's entries and a
    rollback moves the write position back) or ``dynamic`` (transformers' ``DynamicCache``, which
    concatenates the whole cache at every step: the reference). Both give the same tokens and
    signals (tested); ``static`` avoids the per-token copy that dominates long traces."""
    share_prefix: bool = False
    """Prefill the prompt tokens every row of the batch shares once, on one row, and copy their
    cache entries (keys and values, recurrent states) to every row: the decision-effect audit's
    2K branches of one prefix (``evaluation.effects``) then pay for the prefix once. Each row
    still prefills at least the last ``score.smoothing_window + 1`` prompt tokens itself, so the
    first segment's baseline is the same; tokens equal the unshared prefill's (tested). Off by
    default: a batch of different prompts shares little."""
    compile: bool = False
    """``torch.compile`` the one-token decode forward (``--compile``; dynamic shapes, the prefill
    stays eager). The first run pays the compilation (about a minute on a CPU), later runs with the
    same model reuse it; tokens and signals are the same (tested on CPU). Needs a C++ compiler on a
    CPU and Triton on CUDA; without one the run stops at once saying so."""

    def __post_init__(self) -> None:
        require_finite(self)
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.kv_cache not in KV_CACHES:
            raise ConfigError(f"unknown kv_cache {self.kv_cache!r}; choose one of: {', '.join(KV_CACHES)}")
        if not 0 <= self.record_top_k <= 50:
            raise ConfigError(f"record_top_k must be in [0, 50], got {self.record_top_k}")

    @property
    def smoothing_window(self) -> int:
        if self.score.smoothing_window is not None:
            return self.score.smoothing_window
        return 8 if self.segment.mode == "delimiter" else 32

    @property
    def trace_erase_cap(self) -> int:
        if self.erase.max_per_trace is not None:
            return self.erase.max_per_trace
        return 2 * max(1, math.ceil(self.max_new_tokens / self.segment.segment_tokens))

    def to_dict(self) -> dict[str, Any]:
        """JSON-native nested dict (tuples become lists), as stored in trace start events."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GenerationConfig":
        """Inverse of ``to_dict``; missing fields take their defaults (older trace files stay readable)."""
        merged = dataclasses.asdict(cls())
        for key, value in data.items():
            if key not in merged:
                raise ConfigError(f"unknown config field {key!r}")
            if isinstance(merged[key], dict):
                unknown = set(value) - set(merged[key])
                if unknown:
                    raise ConfigError(f"unknown fields in config section {key!r}: {sorted(unknown)}")
                merged[key].update(value)
            else:
                merged[key] = value
        return build(cls, merged)
