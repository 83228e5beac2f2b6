"""Supervised training of the shipped demo model on the synthetic arithmetic task.

A small Llama-family model and a character tokenizer, trained from scratch on step-by-step
solutions (loss on the solution tokens only). The point is a model that reasons in visible steps
and slips now and then -- the kind of mid-trace error E3RL exists to catch -- so training stops
well before the task is mastered. Seeded: initialisation and the data stream depend only on the
seed (the problems come from the task's train split, never its test split).
"""
from __future__ import annotations

import math
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..events import strict_dumps
from ..models import BOS_ID, EOS_ID, PAD_ID, char_tokenizer
from ..overrides import require_finite
from ..tasks.arith import LEVELS, make_problem, split_of


@dataclass
class DemoModelConfig:
    """Model shape and training schedule of the demo checkpoint."""

    hidden_size: int = 192
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 6
    num_key_value_heads: int = 3
    max_position_embeddings: int = 512
    steps: int = 3200
    batch_size: int = 16
    learning_rate: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    difficulty_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0)
    """Sampling weight of each difficulty level 1..5 in the training stream."""
    seed: int = 0

    def __post_init__(self) -> None:
        require_finite(self)


@dataclass
class TrainLog:
    config: dict[str, Any]
    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0
    params: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)


def train_stream(seed: int, weights: tuple[float, ...]) -> Any:
    """Endless train-split problems (test-split questions are skipped by construction)."""
    rng = random.Random(f"sft-{seed}")
    while True:
        d = rng.choices(LEVELS, weights=weights)[0]
        p = make_problem(rng, d)
        if split_of(p.question) == "train":
            yield p


def encode_example(tok: Any, prompt: str, solution: str) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1 on the solution and EOS) of one example."""
    p_ids = tok(prompt, add_special_tokens=True)["input_ids"]
    s_ids = tok(solution, add_special_tokens=False)["input_ids"] + [EOS_ID]
    return p_ids + s_ids, [0] * len(p_ids) + [1] * len(s_ids)


def build_model(cfg: DemoModelConfig, vocab_size: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=True,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def lr_at(step: int, cfg: DemoModelConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cos = 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
    return cfg.learning_rate * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos)


def train_demo_model(
    cfg: DemoModelConfig, out_dir: str | Path, *, on_step: Callable[[int, float], None] | None = None
) -> TrainLog:
    """Train from scratch and save a ``from_pretrained``-loadable model + tokenizer in ``out_dir``."""
    torch.manual_seed(cfg.seed)
    tok = char_tokenizer()
    model = build_model(cfg, len(tok))
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate, betas=(0.9, 0.95),
    )
    stream = train_stream(cfg.seed, cfg.difficulty_weights)
    log = TrainLog(config=asdict(cfg), params=sum(p.numel() for p in model.parameters()))
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        batch = [encode_example(tok, p.prompt, p.solution) for p in (next(stream) for _ in range(cfg.batch_size))]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), PAD_ID)
        labels = torch.full((len(batch), width), -100)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (seq, mask) in enumerate(batch):  # right padding: positions start at 0 for all rows
            ids[i, : len(seq)] = torch.tensor(seq)
            attn[i, : len(seq)] = 1
            labels[i, : len(seq)] = torch.where(torch.tensor(mask, dtype=torch.bool), torch.tensor(seq), -100)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        value = float(loss)
        if not math.isfinite(value):
            raise FloatingPointError(f"loss became {value} at step {step}; lower learning_rate")
        log.tokens += int(attn.sum())
        if step % 25 == 0 or step == cfg.steps - 1:
            log.losses.append((step, value))
        if on_step:
            on_step(step, value)
    log.steps = cfg.steps
    log.seconds = time.perf_counter() - t0
    save_model(model, tok, out_dir, log)
    return log


def save_model(model: Any, tok: Any, out_dir: str | Path, log: TrainLog) -> None:
    """Write to a temporary directory, then rename: a run killed mid-save leaves no half model."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Fresh hidden names beside it, so no folder of the user's (``X.tmp``, ``X.old``) is touched.
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; a model folder is read by others (a Space, a server)
    model.eval()
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "train_log.json").write_text(strict_dumps(asdict(log), indent=1))
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        out.rename(old / out.name)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
