"""The miniature reproduction: GRPO vs DAPO vs E3RL at one rollout-token budget, plus ablations.

Each run is ``e3rl train`` from the shipped checkpoint followed by ``e3rl eval`` on held-out test
problems, both as subprocesses (isolated, resumable: a run whose result file exists is skipped;
``jobs`` > 1 runs several at once, one thread each). ``summarize`` turns per-run results into the
table (mean ± 95% CI over seeds) and ``figure`` into a plotly figure. Entry point:
``scripts/reproduce.py``.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..cli import e3rl_command
from ..cli.train import train_command
from ..errors import E3RLError
from ..events import strict_dumps

# Two-sided 95% Student t quantiles by degrees of freedom (n - 1); beyond 10, 1.96 is close enough.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


@dataclass
class RunSpec:
    name: str
    """Row label, e.g. ``E3RL`` or ``E3RL w/o causal allocation``."""
    algo: str
    seed: int
    overrides: list[str] = field(default_factory=list)
    kind: str = "main"
    """main (compared over seeds) or ablation."""

    @property
    def run_id(self) -> str:
        slug = "".join(ch if ch.isalnum() else "-" for ch in self.name.lower()).strip("-")
        return f"{slug}-s{self.seed}"


@dataclass
class Settings:
    model: str = "checkpoints/arith-demo"
    train_data: str = "synthetic:train?n=4000&seed=1"
    test_data: str = "synthetic:test?n=200"
    token_budget: int = 120_000
    group_size: int = 8
    prompts_per_step: int = 8
    learning_rate: float = 5e-5
    eval_samples: int = 4
    max_steps: int = 1000
    """Only a safety cap: the token budget ends every run."""
    common: list[str] = field(default_factory=list)
    """Extra ``--set`` overrides for every run."""


def plan(seeds: int = 3, ablations: bool = True) -> list[RunSpec]:
    runs = [RunSpec(name, algo, s) for s in range(seeds) for name, algo in (("GRPO", "grpo"), ("DAPO", "dapo"), ("E3RL", "e3rl"))]
    if ablations:
        runs += [
            RunSpec("E3RL w/o base uncertainty", "e3rl", 0, ["no_base_uncertainty=true"], "ablation"),
            RunSpec("E3RL w/o group dynamics", "e3rl", 0, ["no_group_dynamics=true"], "ablation"),
            RunSpec("E3RL w/o causal allocation", "e3rl", 0, ["no_causal_allocation=true"], "ablation"),
            RunSpec("E3RL Erase@1", "e3rl", 0, ["generation.erase.budget=1"], "ablation"),
            RunSpec("E3RL Erase@5", "e3rl", 0, ["generation.erase.budget=5"], "ablation"),
        ]
    return runs


def _eval_cmd(model: str, st: Settings, mode: str) -> list[str]:
    """Every model is scored the same way: the test set, K samples, seed 0, erasure off or on."""
    return e3rl_command("eval", "--model", model, "--data", st.test_data, "--samples", str(st.eval_samples),
                "--seed", "0", "--json", "--device", "cpu", "--erase" if mode == "on" else "--no-erase")


def _run(cmd: list[str], log: Path, env: dict[str, str]) -> None:
    with open(log, "a", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        raise E3RLError(f"{' '.join(cmd[2:5])}... failed (exit {proc.returncode}); see {log}")


def run_one(spec: RunSpec, st: Settings, root: Path, threads: int = 1) -> dict[str, Any]:
    """Train and evaluate one run; returns (and stores in ROOT/RUN/result.json) its figures."""
    out = root / spec.run_id
    result_file = out / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    log = out / "commands.log"
    run_dir = out / "run"
    t0 = time.time()
    train = train_command(model=st.model, data=st.train_data, algo=spec.algo, out=run_dir, seed=spec.seed,
                          group_size=st.group_size, prompts_per_step=st.prompts_per_step,
                          learning_rate=st.learning_rate, token_budget=st.token_budget, steps=st.max_steps,
                          save_steps=st.max_steps, overrides=st.common + spec.overrides, device="cpu",
                          quiet=True, overwrite=True)
    _run(train, log, env)
    train_seconds = time.time() - t0
    run = json.loads((run_dir / "run.json").read_text())
    ckpt_dir = run_dir / run["last_checkpoint"]
    evals = {}
    for mode in ("off", "on"):
        t1 = time.time()
        ev_out = out / f"eval-{mode}.json"
        cmd = _eval_cmd(str(ckpt_dir), st, mode)
        with open(log, "a") as f:
            f.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise E3RLError(f"eval of {spec.run_id} failed: {proc.stderr.strip()[-500:]}")
        evals[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        evals[mode]["seconds"] = time.time() - t1
        ev_out.write_text(strict_dumps(evals[mode], indent=2))
    log_rows = [json.loads(l) for l in (run_dir / "log.jsonl").read_text().splitlines() if l.strip()]
    result = {
        "spec": asdict(spec), "run_id": spec.run_id, "steps": run["step"], "rollout_tokens": run["tokens_total"],
        "train_seconds": train_seconds, "avg_at_k_off": evals["off"]["avg_at_k"], "avg_at_k_on": evals["on"]["avg_at_k"],
        "pass_at_k_off": evals["off"]["pass_at_k"], "pass_at_k_on": evals["on"]["pass_at_k"],
        "erase_rate_on": evals["on"]["erase_rate"],
        "curve": [{"tokens": r["rollout_tokens_total"], "reward": r["reward_mean"], "erase_rate": r["erase_rate"],
                   "entropy": r["entropy_mean"], "step": r["step"]} for r in log_rows],
        "settings": asdict(st),
    }
    tmp = result_file.with_suffix(".tmp")
    tmp.write_text(strict_dumps(result, indent=2))
    tmp.replace(result_file)
    return result


def baseline(st: Settings, root: Path, threads: int = 1) -> dict[str, Any]:
    """The shipped checkpoint evaluated like every run (no training)."""
    path = root / "base.json"
    if path.is_file():
        return json.loads(path.read_text())
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    res: dict[str, Any] = {}
    for mode in ("off", "on"):
        cmd = _eval_cmd(st.model, st, mode)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise E3RLError(f"eval of the base model failed: {proc.stderr.strip()[-500:]}")
        res[f"avg_at_k_{mode}"] = json.loads(proc.stdout.strip().splitlines()[-1])["avg_at_k"]
    path.write_text(strict_dumps(res, indent=2))
    return res


def run_all(specs: Sequence[RunSpec], st: Settings, root: Path, jobs: int = 1, threads: int | None = None,
            on_done: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    threads = threads or (1 if jobs > 1 else max(1, os.cpu_count() or 1))

    def one(spec: RunSpec) -> dict[str, Any]:
        res = run_one(spec, st, root, threads)
        if on_done:
            on_done(res)
        return res

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, specs))


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t interval (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T95.get(n - 1, 1.96) * sd / math.sqrt(n)


def summarize(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run name: seeds, Avg@K (erasure off/on at test) mean ± CI, tokens, steps, time."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_name.setdefault(r["spec"]["name"], []).append(r)
    rows = []
    for name, rs in by_name.items():
        off, on = mean_ci([r["avg_at_k_off"] for r in rs]), mean_ci([r["avg_at_k_on"] for r in rs])
        rows.append({
            "name": name, "kind": rs[0]["spec"]["kind"], "seeds": len(rs), "avg_off": off[0], "ci_off": off[1],
            "avg_on": on[0], "ci_on": on[1], "per_seed_off": [r["avg_at_k_off"] for r in rs],
            "rollout_tokens": sum(r["rollout_tokens"] for r in rs) / len(rs),
            "steps": sum(r["steps"] for r in rs) / len(rs),
            "train_minutes": sum(r["train_seconds"] for r in rs) / len(rs) / 60,
        })
    return rows


def markdown_table(rows: Sequence[dict[str, Any]], base: dict[str, Any] | None, k: int) -> str:
    head = (f"| run | seeds | Avg@{k}, plain sampling at test | Avg@{k}, erasure at test | rollout tokens | steps | "
            f"train min |\n|---|---|---|---|---|---|---|\n")
    lines = []
    if base:
        lines.append(f"| shipped model (no RL) | - | {base['avg_at_k_off']:.3f} | {base['avg_at_k_on']:.3f} | 0 | 0 | 0 |")
    for r in rows:
        pm = lambda m, c: f"{m:.3f} ± {c:.3f}" if r["seeds"] > 1 else f"{m:.3f}"
        lines.append(f"| {r['name']} | {r['seeds']} | {pm(r['avg_off'], r['ci_off'])} | {pm(r['avg_on'], r['ci_on'])} | "
                     f"{r['rollout_tokens']:,.0f} | {r['steps']:.0f} | {r['train_minutes']:.1f} |")
    return head + "\n".join(lines) + "\n"


def figure(results: Sequence[dict[str, Any]], base: dict[str, Any] | None = None, window: int = 5) -> Any:
    """Plotly figure: training reward (moving average) vs rollout tokens per run, test Avg@K markers."""
    import plotly.graph_objects as go

    colors = {"GRPO": "#1f77b4", "DAPO": "#ff7f0e", "E3RL": "#2ca02c"}
    fig = go.Figure()
    for r in results:
        name = r["spec"]["name"]
        xs = [c["tokens"] for c in r["curve"]]
        ys = [c["reward"] for c in r["curve"]]
        smooth = [sum(ys[max(0, i - window + 1): i + 1]) / len(ys[max(0, i - window + 1): i + 1]) for i in range(len(ys))]
        fig.add_trace(go.Scatter(x=xs, y=smooth, mode="lines", name=f"{name} s{r['spec']['seed']} (train reward)",
                                 line=dict(color=colors.get(name), dash="solid" if r["spec"]["kind"] == "main" else "dot"),
                                 legendgroup=name, opacity=0.8))
        fig.add_trace(go.Scatter(x=[r["rollout_tokens"]], y=[r["avg_at_k_off"]], mode="markers",
                                 marker=dict(color=colors.get(name), size=10, symbol="diamond"),
                                 name=f"{name} s{r['spec']['seed']} test Avg@K", legendgroup=name, showlegend=False))
    if base:
        fig.add_hline(y=base["avg_at_k_off"], line_dash="dash", line_color="gray",
                      annotation_text="shipped model, test Avg@K")
    fig.update_layout(title="Accuracy vs rollout tokens (lines: training reward, 5-step mean; diamonds: held-out Avg@K)",
                      xaxis_title="rollout tokens generated (erased included)", yaxis_title="accuracy",
                      template="plotly_white", height=520)
    return fig
