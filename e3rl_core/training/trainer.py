"""The E3RL trainer: GRPO-family RL on erasable rollouts (method section 6).

One step:
1. draw ``prompts_per_step`` prompts (this process's share of them) and generate ``num_generations``
   rollouts each with the erasable generator, batched; erasure is on for ``e3rl``, off for the
   baselines. The event stream is the step's record (a sample goes to rollouts.jsonl).
2. reward each rollout with math-verify (``rewards.reward``; None abstains); DAPO's dynamic sampling
   drops groups without reward variance and draws more prompts.
3. advantages: group-relative per rollout (computed over the whole global batch, so every process
   agrees), then spread over segments (``causal_attention`` for e3rl: attention mass the answer
   segment puts on each segment, itself included, from one no-grad forward: hooks recompute only
   the answer segment's attention rows, or with ``attention_impl=eager`` the full eager maps).
4. old-policy log-probs on the final (post-erasure) sequences (with one pass, the detached
   log-probs of the training forward, as TRL); erased tokens are not in them. Clipped surrogate with clip-higher, optional k3 KL, aggregated by ``loss_type`` with
   global normalisers; gradients summed across processes; clip; AdamW; scheduler.
With ``parallel=fsdp`` the policy is sharded (``fsdp``): rollouts come from a full copy gathered at
the start of the step, every process runs the same number of (micro-batch) forwards, and the
gradient is summed by FSDP's reduce-scatter instead of one all-reduce.
Departures from the paper and from TRL: dropout stays off (the model is in eval mode throughout,
so the first-pass ratio is exactly 1); group std is the population std (see ``advantages``).
"""
from __future__ import annotations

import gc
import math
import os
import random
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import ConfigError, E3RLError, NonFiniteLogitsError, TraceFormatError
from ..events import Trace, dumps, event_from_dict, group_traces, strict_dumps
from ..generation.config import GenerationConfig
from ..generation.generator import ErasableGenerator
from ..models import RECOMMENDED_CONFIG, load_model
from ..outdirs import resolve_out
from ..tasks.datasets import DataError, Example, load_examples, render_prompt
from ..tasks.rewards import extract_answer, prompt_opens_think, reward
from . import checkpoint as ckpt
from . import distributed, fsdp, held_out
from .advantages import ADVANTAGES, ALLOCATORS, attention_weights
from .answer_attention import answer_attention, attention_modules
from .config import TrainConfig
from .losses import LOSSES, LossNorm, clipped_surrogate, token_logps
from .rollout import (RolloutBatch, build_batch, finish_metrics, group_has_signal, healed_columns, rollout_metrics,
                      zero_variance_counts)


class TrainingDivergedError(E3RLError):
    """Loss, gradients or logits became NaN/inf; the weights of the last checkpoint are kept."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    status: str
    """finished | stopped | already_finished"""
    checkpoint: Path | None
    last_metrics: dict[str, Any] = field(default_factory=dict)


StepCallback = Callable[[dict[str, Any]], None]


class Trainer:
    """``Trainer(config, model=..., data=..., out=...).train()``; see ``e3rl train --help``."""

    def __init__(
        self, config: TrainConfig, *, model: str, data: str, out: str | Path, resume: bool = False,
        overwrite: bool = False, device: str | None = None, dtype: str = "float32", trust_remote_code: bool = False,
        callbacks: Sequence[StepCallback] = (), should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.cfg, self.model_spec, self.data_spec = config, model, data
        self.trust_remote_code = trust_remote_code  # run a model's own code (auto_map): e3rl train --trust-remote-code
        self.out, self.callbacks = resolve_out(out), list(callbacks)
        self.should_stop = should_stop or (lambda: False)
        self.dist = distributed.init(device)
        self._check_config()
        self.examples: list[Example] = load_examples(data)  # bad data fails before anything is written
        if not self.examples:
            raise DataError(f"--data {data} yields no prompts; check the file or loosen its filters")
        self.eval_examples = held_out.load_eval_examples(config.eval_data) if config.eval_data else None
        created = not self.out.exists()
        self.resume_from: Path | None = self._prepare_out_dir(resume, overwrite)
        self._load_models(device, dtype, created)
        self.gen_config = config.effective_generation()
        self.allocation = config.effective_allocation
        # Causal allocation with one pass takes its attention weights from the training forward
        # (see _optimize); tests turn this off to compare with the separate no-grad forward.
        self.fuse_attention = True
        self._check_attention_layout(created)
        self.rollout_copy: fsdp.RolloutCopy | None = None
        if config.parallel == "fsdp":
            self._shard()
        self._reward_memo: dict[tuple[str, str | None], float | None] = {}
        self._plain: ErasableGenerator | None = None  # reading R3's first pass (``_plain_generator``)
        self._healed: list[Trace] = []  # this step's groups generated again with erasure (reading R3)
        # A template that opens the think block in the prompt (DeepSeek-R1 distills) starts every
        # completion inside the reasoning: its answer comes only after the closing tag.
        self._opened = prompt_opens_think(render_prompt(self.examples[0].question, self.tokenizer))
        try:  # a model erasure is not exact on is refused here, before any rollout
            self.generator = ErasableGenerator(
                self.rollout_model, self.tokenizer, self.gen_config, model_name=model, checker=self._correct,
                answer_fn=partial(extract_answer, opened=self._opened),
            )
        except E3RLError:
            self._discard_out_dir(created)
            raise
        self.examples, self.prompts_filtered = self._fitting_examples(created)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.weight_decay,
        )
        self.step, self.position, self.tokens_total = 0, 0, 0  # before the scheduler, which reads them
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        random.seed(config.seed)
        torch.manual_seed(config.seed)
        if self.resume_from:
            self._load_state(ckpt.load_state(self.resume_from))

    @property
    def sharded(self) -> bool:
        return self.rollout_copy is not None

    @property
    def rollout_model(self) -> Any:
        """The model rollouts are generated with: the policy itself, or its gathered copy under FSDP."""
        return self.rollout_copy.model if self.rollout_copy is not None else self.model

    def _shard(self) -> None:
        """Shard the policy (and the reference model) with FSDP2, keeping a full copy for rollouts."""
        c = self.cfg
        fsdp.ensure_group(self.device)
        bf16 = c.fsdp_mixed_precision == "bf16"
        self.rollout_copy = fsdp.RolloutCopy(self.model, torch.bfloat16 if bf16 else None)
        for model in (self.model, self.ref_model):
            if model is not None:
                fsdp.shard(model, device=self.device, mixed_precision=c.fsdp_mixed_precision,
                           cpu_offload=c.fsdp_cpu_offload)

    def _micro_count(self, mine: int) -> int:
        """Micro-batches every process runs: its own, or under FSDP the most any process has (the
        others pad with dummy forwards, since each forward all-gathers)."""
        return max(distributed.all_gather_object(mine)) if self.sharded else mine

    def _fitting_examples(self, created: bool) -> tuple[list[Example], int]:
        """The examples whose rendered prompt fits the model's context, and how many were left out:
        one overlong prompt must not abort a run (verl's ``filter_overlong_prompts``). The rule is the
        generator's own (``encode``: prompt tokens < context), measured once, before any step."""
        context = self.generator.context
        if context is None:
            return self.examples, 0
        prompts = [render_prompt(ex.question, self.tokenizer) for ex in self.examples]
        lengths = [len(self.generator.text_ids(p)) for p in prompts]  # as encode counts them (one BOS)
        kept = [ex for ex, n in zip(self.examples, lengths) if self.generator.fits(n)]
        if not kept:
            self._discard_out_dir(created)
            raise DataError(
                f"every prompt of --data {self.data_spec} ({len(lengths)}, the shortest {min(lengths)} tokens) is "
                f"longer than the model's context ({context} tokens); use shorter prompts or a longer-context model")
        return kept, len(self.examples) - len(kept)

    def _check_attention_layout(self, created: bool) -> None:
        """Before any rollout: a model erasure is not exact on is refused in one line
        (``families.inspect_model``, ``selfcheck``), and causal allocation's linear path refuses a
        model it cannot reproduce, naming the eager fallback (``--set attention_impl=eager``)."""
        try:
            # the family checks and, for a family no test covers, the one-time exactness check
            ErasableGenerator(self.model, self.tokenizer, self.gen_config)
            if self.allocation == "causal_attention" and self.cfg.attention_impl == "linear":
                attention_modules(self.model, self.cfg.attention_layers)
        except E3RLError:
            self._discard_out_dir(created)
            raise

    def _discard_out_dir(self, created: bool) -> None:
        """Leave no empty run directory behind a run that could not start."""
        if created and self.dist.main and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()

    def _check_config(self) -> None:
        config = self.cfg
        if config.group_relative and config.num_generations < 2:
            raise ConfigError(
                f"--group-size {config.num_generations}: group-relative advantages ({config.advantage_estimator}) "
                f"need at least 2 rollouts per prompt; use --group-size 2 or more"
            )
        if config.eval_data and self.dist.world > 1:
            raise ConfigError(f"eval_data evaluates on one process and this run has {self.dist.world}; leave it "
                              f"out and score a checkpoint with e3rl eval --model OUT/checkpoint-N --data SPEC")
        if config.prompts_per_step % self.dist.world:
            raise ConfigError(
                f"--prompts-per-step {config.prompts_per_step} does not divide across {self.dist.world} processes; "
                f"use a multiple of {self.dist.world}"
            )

    def _prepare_out_dir(self, resume: bool, overwrite: bool) -> Path | None:
        """The checkpoint to resume from, if any. Rank 0 checks/creates the directory; the others
        learn the outcome (an error stops all)."""
        outcome: Any = None
        if self.dist.main:
            try:
                outcome = ("ok", ckpt.prepare_out_dir(self.out, resume=resume, overwrite=overwrite))
            except E3RLError as err:
                outcome = ("error", str(err))
        outcome = distributed.all_gather_object(outcome)[0]
        if outcome[0] == "error":
            raise ckpt.RunDirError(outcome[1])
        return outcome[1]

    def _load_models(self, device: str | None, dtype: str, created: bool) -> None:
        """The policy (from the checkpoint when resuming) and, with a KL term, the frozen reference."""
        source = str(self.resume_from) if self.resume_from else self.model_spec
        try:
            self.model, self.tokenizer = load_model(source, device=device, dtype=dtype,
                                                    trust_remote_code=self.trust_remote_code)
        except E3RLError:
            self._discard_out_dir(created)  # a bad --model
            raise
        self.device = next(self.model.parameters()).device
        self.ref_model = None
        if self.cfg.beta > 0:  # the frozen initial policy, also when resuming
            self.ref_model, _ = load_model(self.model_spec, device=device, dtype=dtype,
                                           trust_remote_code=self.trust_remote_code)
            self.ref_model.requires_grad_(False)

    # ------------------------------------------------------------------ state
    def _lr_factor(self, step: int) -> float:
        """The learning rate's factor for the step after ``step``: warm-up, then decay over the run,
        whose end is max_steps or the rollout-token budget, whichever comes first (a budget-bound run
        with a large max_steps would otherwise hardly decay)."""
        c = self.cfg
        if c.warmup_steps and step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        progress = min(1.0, (step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps))
        if c.rollout_token_budget:
            progress = max(progress, min(1.0, self.tokens_total / c.rollout_token_budget))
        if c.lr_scheduler_type == "linear":
            return 1.0 - progress
        if c.lr_scheduler_type == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    def _state(self, rng_per_rank: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The trainer state of a checkpoint; a sharded run's optimizer is in ``sharded/`` and its
        state records every process's RNG and the world size its shards need."""
        state = {
            "step": self.step, "data_position": self.position, "tokens_total": self.tokens_total,
            "scheduler": self.scheduler.state_dict(), "rng": _rng_state(),
            "config": self.cfg.to_dict(), "model": self.model_spec, "data": self.data_spec,
            "parallel": self.cfg.parallel, "world_size": self.dist.world,
        }
        if rng_per_rank is None:
            state["optimizer"] = self.optimizer.state_dict()
        else:
            state["rng_per_rank"] = rng_per_rank
        return state

    def _load_state(self, state: dict[str, Any]) -> None:
        self.step, self.position = int(state["step"]), int(state["data_position"])
        self.tokens_total = int(state["tokens_total"])
        rng = state["rng"]
        if self.sharded:
            self._load_sharded_state(state)
            rng = state["rng_per_rank"][self.dist.rank]
        elif "optimizer" not in state:
            raise ckpt.RunDirError(f"{self.resume_from} holds a sharded (parallel=fsdp) run's state; resume it with "
                                   f"--set parallel=fsdp, as it was started")
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scheduler.lr_lambdas = [self._lr_factor]  # the schedule follows this run's max_steps and budget
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])

    def _load_sharded_state(self, state: dict[str, Any]) -> None:
        """Model and optimizer shards from ``sharded/``: only with the world size that wrote them,
        since each process's data share and RNG belong to its rank."""
        path = self.resume_from
        assert path is not None
        written = state.get("world_size")
        if state.get("parallel") != "fsdp" or not fsdp.has_sharded_state(path):
            raise ckpt.RunDirError(f"{path} holds no sharded state (it comes from a parallel=ddp run); resume it "
                                   f"without --set parallel=fsdp, or start a new run with --model {path}")
        if written != self.dist.world:
            raise ckpt.RunDirError(
                f"{path} was written by {written} FSDP processes and this run has {self.dist.world}: a sharded "
                f"checkpoint resumes with the same number (torchrun --nproc_per_node {written}). To go on with "
                f"another number, start a new run from its consolidated weights with --model {path} (the "
                f"optimizer state and data position start afresh)")
        fsdp.load_sharded(path, self.model, self.optimizer)

    def finished(self) -> bool:
        budget = self.cfg.rollout_token_budget
        return self.step >= self.cfg.max_steps or (budget is not None and self.tokens_total >= budget)

    def _write_run(self, status: str, message: str = "", last: Path | None = None) -> None:
        if not self.dist.main:
            return
        with ckpt.writing(ckpt.RUN_FILE, self.out):
            ckpt.write_json_atomic(self.out / ckpt.RUN_FILE, {
                "status": status, "message": message, "algo": self.cfg.algo, "model": self.model_spec,
                "data": self.data_spec, "step": self.step, "max_steps": self.cfg.max_steps,
                "tokens_total": self.tokens_total, "world_size": self.dist.world,
                "last_checkpoint": last.name if last else None, "updated": time.time(),
                "prompts_filtered": self.prompts_filtered, "config": self.cfg.to_dict(),
                **ckpt.process_record(),  # a status reader tells "running" from "killed" by it
            })

    def _save(self) -> Path | None:
        """Write a checkpoint and point run.json at it."""
        if self.sharded:
            return self._save_sharded()
        path = None
        with distributed.together("saving a checkpoint"):  # only rank 0 writes; all learn if it failed
            if self.dist.main:
                state = self._state()
                extra = self._extra_json(state)
                with ckpt.writing(f"checkpoint-{self.step:06d}", self.out):
                    path = ckpt.save_checkpoint(self.out, self.step, self.model, self.tokenizer, state, extra,
                                                keep=self.cfg.save_total_limit)
                self._write_run("running", last=path)
        return path

    def _extra_json(self, state: dict[str, Any]) -> dict[str, Any]:
        return {RECOMMENDED_CONFIG: self.gen_config.to_dict(),
                "trainer_state.json": {k: v for k, v in state.items()
                                       if k not in ("optimizer", "scheduler", "rng", "rng_per_rank")}}

    def _save_sharded(self) -> Path | None:
        """Every process writes its shards into rank 0's temporary directory; rank 0 adds the
        consolidated export (``save_pretrained`` of the gathered weights), the tokenizer and the
        trainer state (every process's RNG), then renames it, as an unsharded checkpoint is.
        The collectives come first: each raises on every process if it fails on one."""
        tmp: Path | None = None
        with distributed.together("preparing a checkpoint"):
            if self.dist.main:
                with ckpt.writing(f"checkpoint-{self.step:06d}", self.out):
                    tmp = ckpt.start_checkpoint(self.out, self.step)
        tmp = Path(distributed.all_gather_object(str(tmp))[0])
        fsdp.save_sharded(tmp, self.model, self.optimizer)
        full = fsdp.full_state_dict(self.model, self.rollout_model)  # process 0 only; host memory
        rngs = distributed.all_gather_object(_rng_state())
        path = None
        with distributed.together("saving a checkpoint"):
            if self.dist.main:
                state = self._state(rng_per_rank=rngs)
                with ckpt.writing(f"checkpoint-{self.step:06d}", self.out):
                    path = ckpt.finish_checkpoint(self.out, self.step, tmp, self.rollout_model, self.tokenizer, state,
                                                  self._extra_json(state), keep=self.cfg.save_total_limit,
                                                  state_dict=full)
                self._write_run("running", last=path)
        return path

    # ------------------------------------------------------------------ data
    def _next_prompts(self, n: int) -> list[tuple[int, Example]]:
        """The next ``n`` (global position, example) pairs of the seeded, per-epoch shuffled stream."""
        out = []
        for _ in range(n):
            epoch, i = divmod(self.position, len(self.examples))
            order = list(range(len(self.examples)))
            random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(order)
            out.append((self.position, self.examples[order[i]]))
            self.position += 1
        return out

    def _correct(self, text: str, gold: str | None) -> bool:
        return self._reward(text, gold) == 1.0

    def _reward(self, text: str, gold: str | None) -> float | None:
        key = (text, gold)
        if key not in self._reward_memo:
            self._reward_memo[key] = reward(text, gold, timeout=self.cfg.reward_timeout, opened=self._opened)
        return self._reward_memo[key]

    def _rollouts(self) -> tuple[list[Trace], list[Trace], int]:
        """(all traces generated on this process, the kept ones, global groups kept)."""
        c, G, world, rank = self.cfg, self.cfg.num_generations, self.dist.world, self.dist.rank
        share = c.prompts_per_step // world
        generated: list[Trace] = []
        kept: list[list[Trace]] = []
        rounds = 0
        while True:
            batch = self._next_prompts(c.prompts_per_step)[rank * share : (rank + 1) * share]
            seeds = [c.seed * 1_000_000_007 + pos * G + k for pos, _ in batch for k in range(G)]
            prompts = [render_prompt(ex.question, self.tokenizer) for _, ex in batch]
            first = self.generator if c.erasure_when == "always" else self._plain_generator()
            traces = self._generate(first, prompts, seeds, [ex.answer for _, ex in batch], f"d{rounds}")
            generated += traces
            groups = [traces[g * G : (g + 1) * G] for g in range(len(batch))]
            if c.erasure_when == "no_signal":  # R3: heal only the groups with no correct rollout
                healed = self._heal(groups, batch, prompts, seeds, rounds)
                generated += healed
            rounds += 1
            if not c.dynamic_sampling:
                kept += groups
                break
            kept += [g for g in groups if group_has_signal([self._reward(t.done.text, t.start.gold) for t in g])]
            total = sum(distributed.all_gather_object(len(kept)))
            if total >= c.prompts_per_step or rounds >= c.dynamic_sampling_max_rounds:
                break
        counts = distributed.all_gather_object(len(kept))
        if c.dynamic_sampling:  # keep the first prompts_per_step groups in rank order
            quota = [max(0, min(n, c.prompts_per_step - sum(counts[:r]))) for r, n in enumerate(counts)]
            kept, counts = kept[: quota[rank]], quota
        return generated, [t for g in kept for t in g], sum(counts)

    def _generate(self, generator: ErasableGenerator, prompts: list[Any], seeds: list[int], golds: list[Any],
                  tag: str) -> list[Trace]:
        """One group of ``num_generations`` rollouts per prompt, on every process together (a
        process whose logits turn non-finite stops them all); trace ids carry step, rank and ``tag``."""
        with distributed.together("generating rollouts"):  # e.g. non-finite logits on one rank
            try:
                events = list(generator.stream(
                    prompts, group_size=self.cfg.num_generations, seed=seeds, golds=golds,
                    trace_prefix=f"s{self.step + 1}r{self.dist.rank}{tag}", train_step=self.step + 1,
                ))
            except NonFiniteLogitsError as err:
                raise TrainingDivergedError(f"step {self.step + 1}: {err}", self.step + 1) from None
        return group_traces(events)

    def _plain_generator(self) -> ErasableGenerator:
        """The rollout generator with erasure off (reading R3 samples every group plainly first)."""
        if self._plain is None:
            gen = GenerationConfig.from_dict(self.gen_config.to_dict())
            gen.erase.enabled = False
            self._plain = ErasableGenerator(
                self.rollout_model, self.tokenizer, gen, model_name=self.generator.model_name, checker=self._correct,
                answer_fn=partial(extract_answer, opened=self._opened))
        return self._plain

    def _heal(self, groups: list[list[Trace]], batch: list[tuple[int, Example]], prompts: list[Any],
              seeds: list[int], rounds: int) -> list[Trace]:
        """Reading R3: generate again, with erasure and the same seeds, each group of ``groups`` that
        has no correct rollout, and put the healed group in its place. Returns the new traces."""
        G = self.cfg.num_generations
        redo = [g for g, grp in enumerate(groups)
                if not any((self._reward(t.done.text, t.start.gold) or 0) > 0 for t in grp)]
        if not redo:
            return []
        traces = self._generate(self.generator, [prompts[g] for g in redo],
                                [seeds[g * G + k] for g in redo for k in range(G)],
                                [batch[g][1].answer for g in redo], f"d{rounds}h")
        self._healed += traces
        for j, g in enumerate(redo):
            groups[g] = traces[j * G : (j + 1) * G]
        return traces

    # ------------------------------------------------------------------ loss
    def _forward(self, model: Any, b: RolloutBatch, attentions: bool = False) -> Any:
        return model(input_ids=b.input_ids.to(self.device), attention_mask=b.attention_mask.to(self.device),
                     use_cache=False, output_attentions=attentions)

    def _micro(self, n: int) -> list[slice]:
        size = self.cfg.micro_batch_size or max(n, 1)
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    def _forward_with_weights(self, mb: RolloutBatch, need_attn: bool, eager: bool) -> tuple[Any, torch.Tensor | None]:
        """The policy forward of a micro-batch and, for causal allocation, its segment weights (R, N):
        from the eager attention maps (O(T^2), the reference) or from hooks that recompute only the
        answer segment's attention rows on the ordinary forward (O(answer x T))."""
        layers = self.cfg.attention_layers
        if not need_attn:
            return self._forward(self.model, mb), None
        if eager:  # only the layers used leave the device
            out = self._forward(self.model, mb, attentions=True)
            used = out.attentions[-layers:] if layers > 0 else out.attentions
            return out, attention_weights([a.cpu() for a in used], mb.segment_ids, mb.n_segments, 0)
        with answer_attention(self.model, layers, mb.segment_ids, mb.n_segments, mb.attention_mask) as att:
            out = self._forward(self.model, mb)
        return out, att.weights()

    @torch.no_grad()
    def _old_logps_and_weights(self, b: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Old-policy log-probs (R, T), reference log-probs or None, segment weights (R, N)."""
        T = self.gen_config.sampling.temperature
        need_attn = self.allocation == "causal_attention"
        eager = need_attn and self.cfg.attention_impl == "eager"
        impl = getattr(self.model.config, "_attn_implementation", None)
        if eager and impl != "eager":  # output_attentions needs the eager kernel
            self.model.set_attn_implementation("eager")
        n_max = max(int(b.n_segments.max()), 1) if len(b) else 1
        old, ref, weights = [], [], []
        slices = self._micro(len(b))
        try:
            for i in range(self._micro_count(len(slices))):
                if i >= len(slices):  # FSDP: join the other processes' all-gathers
                    for model in (self.model, self.ref_model):
                        if model is not None:
                            fsdp.dummy_forward(model, self.generator.pad_id, self.device, backward=False)
                    continue
                mb = b.rows(slices[i])
                out, w = self._forward_with_weights(mb, need_attn, eager)
                old.append(token_logps(out.logits, mb.input_ids.to(self.device), T).cpu())
                if w is not None:
                    weights.append(torch.nn.functional.pad(w, (0, n_max - w.shape[1])))
                if self.ref_model is not None:
                    ref.append(token_logps(self._forward(self.ref_model, mb).logits, mb.input_ids.to(self.device), T).cpu())
        finally:
            if eager and impl != "eager":
                self.model.set_attn_implementation(impl)
        w_all = torch.cat(weights) if weights else torch.ones(len(b), n_max)
        if not old:  # no rows on this process (FSDP still ran the forwards above)
            return b.completion_mask.clone(), (b.completion_mask.clone() if self.ref_model is not None else None), w_all
        return torch.cat(old), (torch.cat(ref) if ref else None), w_all

    def _rollout_advantages(self, b: RolloutBatch) -> torch.Tensor:
        """Rollout advantages (R,) of this process's rows, estimated over the global batch."""
        gathered = distributed.all_gather_object((b.rewards.tolist(), b.group_ids.tolist()))
        rewards, groups, offset, mine = [], [], 0, 0
        for r, (rw, gi) in enumerate(gathered):
            if r == self.dist.rank:
                mine = len(rewards)
            rewards += rw
            groups += [g + offset for g in gi]
            offset += (max(gi) + 1) if gi else 0
        adv_all = ADVANTAGES.get(self.cfg.advantage_estimator)(
            torch.tensor(rewards, dtype=torch.float32), torch.tensor(groups, dtype=torch.long), self.cfg.scale_rewards)
        return adv_all[mine : mine + len(b)]

    def _token_advantages(self, adv: torch.Tensor, mb: RolloutBatch, sl: slice, weights: torch.Tensor) -> torch.Tensor:
        """Token advantages (r, T) of the rows ``sl`` (``mb`` = those rows): each rollout's advantage
        spread over its segments by ``weights`` (r, N); an erased attempt's row gets -delta * |A| of
        the rollout it was erased from (``adv`` holds every row, as ``parent`` indexes them; reading
        R1) and -c, its replacement segment +c (``contrast_advantage``; reading R2)."""
        seg_adv = ALLOCATORS.get(self.allocation)(adv[sl], weights, mb.n_segments, self.cfg.allocation_lambda)  # (r, N)
        c = self.cfg.contrast_advantage
        if c > 0:  # R2: a segment that replaced an erased attempt is the better half of its pair
            seg_adv = seg_adv + c * healed_columns(mb.healed, seg_adv.shape[1]).to(seg_adv)
        tok = seg_adv.gather(1, mb.segment_ids.clamp(min=0)) * (mb.segment_ids >= 0)  # (r, T)
        erased = (mb.parent >= 0).nonzero().squeeze(1)
        if erased.numel():
            penalty = -self.cfg.erased_advantage_delta * adv[mb.parent[erased]].abs() - c
            tok[erased] = penalty[:, None].to(tok) * (mb.segment_ids[erased] >= 0)
        return tok

    def _advantages(self, b: RolloutBatch, weights: torch.Tensor) -> torch.Tensor:
        """Token advantages (R, T): rollout advantages over the global batch, spread over segments."""
        return self._token_advantages(self._rollout_advantages(b), b, slice(0, len(b)), weights)

    def _optimize(self, b: RolloutBatch) -> dict[str, float]:
        c = self.cfg
        T = self.gen_config.sampling.temperature
        # With one pass and no attention to read, the old policy is the current one: skip a forward
        # and take the detached log-probs of the training forward (as TRL does).
        reuse = c.num_iterations == 1 and self.allocation != "causal_attention" and self.ref_model is None
        # One pass, no reference model, linear causal allocation: the attention weights come from
        # hooks on the training forward itself, so the step needs no extra forward.
        fused = (self.fuse_attention and c.num_iterations == 1 and self.ref_model is None
                 and self.allocation == "causal_attention" and c.attention_impl == "linear")
        # Without rows a DDP process skips the forward; an FSDP one must join the others' forwards.
        if reuse or fused or (not len(b) and not self.sharded):
            old, ref, weights = None, None, torch.ones(len(b), max(int(b.n_segments.max()), 1) if len(b) else 1)
        else:
            old, ref, weights = self._old_logps_and_weights(b)
            if c.num_iterations == 1:
                old = None  # the same policy: exact ratio 1 (the eager forward may differ in the last bits)
        rollout_adv = self._rollout_advantages(b)  # every process joins the gather, even with no rollouts
        adv = None if fused else self._token_advantages(rollout_adv, b, slice(0, len(b)), weights)
        g = distributed.sum_floats({"seq": float(len(b)), "tok": float(b.completion_mask.sum()) if len(b) else 0.0})
        norm = LossNorm(int(g["seq"]), int(g["tok"]), self.gen_config.max_new_tokens)
        aggregate = LOSSES.get(c.loss_type)
        eps_high = c.epsilon if c.epsilon_high is None else c.epsilon_high
        sums: dict[str, float] = {}
        for _ in range(c.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            sums = {"loss": 0.0, "kl": 0.0, "low": 0.0, "high": 0.0, "adv_abs": 0.0}
            slices = self._micro(len(b))
            for i in range(self._micro_count(len(slices))):
                if i >= len(slices):  # FSDP: join the other processes' all-gathers and reduce-scatters
                    fsdp.dummy_forward(self.model, self.generator.pad_id, self.device, backward=True)
                    continue
                sl = slices[i]
                mb = b.rows(sl)
                mask = mb.completion_mask.to(self.device)
                if fused:
                    with answer_attention(self.model, c.attention_layers, mb.segment_ids, mb.n_segments,
                                          mb.attention_mask) as att:
                        logits = self._forward(self.model, mb).logits
                    mb_adv = self._token_advantages(rollout_adv, mb, sl, att.weights())
                else:
                    logits = self._forward(self.model, mb).logits
                    mb_adv = adv[sl]
                logp = token_logps(logits, mb.input_ids.to(self.device), T)
                per_tok, st = clipped_surrogate(
                    logp, logp.detach() if old is None else old[sl].to(self.device), mb_adv.to(self.device), epsilon_low=c.epsilon,
                    epsilon_high=eps_high, ref_logp=None if ref is None else ref[sl].to(self.device), beta=c.beta)
                loss = aggregate(per_tok, mask, norm)
                loss.backward()
                sums["loss"] += float(loss.detach())
                sums["kl"] += float((st.kl * mask).sum())
                sums["low"] += float((st.low_clipped * mask).sum())
                sums["high"] += float((st.high_clipped * mask).sum())
                sums["adv_abs"] += float((mb_adv.abs() * mb.completion_mask).sum())
            max_norm = c.max_grad_norm if c.max_grad_norm > 0 else float("inf")
            if self.sharded:  # FSDP's reduce-scatter summed the gradient shards during backward
                grad_norm = fsdp.clip_grad_norm(list(self.model.parameters()), max_norm)
            else:
                distributed.sum_gradients(self.model)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
            sums = distributed.sum_floats(sums)
            if not (math.isfinite(sums["loss"]) and math.isfinite(grad_norm)):
                self.optimizer.zero_grad(set_to_none=True)
                raise TrainingDivergedError(
                    f"step {self.step + 1}: the loss or gradient is not finite (loss {sums['loss']}, grad norm "
                    f"{grad_norm}); lower --set learning_rate=... or raise max_grad_norm's strictness", self.step + 1)
            self.optimizer.step()
        self.scheduler.step()
        tok = max(norm.tokens, 1)
        # what each process holds (the largest over processes), counted from the tensors
        held = distributed.all_gather_object(fsdp.local_bytes(self.model, self.optimizer))
        memory = {f"rank_{k}_bytes": max(h[k] for h in held) for k in ("parameters", "gradients", "optimizer")}
        return {**memory, "loss": sums["loss"], "kl": sums["kl"] / tok, "clip_ratio_low": sums["low"] / tok,
                "clip_ratio_high": sums["high"] / tok, "clip_ratio": (sums["low"] + sums["high"]) / tok,
                "advantage_abs_mean": sums["adv_abs"] / tok, "grad_norm": grad_norm,
                "lr": self.scheduler.get_last_lr()[0]}

    # ------------------------------------------------------------------ loop
    def train_step(self) -> dict[str, Any]:
        """One RL step; returns its metrics row."""
        t0 = time.perf_counter()
        sync: dict[str, float] = {}
        if self.rollout_copy is not None:  # rollouts from the current weights (after the last update)
            self.rollout_copy.refresh(self.model)
            sync["weight_sync_time"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        self._healed = []
        generated, kept, groups_kept = self._rollouts()
        t_gen = time.perf_counter() - t1
        rewards = [self._reward(t.done.text, t.start.gold) for t in kept]
        batch = build_batch(kept, rewards, self.generator.pad_id, mask_truncated=self.cfg.mask_truncated_completions,
                            erased_rows=self.cfg.trains_erased)
        sums = distributed.sum_floats(rollout_metrics(generated, [self._reward(t.done.text, t.start.gold) for t in generated]))
        roll = finish_metrics(sums)
        zv = distributed.sum_floats(zero_variance_counts(kept, rewards))  # groups the loss gets no gradient from
        roll["zero_variance_groups"] = zv["zero_variance"] / max(zv["groups"], 1.0)
        self.tokens_total += int(roll["tokens_generated"])  # before the update: the schedule reads it
        opt = self._optimize(batch)
        self.step += 1
        if self.cfg.erasure_when == "no_signal":
            healed = len(self._healed) / self.cfg.num_generations
            roll["groups_healed"] = float(distributed.sum_floats({"n": healed})["n"])
        row = {"step": self.step, **roll, "groups_kept": groups_kept, **opt,
               "rollout_tokens_total": self.tokens_total, "generation_time": t_gen, **sync,
               "step_time": time.perf_counter() - t0}
        with distributed.together("writing the step's logs"):
            if self.dist.main:
                with ckpt.writing(ckpt.LOG_FILE, self.out), open(self.out / ckpt.LOG_FILE, "a", encoding="utf-8") as f:
                    f.write(strict_dumps(row) + "\n")
                if self.cfg.log_rollouts:
                    with ckpt.writing(ckpt.ROLLOUTS_FILE, self.out), \
                            open(self.out / ckpt.ROLLOUTS_FILE, "a", encoding="utf-8") as f:
                        for tr in self._logged(generated):
                            f.write("".join(dumps(e) + "\n" for e in tr.events))
        self._reward_memo.clear()
        return row

    def _logged(self, generated: list[Trace]) -> list[Trace]:
        """The step's rollouts that go to rollouts.jsonl: the first ``log_rollouts`` generated and,
        under reading R3, as many of the healed ones (the plain first pass erases nothing, so without
        them the decision audit of an R3 run would see none of its erasures)."""
        first = generated[: self.cfg.log_rollouts]
        return first + [t for t in self._healed[: self.cfg.log_rollouts] if all(t is not f for f in first)]

    def train(self) -> TrainResult:
        """Run to ``max_steps`` (or the rollout-token budget), checkpointing; resumes if asked."""
        last = ckpt.checkpoints(self.out)[-1][1] if self.resume_from else None
        if self.resume_from and self.finished():
            return TrainResult(self.out, self.step, "already_finished", last)
        with distributed.together("preparing the run directory"):
            if self.dist.main:
                with ckpt.writing("the resumed logs", self.out):
                    ckpt.clean_temporaries(self.out)
                    step = self.step  # drop what a killed run logged after its last checkpoint
                    ckpt.truncate_jsonl(self.out / ckpt.LOG_FILE, lambda r: r.get("step", 0) <= step)
                    ckpt.truncate_jsonl(self.out / ckpt.ROLLOUTS_FILE, _rollouts_up_to(step))
            self._write_run("running", last=last)
        row: dict[str, Any] = {}
        status = "finished"
        try:
            if self.eval_examples and self.step == 0 and "before" not in held_out.read(self.out):
                held_out.run(self, "before", self.eval_examples)
                # A stop asked for during that evaluation ends the run before its first step.
                if any(distributed.all_gather_object(bool(self.should_stop()))):
                    status = "stopped"
            while status != "stopped" and not self.finished():
                row = self.train_step()
                for cb in self.callbacks:
                    cb(row)
                stop = any(distributed.all_gather_object(bool(self.should_stop())))
                # Every way out of this loop passes here first, so the last step is always saved.
                if self.step % self.cfg.save_steps == 0 or self.finished() or stop:
                    last = self._save() or last
                if stop:
                    status = "stopped"
                    break
            if self.eval_examples and self.step > 0:  # the policy as its last checkpoint holds it; run.json still says running
                held_out.run(self, "after", self.eval_examples)
        except KeyboardInterrupt:  # a stop that could not wait for the step's end is a stop, not a failure
            self._write_run("stopped", message="interrupted before its first step" if self.step == 0 else
                            f"interrupted during step {self.step + 1}", last=last)
            raise
        except BaseException as err:
            self._mark_failed(err, last)
            raise
        self._write_run(status, last=last)
        return TrainResult(self.out, self.step, status, last, row)

    def close(self) -> None:
        """Free the models, optimizer and generator now, while the interpreter is whole. The trainer
        sits in a reference cycle (its generator's checker is a method of it), so otherwise a sharded
        model and its communication state would be collected during interpreter shutdown, which can
        abort the process (seen with FSDP on gloo)."""
        for name in ("generator", "optimizer", "scheduler", "model", "ref_model", "rollout_copy"):
            setattr(self, name, None)
        gc.collect()

    def _mark_failed(self, err: BaseException, last: Path | None) -> None:
        """run.json says ``failed`` with the error. When the run directory cannot take even that
        (moved away, read-only), a write error says so too (one line, still an OSError); any other
        error goes on as it was (run.json still says running; its dead PID tells readers)."""
        try:
            self._write_run("failed", message=ckpt.describe(err), last=last)
        except OSError as unwritable:
            if not isinstance(err, OSError):
                return
            reason = os.strerror(unwritable.errno) if unwritable.errno else "unwritable"
            raise OSError(err.errno, f"{ckpt.describe(err)} (run.json could not be marked failed either: "
                                     f"{reason})") from None


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def _rollouts_up_to(step: int) -> Callable[[dict[str, Any]], bool]:
    """A ``truncate_jsonl`` filter keeping the rollout events of steps <= ``step``. Only start events
    name their step; the other events of a trace follow its start, so they inherit its verdict."""
    steps: dict[str, int] = {}

    def keep(row: dict[str, Any]) -> bool:
        if row.get("event") == "start":
            try:
                steps[row["trace_id"]] = event_from_dict(row).train_step or 0  # type: ignore[union-attr]
            except (TraceFormatError, KeyError, TypeError):
                pass
        return steps.get(str(row.get("trace_id")), 0) <= step

    return keep
