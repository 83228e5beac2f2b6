"""What every part of ``e3rl bench generate`` shares: rows, timing helpers, the model under test,
prompts, and the erase-cost measurement that parts (b), (g) and (i) each run on their own model.
The part modules (``bench``, ``bench_long``, ``bench_families``, ``bench_effects``) import from
here and never from each other; ``bench.run_generate_bench`` runs them in order.
"""
from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..events import DoneEvent, EraseEvent, SegmentEvent, TokenEvent
from ..generation.config import GenerationConfig
from ..generation.generator import ErasableGenerator
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


def _prompt_maker(vocab: int) -> Callable[[int], list[int]]:
    rng = torch.Generator().manual_seed(0)

    def prompt(n: int) -> list[int]:
        # Ordinary tokens only (ids past the specials), so the prompt is valid for any tokenizer.
        return torch.randint(min(8, vocab - 1), min(vocab, 1000), (n,), generator=rng).tolist()

    return prompt


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
