"""``e3rl bench generate``, long-trace parts: the paper's trace lengths on a Qwen3-shaped model.

(e) tokens/s of a G=4 group at completion lengths up to 4k (8k on a GPU): the engine on its
    growing cache (and compiled, with ``--compile``), the engine on ``DynamicCache``, and
    ``model.generate`` with its default cache and with ``cache_implementation="static"``;
(f) the cache update's share of decode time near the longest length (torch profiler);
(g) erase + regenerate of a 512-token segment at prefixes 512 / 2k / 4k vs decoding 512 tokens
    (``bench._bench_erase_cost``);
(h) peak memory of one e3rl training step (causal allocation) vs completion length, the linear
    allocation vs the eager ``output_attentions`` reference, each in a fresh process.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from ..events import TokenEvent
from ..generation.kvcache import GrowingLayer
from ..models import load_model
from .bench_common import BenchResult, BenchRow, _Bench, _bench_erase_cost, _prompt_maker, _run, _sync, linear_fit, machine_description

CACHE_UPDATE = "kv_cache_update"


def _hf_generate(b: _Bench, ids: torch.Tensor, n: int, impl: str | None) -> Any:
    extra = {} if impl is None else {"cache_implementation": impl}
    with torch.no_grad():
        return b.model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=b.tok.pad_token_id or 0, **extra,
        )


def _workloads(b: _Bench, prompt: list[int], n: int, group: int, compile: bool) -> dict[str, Callable[[], Any]]:
    common = (f"max_new_tokens={n}", "erase.enabled=false", "threshold.policy=none", "segment.segment_tokens=512")
    growing = b.engine(*common, "kv_cache=static")
    dynamic = b.engine(*common, "kv_cache=dynamic")
    ids = torch.tensor([prompt] * group, device=b.dev)
    work = {
        "growing": lambda: _run(growing, prompt, group),
        "dynamic": lambda: _run(dynamic, prompt, group),
        "generate": lambda: _hf_generate(b, ids, n, None),
        "generate static": lambda: _hf_generate(b, ids, n, "static"),
    }
    if compile:
        compiled = b.engine(*common, "kv_cache=static", "compile=true")
        work["growing, compiled"] = lambda: _run(compiled, prompt, group)
    return work


def _round_robin(work: dict[str, Callable[[], Any]], repeats: int, dev: torch.device) -> dict[str, list[float]]:
    """Seconds per workload, run in turn (a, b, c, a, b, c, ...) so machine drift hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in work}
    for _ in range(repeats):
        for name, fn in work.items():
            _sync(dev)
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            times[name].append(time.perf_counter() - t0)
    return times


def bench_long_throughput(b: _Bench, prompt: list[int], lengths: list[int], group: int = 4,
                          compile: bool = False, label: str = "(e) long traces") -> list[BenchRow]:
    """(e) tokens/s at each completion length; the ratios are medians of per-round ratios."""
    rows = []
    b.progress(f"{label}: warm-up" + (" (compiling the decode step)" if compile else ""))
    for fn in _workloads(b, prompt, 16, group, compile).values():
        fn()  # first-call costs (and the compilation) stay out of the timings
    for n in lengths:
        b.progress(f"{label}: G={group}, {n} new tokens")
        times = _round_robin(_workloads(b, prompt, n, group, compile), b.repeats, b.dev)
        tps = {k: group * n / statistics.median(v) for k, v in times.items()}

        def ratio(a: str, ref: str) -> float:
            return statistics.median(r / a_ for a_, r in zip(times[a], times[ref]))

        ours = f"{tps['growing']:,.0f} tok/s growing cache"
        ratios = f"{ratio('growing', 'generate'):.2f}x generate; {ratio('growing', 'generate static'):.2f}x static"
        if compile:
            ours += f"; {tps['growing, compiled']:,.0f} compiled"
            ratios += f"; compiled {ratio('growing, compiled', 'generate'):.2f}x generate"
        goal = ">= 1.3x generate" if n >= 4096 else (">= 1.0x generate" if n <= 256 else "")
        rows.append(BenchRow(
            label, f"G={group}, {n} new tokens, T=1", ours,
            f"DynamicCache {tps['dynamic']:,.0f}; generate {tps['generate']:,.0f}; "
            f"generate static {tps['generate static']:,.0f} tok/s", ratios, goal,
        ))
    return rows


@contextmanager
def timed_cache_updates(device: torch.device) -> Iterator[list[float]]:
    """Wrap every cache layer's ``update`` (the growing cache's and ``DynamicLayer``'s) in a
    profiler range and a wall-clock timer; yields a one-item list holding the seconds spent inside
    updates (on a GPU each update is synchronized, so use the profiler figure there)."""
    from transformers.cache_utils import DynamicLayer

    saved = [(cls, cls.__dict__["update"]) for cls in (GrowingLayer, DynamicLayer)]
    spent = [0.0]

    def labelled(orig: Callable[..., Any]) -> Callable[..., Any]:
        def update(self: Any, *args: Any, **kwargs: Any) -> Any:
            with torch.profiler.record_function(CACHE_UPDATE):
                _sync(device)
                t0 = time.perf_counter()
                out = orig(self, *args, **kwargs)
                _sync(device)
                spent[0] += time.perf_counter() - t0
                return out
        return update

    for cls, orig in saved:
        cls.update = labelled(orig)
    try:
        yield spent
    finally:
        for cls, orig in saved:
            cls.update = orig


def cache_update_share(b: _Bench, prompt: list[int], n: int, kind: str, group: int = 4,
                       profiler: bool = False) -> float:
    """Share of decode time spent in cache updates while decoding ``n`` tokens after ``prompt``,
    from the first token on (the prefill left out). ``profiler=False``: wall-clock time inside the
    updates / wall time. ``profiler=True``: torch profiler op time inside the labelled updates /
    all op time (CUDA kernel time on a GPU); on a CPU the profiler's per-op overhead weighs on the
    small ops of an update, so it reads higher than the timer."""
    from torch.profiler import ProfilerActivity, profile

    gen = b.engine(f"max_new_tokens={n}", "erase.enabled=false", "threshold.policy=none",
                   "segment.segment_tokens=512", f"kv_cache={kind}")
    cuda = b.dev.type == "cuda"
    with timed_cache_updates(b.dev if not (profiler and cuda) else torch.device("cpu")) as spent:
        stream = gen.stream([prompt], group_size=group, seed=0)
        for ev in stream:
            if isinstance(ev, TokenEvent):
                break
        spent[0] = 0.0
        if not profiler:
            _sync(b.dev)
            t0 = time.perf_counter()
            for ev in stream:
                pass
            _sync(b.dev)
            return spent[0] / (time.perf_counter() - t0)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            for ev in stream:
                pass
    events = prof.events()
    if cuda:  # kernels launched inside the labelled ranges / all kernels
        kernel = [e for e in events if e.device_type.name == "CUDA"]
        inside = sum(k.device_time_total for e in events if e.name == CACHE_UPDATE for k in e.kernels)
        return inside / max(sum(k.device_time_total for k in kernel), 1e-9)

    def own(e: Any) -> float:  # op time of an event and everything it called
        return e.self_cpu_time_total + sum(own(c) for c in e.cpu_children)

    inside = sum(own(e) for e in events if e.name == CACHE_UPDATE)
    total = sum(e.self_cpu_time_total for e in events if e.name != CACHE_UPDATE)
    return inside / max(total, 1e-9)


def bench_cache_share(b: _Bench, prompt: list[int], n: int, group: int = 4) -> BenchRow:
    """(f) the cache update's share of decode time at context len(prompt) + n, two ways."""
    b.progress(f"(f) cache-update share at {len(prompt) + n} tokens")
    timer = {kind: cache_update_share(b, prompt, n, kind, group) for kind in ("static", "dynamic")}
    prof = {kind: cache_update_share(b, prompt, n, kind, group, profiler=True) for kind in ("static", "dynamic")}
    first = "timer" if b.dev.type == "cpu" else "timer (synchronized)"
    return BenchRow(
        "(f) cache update", f"G={group}, decoding tokens {len(prompt)}..{len(prompt) + n}: share of decode time",
        f"growing cache: {timer['static']:.1%} {first}, {prof['static']:.1%} torch profiler",
        f"DynamicCache: {timer['dynamic']:.1%} {first}, {prof['dynamic']:.1%} torch profiler",
        f"{timer['static'] / max(timer['dynamic'], 1e-9):.2f}x (timer)", "<= 5%",
    )


# ----------------------------------------------------------- (h) training-step memory
def train_step_peak(model: str, length: int, impl: str, device: str, dtype: str, rows: int = 4,
                    prompt_len: int = 32, segment: int = 256) -> int:
    """Peak bytes of one e3rl training step (old log-probs + causal allocation + loss + backward +
    AdamW) on ``rows`` synthetic completions of ``length`` tokens, measured in a fresh process so
    that nothing else is in the figure: CUDA peak allocation on a GPU, peak RSS growth on a CPU."""
    spec = dict(model=model, length=length, impl=impl, device=device, dtype=dtype, rows=rows,
                prompt_len=prompt_len, segment=segment)
    code = "import sys; from e3rl_core.evaluation.bench_long import _train_step_child as c; c(sys.argv[1])"
    # The child imports this very package, wherever it was imported from here.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_package_root(), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"training-step memory at {length} tokens ({impl}) failed:\n{proc.stderr[-2000:]}")
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak"])


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _train_step_child(spec_json: str) -> None:
    from ..overrides import apply_overrides
    from ..training.config import TrainConfig
    from ..training.rollout import RolloutBatch
    from ..training.trainer import Trainer

    s = json.loads(spec_json)
    cfg = apply_overrides(TrainConfig(), ["algo=e3rl", "allocation=causal_attention", f"attention_impl={s['impl']}",
                                          "micro_batch_size=1", "log_rollouts=0", "max_completion_length=16"])
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, model=s["model"], data="synthetic:train?n=4&seed=0", out=os.path.join(out, "run"),
                          device=s["device"], dtype=s["dtype"])
        R, P, L, seg = s["rows"], s["prompt_len"], s["length"], s["segment"]
        g = torch.Generator().manual_seed(0)
        vocab = trainer.model.config.vocab_size
        ids = torch.randint(min(8, vocab - 1), min(vocab, 1000), (R, P + L), generator=g)
        completion = torch.zeros(R, P + L)
        completion[:, P:] = 1
        segment_ids = torch.full((R, P + L), -1, dtype=torch.long)
        segment_ids[:, P:] = torch.arange(L) // seg
        batch = RolloutBatch(
            input_ids=ids, attention_mask=torch.ones(R, P + L, dtype=torch.long), completion_mask=completion,
            segment_ids=segment_ids, n_segments=torch.full((R,), -(-L // seg), dtype=torch.long),
            rewards=torch.tensor([float(i % 2) for i in range(R)]), group_ids=torch.zeros(R, dtype=torch.long),
            truncated=torch.zeros(R, dtype=torch.bool),
        )
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            trainer._optimize(batch)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            # Linux: "5" in clear_refs resets the peak-RSS mark (VmHWM) to the current RSS.
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = _rss("VmRSS")
            trainer._optimize(batch)
            peak = _rss("VmHWM") - base
    print(json.dumps({"peak": peak}))


def bench_train_memory(model: str, lengths: list[int], device: str, dtype: str,
                       progress: Callable[[str], None]) -> list[BenchRow]:
    """(h) one row per implementation (linear fit over lengths), then the ratio at the longest."""
    peaks: dict[str, list[int]] = {}
    for impl in ("linear", "eager"):
        peaks[impl] = []
        for n in lengths:
            progress(f"(h) training-step memory, {impl} allocation, {n} tokens")
            peaks[impl].append(train_step_peak(model, n, impl, device, dtype))
    what = "peak CUDA allocation" if device.startswith("cuda") else "peak RSS growth"
    rows = []
    for impl in ("linear", "eager"):
        slope, intercept, r2 = linear_fit([float(n) for n in lengths], [float(p) for p in peaks[impl]])
        rows.append(BenchRow(
            "(h) train-step memory", f"{impl} allocation, 4 rows x completion, {what}: "
            + "; ".join(f"{n}: {p / 2**20:,.1f} MiB" for n, p in zip(lengths, peaks[impl])),
            f"{slope / 2**10:,.1f} KiB/token", f"intercept {intercept / 2**20:,.1f} MiB", f"R^2 = {r2:.4f}",
            "R^2 >= 0.99" if impl == "linear" else "(reference; O(T^2))",
        ))
    ratio = peaks["eager"][-1] / max(peaks["linear"][-1], 1)
    rows.append(BenchRow(
        "(h) train-step memory", f"completion {lengths[-1]}: eager / linear", f"{peaks['linear'][-1] / 2**20:,.1f} MiB",
        f"{peaks['eager'][-1] / 2**20:,.1f} MiB eager", f"{ratio:.1f}x less", ">= 5x less",
    ))
    return rows


def run_long_parts(result: BenchResult, parts: str, long_model: str, shipped_model: str | None, *,
                   device: str | None, dtype: str, repeats: int, quick: bool, progress: Callable[[str], None],
                   trust_remote_code: bool, compile: bool) -> list[BenchRow]:
    """Parts (e)-(h) of ``run_generate_bench``; adds the models used to ``result.notes``."""
    model, tok = load_model(long_model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    dev = next(model.parameters()).device
    result.machine = result.machine or machine_description(dev)
    b = _Bench(model, tok, long_model, dev, repeats, progress)
    prompt = _prompt_maker(len(tok))
    p32 = prompt(32)
    if quick:
        lengths, prefixes, seg, mem_lengths = [64, 128], [64, 128], 32, [64, 128, 192]
    else:
        lengths, prefixes, seg, mem_lengths = [256, 1024, 4096], [512, 2048, 4096], 512, [512, 1024, 2048, 4096]
        if dev.type == "cuda":
            lengths.append(8192)
    rows: list[BenchRow] = []
    result.notes.append(f"(e)-(h): {long_model}, {dtype} weights on {dev}")
    if "e" in parts:
        rows += bench_long_throughput(b, p32, lengths, compile=compile)
    if "f" in parts:
        tail = 32 if quick else 256
        rows.append(bench_cache_share(b, prompt(lengths[-1] + 32 - tail), tail))
    if "g" in parts:
        rows += _bench_erase_cost(b, {P: prompt(P) for P in prefixes}, seg=seg, part="(g)")
    del model, b
    if "h" in parts:
        rows += bench_train_memory(long_model, mem_lengths, str(dev), dtype, progress)
    if "e" in parts and shipped_model and os.path.isdir(shipped_model):
        model, tok = load_model(shipped_model, device=device, dtype=dtype)
        sb = _Bench(model, tok, shipped_model, dev, repeats, progress)
        context = getattr(model.config, "max_position_embeddings", None) or 10**9
        fit = [n for n in lengths if 32 + n <= context]
        if fit:
            rows += bench_long_throughput(sb, _prompt_maker(len(tok))(32), fit, compile=compile,
                                          label="(e) shipped model")
        result.notes.append(f"(e) shipped model: {shipped_model} (context {context}: lengths {fit or 'none'} fit)")
    return rows
