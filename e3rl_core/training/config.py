"""The trainer's configuration: one dataclass, TRL's ``GRPOConfig`` names where they exist.

``TrainConfig.for_algo(algo)`` gives an algorithm's defaults; ``--set field=value`` (or
``--set generation.threshold.kappa=1.5``) then overrides any field, so a preset never hides a knob.

| algo  | rollouts            | advantages                      | loss                              |
|-------|---------------------|---------------------------------|-----------------------------------|
| grpo  | plain sampling      | group-relative, one per rollout | ``grpo`` aggregation, eps 0.2/0.2  |
| dapo  | plain sampling      | group-relative, one per rollout | ``dapo`` token mean, eps 0.2/0.28, dynamic sampling |
| e3rl  | erasable generation | per segment, causal attention   | ``dapo`` token mean, eps 0.2/0.28  |
DAPO's overlong reward shaping is not included (``mask_truncated_completions`` is the nearest knob).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..generation.config import GenerationConfig
from ..overrides import build, require_finite

ALGOS = ("grpo", "dapo", "e3rl")
SCHEDULERS = ("constant", "linear", "cosine")
ATTENTION_IMPLS = ("linear", "eager")
PARALLEL = ("ddp", "fsdp")
MIXED_PRECISION = ("none", "bf16")
ERASURE_WHEN = ("always", "no_signal")
"""``TrainConfig.erasure_when``: when a rollout is generated with erasure (reading R3: ``no_signal``)."""


@dataclass
class TrainConfig:
    """Everything ``e3rl train`` needs besides the model, the data and the output directory."""

    algo: str = "e3rl"
    """Preset the other defaults came from (``grpo``, ``dapo`` or ``e3rl``); recorded in the run."""
    seed: int = 0
    """Fixes the data order, every rollout's sampling stream and the initial RNG state."""
    max_steps: int = 100
    """Optimizer steps (one batch of rollouts each). ``--steps``."""
    rollout_token_budget: int | None = None
    """Stop once this many tokens have been generated (erased ones included), whatever max_steps;
    how the reproduction gives every algorithm the same rollout budget."""
    prompts_per_step: int = 8
    """Prompts (groups) per step over all processes; must divide by the number of processes."""
    num_generations: int = 8
    """G, rollouts per prompt (TRL ``num_generations``); >= 2 for group-relative advantages."""
    max_completion_length: int | None = None
    """Longest completion in tokens (TRL); None = the generation config's ``max_new_tokens``."""
    temperature: float | None = None
    """Rollout sampling temperature (TRL); None = the generation config's. Log-probs use it too."""
    learning_rate: float = 1e-6
    """AdamW learning rate (TRL's default, for billion-parameter models; the shipped 1.6M-parameter
    demo model wants ~1e-4, see the README)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    lr_scheduler_type: str = "constant"
    """``constant``, ``linear`` or ``cosine``, after ``warmup_steps``; the decay reaches 0 at the run's
    end: max_steps or, when set, rollout_token_budget (by tokens generated), whichever comes first."""
    warmup_steps: int = 0
    beta: float = 0.0
    """KL coefficient to the frozen initial model (k3 estimator); 0 loads no reference model."""
    epsilon: float = 0.2
    """Lower clip range of the ratio (TRL ``epsilon``)."""
    epsilon_high: float | None = None
    """Upper clip range (clip-higher, DAPO 0.28); None = ``epsilon``."""
    loss_type: str = "dapo"
    """Aggregation: ``grpo`` (sequence mean), ``dr_grpo`` (by max length) or ``dapo`` (token mean)."""
    scale_rewards: str = "group"
    """Divide advantages by the ``group``'s or the ``batch``'s reward std, or ``none`` (Dr. GRPO)."""
    advantage_estimator: str = "grpo"
    """Registry name: ``grpo`` (group mean baseline) or ``rloo`` (leave-one-out)."""
    mask_truncated_completions: bool = False
    """Leave completions cut at max length out of the loss (TRL)."""
    num_iterations: int = 1
    """Optimizer passes over each batch (TRL ``num_iterations``, GRPO's mu); ratios depart from 1
    and clipping acts from the second pass on."""
    micro_batch_size: int = 0
    """Rollouts per forward/backward pass, gradients accumulated (0 = the whole local batch)."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal and sample more prompts until the batch has
    ``prompts_per_step`` groups (or ``dynamic_sampling_max_rounds`` rounds were drawn)."""
    dynamic_sampling_max_rounds: int = 3
    allocation: str = "uniform"
    """Segment allocator: ``uniform`` or ``causal_attention`` (E3RL; see ``attention_impl``)."""
    allocation_lambda: float = 0.5
    """[R] lam in A_{i,n} = A_i ((1 - lam) + lam hat_w_{i,n})."""
    attention_layers: int = 4
    """[R] Attention is averaged over the last L layers (all if fewer; 0 = all)."""
    attention_impl: str = "linear"
    """How ``causal_attention`` gets the answer segment's attention: ``linear`` recomputes it for the
    answer queries only, from hooks on the ordinary (SDPA) forward, O(answer x T) memory (the
    families ``training/answer_attention.py`` lists; others are refused naming this field); ``eager`` reads the full maps of an eager ``output_attentions`` forward, O(T^2)
    memory, any model (the reference)."""
    no_base_uncertainty: bool = False
    """Ablation: drop B_n from the segment score (score.weight_base = 0)."""
    no_group_dynamics: bool = False
    """Ablation: no group baseline; each rollout is judged against its own earlier segments
    (threshold policy ``zscore`` with z = kappa) instead of the group's scores at that segment."""
    no_causal_allocation: bool = False
    """Ablation: every segment gets the rollout's advantage (allocation ``uniform``)."""
    erased_advantage_delta: float = 0.0
    """[R] Reading R1: delta > 0 also trains on each erased attempt (in the context it was generated in) with
    advantage -delta * |A_i|, pushing the policy away from what was erased; 0 = the paper's
    post-erasure objective only (method section 6)."""
    contrast_advantage: float = 0.0
    """[R] Reading R2, a segment-local contrast: c > 0 pairs each erased attempt with the attempt that
    replaced it (same prefix, same segment): the erased tokens get advantage -c (in the context they
    were generated in) and the kept segment's tokens +c on top of their own, so the loss learns which
    continuation of that prefix was better even where the group's outcomes tie (an all-correct group,
    A = 0). In units of the normalised advantage; 0 = off."""
    erasure_when: str = "always"
    """[R] Reading R3, erasure as exploration: ``always`` (every rollout generated with erasure, the
    paper's way) or ``no_signal``: each group is sampled plainly first, and only a group with no
    correct rollout is generated again with erasure (the same seeds), so healed successes add a
    gradient exactly where GRPO has none and every other group stays on-policy. Both generations'
    tokens count towards the rollout-token budget."""
    eval_data: str | None = None
    """Held-out dataset SPEC (like ``--data``): the policy is scored on it before the first step and
    after the last (Avg@K, plain sampling, erasure off, seed 0) into OUT/eval.json. One process only;
    for a multi-process run, evaluate its checkpoint with ``e3rl eval``."""
    eval_samples: int = 4
    """K: samples per held-out problem."""
    reward_timeout: float = 5.0
    """Seconds math-verify may spend on one answer."""
    save_steps: int = 50
    """Write a checkpoint every this many steps (and always at the end)."""
    save_total_limit: int | None = 2
    """Keep only the newest checkpoints (None keeps all)."""
    log_rollouts: int = 2
    """Rollouts per step whose full event traces go to rollouts.jsonl (with ``erasure_when=no_signal``,
    also as many of the step's healed rollouts: the plain first pass erases nothing)."""
    parallel: str = "ddp"
    """How processes share the model: ``ddp`` (each holds a full replica; gradients summed once per
    step) or ``fsdp`` (torch FSDP2: each decoder layer and the root are sharded, so each of N
    processes holds 1/N of the parameters, gradients and AdamW state; rollouts run on a full copy
    gathered once per step; sharded checkpoints). Either works with one process or under torchrun."""
    fsdp_mixed_precision: str = "none"
    """With ``parallel=fsdp``: ``bf16`` runs forwards and backwards with bf16 parameters and reduces
    gradients in float32, the sharded master weights and AdamW state staying in the load dtype
    (``--dtype``, float32 by default); ``none`` computes in the load dtype."""
    fsdp_cpu_offload: bool = False
    """With ``parallel=fsdp``: keep the sharded parameters, gradients and optimizer state in host
    memory (FSDP2's ``CPUOffloadPolicy``; the optimizer steps on the CPU), leaving the GPU to the
    gathered layers, activations and the rollout copy."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Rollout generation: sampling, segmenter, score, threshold policy, erase operator."""

    def __post_init__(self) -> None:
        require_finite(self)
        checks = [
            (self.algo in ALGOS, f"algo must be one of {', '.join(ALGOS)}, got {self.algo!r}"),
            (self.max_steps >= 1, "max_steps (--steps) must be >= 1"),
            (self.prompts_per_step >= 1, "prompts_per_step must be >= 1"),
            (self.num_generations >= 1, "num_generations (--group-size) must be >= 1"),
            (self.learning_rate >= 0, "learning_rate must be >= 0"),
            (0 <= self.epsilon < 1, "epsilon must be in [0, 1)"),
            (self.epsilon_high is None or self.epsilon_high >= 0, "epsilon_high must be >= 0"),
            (self.beta >= 0, "beta must be >= 0"),
            (self.lr_scheduler_type in SCHEDULERS, f"lr_scheduler_type must be one of {', '.join(SCHEDULERS)}"),
            (self.num_iterations >= 1, "num_iterations must be >= 1"),
            (self.micro_batch_size >= 0, "micro_batch_size must be >= 0 (0 = whole batch)"),
            (0 <= self.allocation_lambda <= 1, "allocation_lambda must be in [0, 1]"),
            (self.attention_layers >= 0, "attention_layers must be >= 0 (0 = all layers)"),
            (self.attention_impl in ATTENTION_IMPLS,
             f"attention_impl must be one of {', '.join(ATTENTION_IMPLS)}, got {self.attention_impl!r}"),
            (self.save_steps >= 1, "save_steps must be >= 1"),
            (self.eval_samples >= 1, "eval_samples must be >= 1"),
            (self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit must be >= 1 or None"),
            (self.scale_rewards in ("group", "batch", "none"), "scale_rewards must be group, batch or none"),
            (self.rollout_token_budget is None or self.rollout_token_budget > 0, "rollout_token_budget must be > 0"),
            (self.erased_advantage_delta >= 0, "erased_advantage_delta must be >= 0"),
            (self.contrast_advantage >= 0, "contrast_advantage must be >= 0"),
            (self.erasure_when in ERASURE_WHEN,
             f"erasure_when must be one of {', '.join(ERASURE_WHEN)}, got {self.erasure_when!r}"),
            (self.erasure_when == "always" or self.generation.erase.enabled,
             "erasure_when=no_signal regenerates groups with erasure, which is off; use --algo e3rl or "
             "--set generation.erase.enabled=true"),
            (self.dynamic_sampling_max_rounds >= 1, "dynamic_sampling_max_rounds must be >= 1"),
            (self.warmup_steps >= 0 and self.log_rollouts >= 0, "warmup_steps and log_rollouts must be >= 0"),
            (self.parallel in PARALLEL, f"parallel must be one of {', '.join(PARALLEL)}, got {self.parallel!r}"),
            (self.fsdp_mixed_precision in MIXED_PRECISION,
             f"fsdp_mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.fsdp_mixed_precision!r}"),
            (self.parallel == "fsdp" or (self.fsdp_mixed_precision == "none" and not self.fsdp_cpu_offload),
             "fsdp_mixed_precision and fsdp_cpu_offload apply to sharded training only; add --set parallel=fsdp"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        from .advantages import ADVANTAGES, ALLOCATORS
        from .losses import LOSSES

        LOSSES.get(self.loss_type)
        ADVANTAGES.get(self.advantage_estimator)
        ALLOCATORS.get(self.allocation)
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise ConfigError("max_completion_length must be >= 1")

    @classmethod
    def for_algo(cls, algo: str, generation: GenerationConfig | None = None) -> "TrainConfig":
        """An algorithm's defaults, on top of a generation config (e.g. a model's recommended one)."""
        gen = dataclasses.replace(generation or GenerationConfig())
        if algo == "grpo":
            preset: dict[str, Any] = dict(loss_type="grpo", epsilon_high=None, allocation="uniform")
            erase = False
        elif algo == "dapo":
            preset = dict(loss_type="dapo", epsilon_high=0.28, dynamic_sampling=True, allocation="uniform")
            erase = False
        elif algo == "e3rl":
            preset = dict(loss_type="dapo", epsilon_high=0.28, allocation="causal_attention")
            erase = True
        else:
            raise ConfigError(f"unknown algo {algo!r}; choose one of: {', '.join(ALGOS)}")
        gen.erase = dataclasses.replace(gen.erase, enabled=erase)
        return cls(algo=algo, generation=gen, **preset)

    # ------------------------------------------------------------ derived settings
    @property
    def group_relative(self) -> bool:
        return self.advantage_estimator in ("grpo", "rloo")

    def effective_generation(self) -> GenerationConfig:
        """The rollout generation config with the TRL-named fields and the ablations applied."""
        gen = GenerationConfig.from_dict(self.generation.to_dict())
        if self.max_completion_length is not None:
            gen.max_new_tokens = self.max_completion_length
        if self.temperature is not None:
            gen.sampling.temperature = self.temperature
        if self.no_base_uncertainty:
            gen.score.weight_base = 0.0
        if self.no_group_dynamics:
            gen.threshold.policy = "zscore"
            gen.threshold.z = gen.threshold.kappa
        return GenerationConfig.from_dict(gen.to_dict())  # re-validate

    @property
    def trains_erased(self) -> bool:
        """Erased attempts are rows of the batch (readings R1 and R2)."""
        return self.erased_advantage_delta > 0 or self.contrast_advantage > 0

    @property
    def effective_allocation(self) -> str:
        return "uniform" if self.no_causal_allocation else self.allocation

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown train config fields {sorted(unknown)}")
        merged = dataclasses.asdict(cls())
        merged.update({k: v for k, v in data.items() if k != "generation"})
        config = build(cls, {**merged, "generation": dataclasses.asdict(GenerationConfig())})
        config.generation = GenerationConfig.from_dict(data.get("generation", {}))
        return config
