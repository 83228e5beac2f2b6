"""``e3rl bench generate``: speed and memory of the erasable generator, measured side by side.

(a) tokens/s of the E3RL loop (signals on, erasure off) vs ``model.generate``, batch 1 and 8;
(b) erasing + regenerating an L-token segment at prefix P vs decoding L tokens, and vs naive
    regeneration that re-prefills the kept prefix;
(c) peak KV-cache memory vs tokens generated with erasures on (linear fit, R^2);
(d) a G=8 group decoded in lockstep with erasure vs the same 8 rollouts one after another;
(e)-(h) the long-trace parts, on a Qwen3-shaped model: see ``bench_long``;
(i) the family mechanics (sliding windows, recurrent states) against a Llama of the same size:
    see ``bench_families``.
Returns rows; the CLI prints them. Timings are medians over ``repeats`` runs after a warm-up.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import ConfigError
from ..events import DoneEvent, EraseEvent, SegmentEvent, TokenEvent
from ..generation.config import GenerationConfig
from ..generation.generator import ErasableGenerator
from ..models import load_model
from ..overrides import apply_overrides


@dataclass
class BenchRow:
    part: str
    setting: str
    e3rl: str
    reference: str
    ratio: str
    goal: str


@dataclass
class BenchResult:
    machine: str
    model: str
    rows: list[BenchRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], Any], repeats: int, device: torch.device) -> tuple[float, Any]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _paired(fn_a: Callable[[], Any], fn_b: Callable[[], Any], repeats: int, device: torch.device) -> tuple[float, float, float, Any, Any]:
    """Time two workloads alternately (a, b, a, b, ...) so that drifting machine load hits both
    alike. Returns the median time of each, the median of the per-pair ratios t_b / t_a, and the
    last outputs."""
    fn_a(), fn_b()  # warm-up
    ta, tb, out_a, out_b = [], [], None, None
    for _ in range(repeats):
        for fn, times in ((fn_a, ta), (fn_b, tb)):
            _sync(device)
            t0 = time.perf_counter()
            out = fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
            if fn is fn_a:
                out_a = out
            else:
                out_b = out
    ratio = statistics.median(b / a for a, b in zip(ta, tb))
    return statistics.median(ta), statistics.median(tb), ratio, out_a, out_b


def _config(*overrides: str) -> GenerationConfig:
    return apply_overrides(GenerationConfig(), list(overrides))


def _run(gen: ErasableGenerator, prompt: list[int], group: int, seed: int = 0) -> list[DoneEvent]:
    return [e for e in gen.stream([prompt], group_size=group, seed=seed) if isinstance(e, DoneEvent)]


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        hw = torch.cuda.get_device_name(device)
    else:
        hw = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return f"{hw}; torch {torch.__version__}; Python {platform.python_version()}"


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares slope, intercept and R^2."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = sxy / sxx
    intercept = my - slope * mx
    ss_res = sum((y - (slope * x + intercept)) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return slope, intercept, 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0


@dataclass
class _Bench:
    """What the four parts share: the model, its device, the timing settings."""

    model: Any
    tok: Any
    spec: str
    dev: torch.device
    repeats: int
    progress: Callable[[str], None]

    def engine(self, *overrides: str) -> ErasableGenerator:
        g = ErasableGenerator(self.model, self.tok, _config(*overrides), model_name=self.spec)
        # The engine and model.generate must do the same work: no early stop at EOS on either side.
        g.eos_ids = set()
        return g


def _bench_throughput(b: _Bench, p32: list[int], gen_tokens: int) -> list[BenchRow]:
    """(a) tokens/s of the loop with erasure off vs ``model.generate``, sampling at T=1."""
    plain = b.engine(f"max_new_tokens={gen_tokens}", "erase.enabled=false", "threshold.policy=none",
                     "segment.segment_tokens=64")
    rows = []
    for batch in (1, 8):
        b.progress(f"(a) throughput, batch {batch}")
        ids = torch.tensor([p32] * batch, device=b.dev)

        def hf() -> Any:
            with torch.no_grad():
                return b.model.generate(
                    ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                    top_p=1.0, max_new_tokens=gen_tokens, min_new_tokens=gen_tokens, eos_token_id=None,
                    pad_token_id=b.tok.pad_token_id or 0,
                )

        t_e3rl, t_hf, ratio, _, _ = _paired(lambda: _run(plain, p32, batch), hf, b.repeats, b.dev)
        n = batch * gen_tokens
        rows.append(BenchRow(
            "(a) throughput", f"batch {batch}, {gen_tokens} new tokens, T=1",
            f"{n / t_e3rl:,.0f} tok/s", f"{n / t_hf:,.0f} tok/s (model.generate)",
            f"{ratio:.2f}x", ">= 0.9x",
        ))
    return rows


def _bench_erase_cost(b: _Bench, prompts: dict[int, list[int]], seg: int, part: str = "(b)") -> list[BenchRow]:
    """(b) cost of one erase + regenerate of an L-token segment at prefix P, timed inside one run
    from the event stream: attempt 0 (decode L) and erase -> attempt 1 done (rollback + redo L)."""
    # Threshold -inf erases the first attempt; budget 1 then keeps the retry (fallback=last).
    erase1 = b.engine(f"max_new_tokens={seg}", "threshold.policy=fixed", "threshold.value=-1e9",
                      "erase.budget=1", "erase.fallback=last", f"segment.segment_tokens={seg}")
    rows = []
    for P, pp in prompts.items():
        b.progress(f"{part} erase cost at prefix {P}")

        def timed_run() -> tuple[float, float]:
            marks: dict[str, float] = {}
            for ev in erase1.stream([pp], seed=0):
                _sync(b.dev)
                now = time.perf_counter()
                if isinstance(ev, TokenEvent) and ev.step == 0:
                    marks["first"] = now
                elif isinstance(ev, SegmentEvent):
                    marks[f"seg{ev.attempt}"] = now
                elif isinstance(ev, EraseEvent):
                    marks["erase"] = now
                    if ev.cache_len_after != len(pp):  # the rollback must land on the segment start
                        raise RuntimeError(f"rollback left {ev.cache_len_after} entries, expected {len(pp)}")
            return marks["seg0"] - marks["first"], marks["seg1"] - marks["erase"]

        timed_run()  # warm-up
        pairs = [timed_run() for _ in range(b.repeats)]
        decode = statistics.median(p[0] for p in pairs)
        redo = statistics.median(p[1] for p in pairs)

        def prefill() -> Any:
            with torch.no_grad():
                return b.model(torch.tensor([pp], device=b.dev), logits_to_keep=1)

        t_prefill, _ = _median_time(prefill, b.repeats, b.dev)
        naive = t_prefill + decode
        rows.append(BenchRow(
            f"{part} erase+regenerate", f"P={P}, L={seg}",
            f"{redo * 1e3:.1f} ms", f"decode L: {decode * 1e3:.1f} ms; naive re-prefill+decode: {naive * 1e3:.1f} ms",
            f"{redo / decode:.2f}x decode; {redo / naive:.2f}x naive", "<= 1.1x decode",
        ))
    return rows


def _bench_memory(b: _Bench, p32: list[int], lengths: list[int]) -> BenchRow:
    """(c) peak KV memory vs tokens generated, erasures on, G=8 batch with holes and compaction."""
    xs, ys, details = [], [], []
    for n_new in lengths:
        b.progress(f"(c) memory, {n_new} new tokens")
        g = b.engine(f"max_new_tokens={n_new}", "segment.mode=fixed", "segment.segment_tokens=32",
                     "threshold.policy=e3rl", "threshold.kappa=0.0", "sampling.temperature=1.0")
        dones = _run(g, p32, 8)
        generated = sum(d.tokens_generated for d in dones)
        erasures = sum(d.erasures for d in dones)
        if b.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(b.dev)
            dones = _run(g, p32, 8)
            peak = torch.cuda.max_memory_allocated(b.dev)
            held = ""
        else:
            peak = g.last_stats.peak_kv_bytes
            # The growing cache allocates ahead of what it holds (doubling): say how far.
            held = f" ({g.last_stats.peak_kv_allocated / 2**20:.2f} allocated)"
        xs.append(float(generated))
        ys.append(float(peak))
        details.append(f"{n_new}/row: {generated} tok, {erasures} erasures, {peak / 2**20:.2f} MiB{held}")
    slope, intercept, r2 = linear_fit(xs, ys)
    what = "peak CUDA memory" if b.dev.type == "cuda" else "peak KV-cache bytes in use"
    return BenchRow(
        "(c) memory", f"G=8, {what}; " + "; ".join(details),
        f"{slope:,.0f} B/token", f"intercept {intercept / 2**20:.2f} MiB", f"R^2 = {r2:.4f}", "linear (R^2 ~ 1)",
    )


def _bench_group(b: _Bench, p32: list[int], gen_tokens: int) -> BenchRow:
    """(d) G=8 lockstep with erasure vs the same 8 rollouts one after another."""
    b.progress("(d) batched group vs sequential")
    group = b.engine(f"max_new_tokens={gen_tokens}", "segment.mode=fixed", "segment.segment_tokens=32",
                     "threshold.policy=e3rl", "threshold.kappa=0.5", "sampling.temperature=1.0")

    def sequential() -> list[DoneEvent]:
        return [d for s in range(8) for d in _run(group, p32, 1, seed=s)]

    t_group, t_seq, _, dones, dones_seq = _paired(lambda: _run(group, p32, 8, seed=0), sequential, b.repeats, b.dev)
    n_group = sum(d.tokens_generated for d in dones)
    e_group = sum(d.erasures for d in dones)
    n_seq = sum(d.tokens_generated for d in dones_seq)
    e_seq = sum(d.erasures for d in dones_seq)
    return BenchRow(
        "(d) group lockstep", f"G=8, {gen_tokens} kept/row, e3rl policy",
        f"{n_group / t_group:,.0f} tok/s ({e_group} erasures)",
        f"{n_seq / t_seq:,.0f} tok/s sequential ({e_seq} erasures)",
        f"{(n_group / t_group) / (n_seq / t_seq):.2f}x", ">= 3x",
    )


PARTS = "abcdefghi"
SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "checkpoints", "arith-demo")


def _prompt_maker(vocab: int) -> Callable[[int], list[int]]:
    rng = torch.Generator().manual_seed(0)

    def prompt(n: int) -> list[int]:
        # Ordinary tokens only (ids past the specials), so the prompt is valid for any tokenizer.
        return torch.randint(min(8, vocab - 1), min(vocab, 1000), (n,), generator=rng).tolist()

    return prompt


def run_generate_bench(
    model_spec: str = "random:small",
    *,
    device: str | None = None,
    dtype: str = "auto",
    repeats: int = 3,
    quick: bool = False,
    progress: Callable[[str], None] = lambda msg: None,
    trust_remote_code: bool = False,
    parts: str = PARTS,
    long_model: str = "random:small-qwen3",
    shipped_model: str | None = SHIPPED,
    compile: bool = False,
) -> BenchResult:
    """Parts (a)-(d) on ``model_spec``; the long-trace parts (e)-(h) on ``long_model`` (Qwen3's
    layout) and (e) also on ``shipped_model`` at the lengths its context holds."""
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise ConfigError(f"unknown bench parts {''.join(sorted(unknown)) or '(none given)'}; choose from {PARTS}")
    result = BenchResult(machine="", model=model_spec if set(parts) & set("abcd") else long_model)
    if set(parts) & set("abcd"):
        model, tok = load_model(model_spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        dev = next(model.parameters()).device
        result.machine = machine_description(dev)
        prompt = _prompt_maker(len(tok))
        gen_tokens = 64 if quick else 256
        p32 = prompt(32)
        b = _Bench(model, tok, model_spec, dev, repeats, progress)
        if "a" in parts:
            result.rows += _bench_throughput(b, p32, gen_tokens)
        if "b" in parts:
            long_prompts = {P: prompt(P) for P in (256, 1024)}
            result.rows += _bench_erase_cost(b, long_prompts, seg=32 if quick else 64)
        if "c" in parts:
            result.rows.append(_bench_memory(b, p32, [64, 128, 192, 256] if quick else [128, 256, 512, 768, 1024]))
        if "d" in parts:
            result.rows.append(_bench_group(b, p32, gen_tokens))
        del model, b
    if set(parts) & set("efgh"):
        from . import bench_long

        result.rows += bench_long.run_long_parts(
            result, parts, long_model, shipped_model, device=device, dtype=dtype, repeats=repeats, quick=quick,
            progress=progress, trust_remote_code=trust_remote_code, compile=compile)
    if "i" in parts:
        from .bench_families import run_family_parts

        dev = torch.device(device) if device else torch.device("cpu")
        result.machine = result.machine or machine_description(dev)
        result.rows += run_family_parts(dev, repeats, quick, progress)
    return result


def format_table(result: BenchResult) -> str:
    head = ["part", "setting", "E3RL", "reference", "ratio", "goal"]
    lines = [f"Machine: {result.machine}", f"Model: {result.model}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result.rows:
        lines.append(f"| {r.part} | {r.setting} | {r.e3rl} | {r.reference} | {r.ratio} | {r.goal} |")
    lines.extend(result.notes)
    return "\n".join(lines)
