"""E3RL inside TRL's ``GRPOTrainer``: erasable rollouts and segment-level advantages.

Two pieces, both on TRL's experimental hooks (tested with the versions in ``TESTED_TRL``):

- ``E3RLRollout``: a ``rollout_func``. TRL calls it as ``rollout_func(prompts, trainer)`` with each
  prompt repeated ``num_generations`` times in a row; it runs this project's erasable generator on
  ``trainer.model`` (one group per prompt, generated in lockstep, the group threshold, Erase@K),
  and returns the kept trajectories with the log-probs recorded while sampling, plus the trace of
  each rollout (``e3rl_trace``: segments, decisions, erasures) and its tokens' segments
  (``e3rl_segment_ids``), which TRL hands to every reward function as keyword arguments. Traces
  are appended to ``<output_dir>/rollouts.jsonl`` in the workbench's event schema, so the Audit tab
  and ``e3rl audit`` read a TRL run like any other.
- ``E3RLGRPOTrainer``: ``GRPOTrainer`` whose advantages are per token: TRL's rollout advantage
  (its ``scale_rewards``, its group statistics) spread over each rollout's segments by the
  segment allocator (``causal_attention`` by default, as ``e3rl train --algo e3rl``), so each
  token carries its segment's advantage. TRL's loss accepts a (B, T) advantage as it is.

Everything else (optimizer, schedules, accelerate, PEFT, logging, checkpoints) stays TRL's. The
trajectory trained on is the kept one (reading R0 of docs/method.md section 6); readings R1-R3 need
rows or passes TRL's batch does not have and stay ``e3rl train`` options. What differs from
``e3rl train`` is listed in the README ("E3RL in TRL").
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import ConfigError
from ..events import Trace, dumps, group_traces
from ..generation.config import GenerationConfig
from ..generation.generator import ErasableGenerator
from ..tasks.rewards import reward as _reward
from ..training.advantages import ALLOCATORS
from ..training.answer_attention import UnsupportedAttentionError, answer_attention, layer_specs
from ..training.checkpoint import ROLLOUTS_FILE
from ..training.rollout import finish_metrics, kept_segments, rollout_metrics

TESTED_TRL = ("1.16",)
"""The TRL minor versions this bridge was tested with (``pip install 'e3rl-workbench[trl]'``)."""
UNTESTED_ENV = "E3RL_TRL_UNTESTED"
"""Set to 1 to run with another TRL version anyway (its experimental hooks may have changed)."""


class TRLVersionError(ImportError):
    """The installed TRL is missing or outside ``TESTED_TRL``."""


def check_trl_version(version: str | None = None) -> str:
    """The installed TRL's version, or one line naming the versions tested when it is not one of them."""
    if version is None:
        try:
            import trl
        except ImportError:
            raise TRLVersionError("the TRL bridge needs trl: pip install 'e3rl-workbench[trl]'") from None
        version = str(trl.__version__)
    minor = ".".join(version.split(".")[:2])
    if minor not in TESTED_TRL and os.environ.get(UNTESTED_ENV) != "1":
        tested = ", ".join(f"{v}.x" for v in TESTED_TRL)
        raise TRLVersionError(
            f"trl {version} is not a version the E3RL bridge was tested with ({tested}): "
            f"pip install 'e3rl-workbench[trl]', or set {UNTESTED_ENV}=1 to try it anyway")
    return version


check_trl_version()
from trl import GRPOTrainer  # noqa: E402  (after the version check, which names what to install)
from trl.models.utils import disable_gradient_checkpointing  # noqa: E402


def base_model(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (its LoRA layers sit inside it, so a forward of
    it is the adapted model's); the model itself otherwise."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _is_sharded(accelerator: Any) -> str | None:
    """What shards this run's parameters across processes (FSDP, DeepSpeed ZeRO-3), or None."""
    kind = str(getattr(accelerator.state, "distributed_type", "")).upper()
    if "FSDP" in kind:
        return "FSDP"
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if "DEEPSPEED" in kind and getattr(plugin, "zero_stage", 0) == 3:
        return "DeepSpeed ZeRO-3"
    return None


def _multimodal(processing_class: Any) -> bool:
    return getattr(processing_class, "image_processor", None) is not None


def _tokenizer_of(trainer: Any) -> Any:
    """The trainer's text tokenizer (a multimodal processor holds one)."""
    tok = getattr(trainer, "_tokenizer", None) or trainer.processing_class
    return getattr(tok, "tokenizer", tok)


def same_tokenizer(a: Any, b: Any) -> str | None:
    """None when ``a`` and ``b`` map the same strings to the same ids (and agree on EOS and pad),
    else what differs, in words."""
    if a is b:
        return None
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        only = sorted(set(va) ^ set(vb))[:3]
        moved = [t for t in set(va) & set(vb) if va[t] != vb[t]][:3]
        return (f"vocabularies differ ({len(va)} vs {len(vb)} tokens"
                + (f"; e.g. {only} in one only" if only else "") + (f"; {moved} with other ids" if moved else "") + ")")
    for name in ("eos_token_id", "pad_token_id"):
        if getattr(a, name, None) != getattr(b, name, None):
            return f"{name} differs ({getattr(a, name, None)} vs {getattr(b, name, None)})"
    return None


@dataclass
class RolloutSettings:
    """What ``E3RLRollout`` adds to a ``GRPOConfig``. Lengths and sampling (``max_completion_length``,
    ``temperature``, ``top_p``, ``top_k``) are TRL's: the loss scores tokens at TRL's temperature, so
    the rollout samples at it too."""

    generation: GenerationConfig = dataclasses.field(default_factory=GenerationConfig)
    """Segments, scores, threshold, erase budget (Erase@K); its sampling and length are overridden
    by the ``GRPOConfig``'s. ``E3RLRollout.from_pretrained`` loads a model's recommended one."""
    seed: int | None = None
    """Fixes every rollout's sampling stream, which follows the trainer's step, the process and the
    row (a resumed run draws what the uninterrupted one would); None = ``GRPOConfig.seed``."""
    log_rollouts: int = 2
    """Rollouts per call whose full event traces are appended to ``<output_dir>/rollouts.jsonl``
    (0 = none; -1 = all), as ``e3rl train``'s ``log_rollouts``."""


class E3RLRollout:
    """``rollout_func`` for TRL's ``GRPOTrainer``: erasable generation on ``trainer.model``.

    ``E3RLRollout()`` takes the default generation settings, ``E3RLRollout.from_pretrained(path)``
    a model directory's ``e3rl_generation.json``. ``tokenizer``: the tokenizer the settings were
    made for; one that differs from the trainer's is refused before any generation."""

    def __init__(self, settings: RolloutSettings | None = None, *, tokenizer: Any = None) -> None:
        self.settings = settings or RolloutSettings()
        self.tokenizer = tokenizer
        self._generator: ErasableGenerator | None = None
        self._checked: int | None = None  # id of the trainer checked
        self._calls: dict[tuple[int, str], int] = {}  # generations per (trainer step, train/eval)
        self.last_traces: list[Trace] = []
        """The traces of the last call (all rows), for callers that want more than the trace file."""

    @classmethod
    def from_pretrained(cls, model: str, *, log_rollouts: int = 2, seed: int | None = None,
                        tokenizer: Any = None) -> "E3RLRollout":
        """Settings from a model directory's ``e3rl_generation.json`` (the defaults without one)."""
        from ..models import recommended_config

        return cls(RolloutSettings(recommended_config(model), seed=seed, log_rollouts=log_rollouts),
                   tokenizer=tokenizer)

    def save_pretrained(self, path: str | os.PathLike[str]) -> Path:
        """Write the erasure settings next to a saved model (``e3rl_generation.json``), so the
        workbench and ``E3RLRollout.from_pretrained`` decode the trained model as it was trained."""
        import json

        from ..models import RECOMMENDED_CONFIG

        out = Path(path) / RECOMMENDED_CONFIG
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.settings.generation.to_dict(), indent=2) + "\n")
        return out

    # ------------------------------------------------------------------ checks
    def check(self, trainer: Any) -> None:
        """Refuse, before generating, what this rollout would get wrong with ``trainer``."""
        if self._checked == id(trainer):
            return
        args = trainer.args
        tok = _tokenizer_of(trainer)
        if self.tokenizer is not None:
            diff = same_tokenizer(self.tokenizer, tok)
            if diff:
                raise ConfigError(f"the E3RL rollout's tokenizer is not the trainer's: {diff}; pass the trainer's "
                                  f"processing_class to E3RLRollout(tokenizer=...), or leave it out")
        if getattr(args, "use_vllm", False):
            raise ConfigError("use_vllm=True: the E3RL rollout generates with trainer.model itself (erasure rolls a "
                              "KV cache back, which a vLLM server does not offer); set use_vllm=False")
        if getattr(args, "use_transformers_paged", False) or getattr(args, "use_transformers_continuous_batching", False):
            raise ConfigError("the E3RL rollout replaces TRL's generation; turn off transformers paged/continuous batching")
        unsupported = {k: getattr(args, k, None) for k in ("min_p", "repetition_penalty", "generation_kwargs")}
        unsupported = {k: v for k, v in unsupported.items()
                       if v not in (None, {}) and not (k == "repetition_penalty" and v == 1.0)}
        if unsupported:
            raise ConfigError(f"the E3RL rollout samples with temperature, top_p and top_k only; unset {unsupported}")
        warped = args.temperature != 1.0 or (args.top_p or 1.0) < 1.0 or (args.top_k or 0) > 0
        gen = self.settings.generation
        if (warped or gen.sampling.retry_temperature_step > 0 or gen.erase.ban_sampling) and \
                getattr(args, "off_policy_mask_threshold", None) is not None:
            raise ConfigError("off_policy_mask_threshold reads the rollout's log-probs, which are the model's "
                              "untempered ones: use it with temperature=1.0, top_p=1.0, top_k=0, and without "
                              "sampling.retry_temperature_step or erase.ban_sampling")
        if getattr(trainer, "tools", None) or getattr(trainer, "environment_factories", None):
            raise ConfigError("the E3RL rollout generates single-turn completions; tools and environments are not "
                              "supported with it")
        if _multimodal(trainer.processing_class):
            raise ConfigError("the E3RL rollout generates from text prompts; a multimodal processor is not supported")
        sharded = _is_sharded(trainer.accelerator)
        if sharded:
            raise ConfigError(f"{sharded} shards the parameters, and the E3RL rollout generates with the whole "
                              f"model on each process: use data parallel (DDP) in TRL, or `e3rl train --set "
                              f"parallel=fsdp`, which gathers a rollout copy once per step")
        self._checked = id(trainer)

    def generation_config(self, trainer: Any) -> GenerationConfig:
        """The settings' generation config with TRL's length and sampling."""
        args = trainer.args
        gen = GenerationConfig.from_dict(self.settings.generation.to_dict())
        gen.max_new_tokens = int(args.max_completion_length)
        gen.sampling.temperature = float(args.temperature)
        gen.sampling.top_p = float(args.top_p if args.top_p is not None else 1.0)
        gen.sampling.top_k = int(args.top_k or 0)
        return GenerationConfig.from_dict(gen.to_dict())  # re-validate

    # ------------------------------------------------------------------ the call
    def _generator_for(self, model: Any, tokenizer: Any, config: GenerationConfig) -> ErasableGenerator:
        g = self._generator
        if g is None or g.model is not model or g.tokenizer is not tokenizer:
            g = ErasableGenerator(model, tokenizer, config, model_name=getattr(model.config, "_name_or_path", None))
            self._generator = g
        g.config = config
        return g

    @staticmethod
    def render(prompt: Any, tokenizer: Any, chat_template_kwargs: dict[str, Any] | None = None) -> str:
        """A prompt as TRL gives it: a string is used as it is, a conversation (a list of
        ``{"role", "content"}`` messages) goes through the tokenizer's chat template."""
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            if not getattr(tokenizer, "chat_template", None):
                raise ConfigError("a conversational prompt needs a tokenizer with a chat template; give the "
                                  "dataset plain-text prompts or set tokenizer.chat_template")
            return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False,
                                                 **(chat_template_kwargs or {}))
        raise ConfigError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")

    def __call__(self, prompts: Sequence[Any], trainer: Any) -> dict[str, list[Any]]:
        self.check(trainer)
        G = trainer.num_generations if trainer.model.training else trainer.num_generations_eval
        if not prompts or len(prompts) % G:
            raise ConfigError(
                f"this process got {len(prompts)} prompts, not whole groups of num_generations={G}: the group "
                f"threshold needs each group in one batch, so make per_device_train_batch_size (and "
                f"per_device_eval_batch_size) a multiple of num_generations")
        firsts = [prompts[i] for i in range(0, len(prompts), G)]
        for g, p in enumerate(firsts):
            if any(q != p for q in prompts[g * G : (g + 1) * G]):
                raise ConfigError(f"prompts {g * G}..{(g + 1) * G - 1} are not one prompt repeated {G} times, as "
                                  f"TRL's sampler gives them; the E3RL rollout generates one group per prompt")
        tok = _tokenizer_of(trainer)
        texts = [self.render(p, tok, getattr(trainer, "chat_template_kwargs", None)) for p in firsts]
        step = int(trainer.state.global_step) + 1
        rank = trainer.accelerator.process_index
        base = trainer.args.seed if self.settings.seed is None else self.settings.seed
        # The streams follow the trainer's step (not a count of calls), so a run resumed from a TRL
        # checkpoint draws what the uninterrupted run would have drawn; hashed, so that no two calls
        # (train or eval, any process) share one.
        mode = "t" if trainer.model.training else "e"
        nth = self._calls.get((step, mode), 0)
        self._calls[(step, mode)] = nth + 1
        key = f"e3rl-trl/{base}/{step}/{mode}/{nth}/{rank}".encode()
        first = int.from_bytes(hashlib.sha256(key).digest()[:6], "big") * 1_000_003
        model = base_model(trainer.accelerator.unwrap_model(trainer.model))
        gen = self._generator_for(model, tok, self.generation_config(trainer))
        was_training = model.training
        model.eval()  # sample without dropout; the loss's forward is TRL's and runs in its own mode
        t0 = time.perf_counter()
        try:
            events = list(gen.stream(texts, group_size=G, seed=[first + r for r in range(len(prompts))],
                                     trace_prefix=f"s{step}r{rank}{mode}{nth}", train_step=step))
        finally:
            model.train(was_training)
        seconds = time.perf_counter() - t0
        traces = group_traces(events)
        if len(traces) != len(prompts):
            raise RuntimeError(f"the generator returned {len(traces)} rollouts for {len(prompts)} prompts")
        self.last_traces = traces
        out = rollout_output(traces, pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        self._log(trainer, traces, seconds)
        self._write(trainer, traces)
        return out

    def _log(self, trainer: Any, traces: list[Trace], seconds: float) -> None:
        log = getattr(trainer, "_log_metric", None)
        if log is None:
            return
        m = finish_metrics(rollout_metrics(traces, [None] * len(traces)))  # e3rl train's rollout metrics
        log("e3rl/erasures_per_rollout", sum(tr.done.erasures for tr in traces) / len(traces))
        log("e3rl/erase_rate", m["erase_rate"])
        log("e3rl/tokens_generated", m["tokens_generated"])
        log("e3rl/tokens_erased_fraction", m["tokens_erased"] / max(m["tokens_generated"], 1.0))
        log("e3rl/rollout_seconds", seconds)

    def _write(self, trainer: Any, traces: list[Trace]) -> None:
        n = self.settings.log_rollouts
        if n == 0 or not trainer.args.output_dir:
            return
        rank = trainer.accelerator.process_index
        name = ROLLOUTS_FILE if rank == 0 else ROLLOUTS_FILE.replace(".jsonl", f".rank{rank}.jsonl")
        path = Path(trainer.args.output_dir) / name
        chosen = traces if n < 0 else traces[:n]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write("".join(dumps(e) + "\n" for tr in chosen for e in tr.events))
        except OSError as err:
            raise OSError(err.errno, f"could not append rollouts to {path} ({err.strerror}); free space or set "
                                     f"RolloutSettings(log_rollouts=0)") from None


def rollout_output(traces: Sequence[Trace], pad_id: int) -> dict[str, list[Any]]:
    """TRL's rollout dict from finished traces (one row each, in order).

    ``completion_ids`` are the kept tokens (``done.token_ids``), ``logprobs`` their log-probs as the
    sampler recorded them (-surprisal: the model's untempered log-probability), ``env_mask`` 1 on
    them. A rollout that kept no token gets one ``pad_id`` with ``env_mask`` 0, so TRL (which reads
    each completion's last token) never sees an empty one and the loss never trains on it."""
    out: dict[str, list[Any]] = {k: [] for k in ("prompt_ids", "completion_ids", "logprobs", "env_mask",
                                                 "e3rl_segment_ids", "e3rl_trace")}
    for tr in traces:
        kept = tr.kept_tokens()
        ids = list(tr.done.token_ids)
        if [t.token_id for t in kept] != ids:
            raise RuntimeError(f"trace {tr.trace_id}: the kept token events do not spell the completion")
        segs = kept_segments(tr)
        logps = [-float(t.surprisal) for t in kept]
        mask = [1] * len(ids)
        if not ids:
            ids, logps, mask, segs = [pad_id], [0.0], [0], [-1]
        out["prompt_ids"].append(list(tr.start.prompt_ids))
        out["completion_ids"].append(ids)
        out["logprobs"].append(logps)
        out["env_mask"].append(mask)
        out["e3rl_segment_ids"].append(segs)
        out["e3rl_trace"].append(tr)
    return out


def accuracy_reward(completions: list[Any], answer: list[str | None], **_: Any) -> list[float | None]:
    """A TRL reward function: 1.0 when the completion's final answer (``\\boxed{}`` or the last
    number) equals the dataset's ``answer`` column under math-verify, else 0.0; None (unscored, as
    TRL's own accuracy reward) when the gold answer cannot be parsed. Safe off the main thread: the
    time is bounded without ``signal.alarm``."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [_reward(t, g) for t, g in zip(texts, answer)]


# ---------------------------------------------------------------------- trainer
def segment_matrix(rows: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    """(B, width) long: each row's completion-token segment ids, -1 beyond it (padding, placeholders)."""
    m = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            m[i, : len(r)] = torch.tensor(list(r)[:width], dtype=torch.long)
    return m


def token_advantages(advantages: torch.Tensor, segment_ids: torch.Tensor, weights: torch.Tensor,
                     allocation: str, lam: float) -> torch.Tensor:
    """Rollout advantages (B,) -> token advantages (B, T): the allocator's segment advantages
    (B, N) read at each token's segment; 0 where ``segment_ids`` is -1. Pure; ``e3rl train``'s
    ``Trainer._token_advantages`` without the erased rows."""
    n_segments = (segment_ids.max(1).values + 1).clamp(min=0)
    N = max(int(n_segments.max()) if len(n_segments) else 0, 1)
    w = weights[:, :N] if weights.shape[1] >= N else torch.nn.functional.pad(weights, (0, N - weights.shape[1]))
    seg_adv = ALLOCATORS.get(allocation)(advantages.float().cpu(), w.cpu(), n_segments, lam)  # (B, N)
    return seg_adv.gather(1, segment_ids.clamp(min=0)) * (segment_ids >= 0)


class E3RLGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with E3RL's rollouts and segment-level advantages.

    ``rollout_func`` defaults to ``E3RLRollout.from_pretrained(model)`` for a model path, else
    ``E3RLRollout()``. ``allocation``: ``causal_attention`` (E3RL) or ``uniform`` (every token gets
    its rollout's advantage: TRL's own loss on erasable rollouts); ``allocation_lambda`` and
    ``attention_layers`` as ``e3rl train``'s fields of those names; ``attention_batch_size``: rows per
    no-grad forward that measures the attention weights (only rows with a non-zero advantage)."""

    def __init__(self, model: Any, *args: Any, allocation: str = "causal_attention", allocation_lambda: float = 0.5,
                 attention_layers: int = 4, attention_batch_size: int = 8, rollout_func: Any = None,
                 **kwargs: Any) -> None:
        ALLOCATORS.get(allocation)  # an unknown name fails here, listing the valid ones
        if not 0.0 <= allocation_lambda <= 1.0:
            raise ConfigError(f"allocation_lambda must be in [0, 1], got {allocation_lambda}")
        if attention_batch_size < 1:
            raise ConfigError(f"attention_batch_size must be >= 1, got {attention_batch_size}")
        if rollout_func is None:
            path = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
            rollout_func = E3RLRollout.from_pretrained(path) if path and Path(path).is_dir() else E3RLRollout()
        self.e3rl_allocation, self.e3rl_lambda, self.e3rl_layers = allocation, allocation_lambda, attention_layers
        self.e3rl_attention_batch = attention_batch_size
        super().__init__(model, *args, rollout_func=rollout_func, **kwargs)
        a, G = self.args, self.num_generations
        if (a.per_device_train_batch_size * a.steps_per_generation) % G:
            raise ConfigError(
                f"per_device_train_batch_size x steps_per_generation = {a.per_device_train_batch_size} x "
                f"{a.steps_per_generation} is not a multiple of num_generations={G}: TRL would split a group across "
                f"processes, and the group threshold compares a group's rollouts as they are generated")
        if self.eval_dataset is not None and a.per_device_eval_batch_size % self.num_generations_eval:
            raise ConfigError(f"per_device_eval_batch_size={a.per_device_eval_batch_size} is not a multiple of "
                              f"num_generations_eval={self.num_generations_eval}")
        if _multimodal(self.processing_class):
            raise ConfigError("E3RLGRPOTrainer trains on text prompts; a multimodal processor is not supported")
        if allocation == "causal_attention":  # the hooks know a fixed set of families: refuse others now
            try:
                layer_specs(base_model(self.accelerator.unwrap_model(self.model)), attention_layers)
            except UnsupportedAttentionError as err:
                raise ConfigError(f"{err.args[0].split('; rerun')[0]}; pass allocation=\"uniform\"") from None

    def _segment_weights(self, out: dict[str, Any], seg: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
        """(B, N) attention mass the answer segment puts on each segment (ones for ``uniform``), from
        no-grad forwards with ``answer_attention``'s hooks over prompt + completion: in eval mode
        (the hooks recompute attention without dropout), without gradient checkpointing, only the
        last position's logits, and only for rows whose advantage is not 0 (any weights give those
        rows 0)."""
        B = seg.shape[0]
        N = max(int(seg.max()) + 1, 1) if seg.numel() else 1
        weights = torch.ones(B, N)
        rows = (advantages.detach().cpu() != 0).nonzero().squeeze(1).tolist()
        if self.e3rl_allocation != "causal_attention" or not rows:
            return weights
        wrapped = self.accelerator.unwrap_model(self.model)
        model = base_model(wrapped)
        P = out["prompt_ids"].shape[1]
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        full = torch.cat([torch.full((B, P), -1, dtype=torch.long), seg], 1)
        n_seg = (seg.max(1).values + 1).clamp(min=0)
        extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), disable_gradient_checkpointing(wrapped, self.args.gradient_checkpointing_kwargs), \
                    self.accelerator.autocast():
                for i in range(0, len(rows), self.e3rl_attention_batch):
                    sl = torch.tensor(rows[i : i + self.e3rl_attention_batch])
                    with answer_attention(model, self.e3rl_layers, full[sl], n_seg[sl], mask[sl].cpu()) as att:
                        model(input_ids=ids[sl.to(ids.device)], attention_mask=mask[sl.to(mask.device)], use_cache=False,
                              **extra)
                    w = att.weights().float().cpu()
                    weights[sl] = torch.nn.functional.pad(w, (0, N - w.shape[1])) if w.shape[1] < N else w[:, :N]
        except UnsupportedAttentionError as err:
            raise ConfigError(f"{err.args[0].split('; rerun')[0]}; pass allocation=\"uniform\"") from None
        finally:
            model.train(was_training)
        return weights

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        out = super()._generate_and_score_completions(inputs)
        if any("e3rl_segment_ids" not in x for x in inputs):
            raise ConfigError("E3RLGRPOTrainer needs rollouts that carry e3rl_segment_ids: leave rollout_func unset "
                              "or pass an E3RLRollout")
        seg = segment_matrix([x["e3rl_segment_ids"] for x in inputs], out["completion_ids"].shape[1])
        adv = out["advantages"]
        weights = self._segment_weights(out, seg, adv)
        out["advantages"] = token_advantages(adv, seg, weights, self.e3rl_allocation, self.e3rl_lambda).to(adv.device)
        return out


__all__ = ["E3RLGRPOTrainer", "E3RLRollout", "RolloutSettings", "TESTED_TRL", "accuracy_reward",
           "check_trl_version", "rollout_output", "same_tokenizer", "segment_matrix", "token_advantages"]
