"""The miniature reproduction: GRPO vs DAPO vs E3RL at one rollout-token budget, plus ablations.

Each run is ``e3rl train`` from the shipped checkpoint followed by ``e3rl eval`` on held-out test
problems, both as subprocesses (isolated, resumable: a run whose result file exists is skipped;
``jobs`` > 1 runs several at once, one thread each). Each run is scored at every 1/``eval_points``
of its budget, so it has a learning curve; ``summarize`` turns per-run results into the table (mean
± 95% CI over seeds, seed-paired differences); ``curves`` draws and compares the curves. Entry
point: ``scripts/reproduce.py``.
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

from ..commands import e3rl_command, train_command
from ..errors import E3RLError
from ..events import strict_dumps
from ..tasks.datasets import load_examples
from .slips import slip_rate
from .curves import by_name, mean_ci, mean_curve, paired_differences


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
    token_budget: int = 600_000
    """The regime of docs/results/regime-sweep-table.md: ~12 min of training per run on one CPU thread."""
    group_size: int = 8
    prompts_per_step: int = 16
    learning_rate: float = 1e-4
    eval_samples: int = 4
    max_steps: int = 1000
    """Only a safety cap: the token budget ends every run."""
    save_steps: int = 25
    """Checkpoint interval within a leg (a killed run resumes from the last one)."""
    eval_points: int = 4
    """Held-out evaluations per run, at every 1/eval_points of the budget (erasure off; the last one
    also with erasure on): the run trains in that many legs, each resuming the one before."""
    common: list[str] = field(default_factory=list)
    """Extra ``--set`` overrides for every run."""

    def __post_init__(self) -> None:
        if self.token_budget < 1 or self.eval_points < 1 or self.eval_points > self.token_budget:
            raise E3RLError(f"token_budget ({self.token_budget}) and eval_points ({self.eval_points}) must be >= 1, "
                            f"with eval_points <= token_budget")
        check_schedule(self.common, self.eval_points)


def check_schedule(overrides: list[str], eval_points: int) -> None:
    """Refuse a decaying learning-rate schedule in a run split into legs. Each leg is a run to its
    own share of the budget, and a decaying schedule ends at the run's budget: every leg would decay
    to 0, unlike the one run the legs stand for."""
    decaying = [o for o in overrides if o.replace(" ", "").startswith("lr_scheduler_type=")
                and o.split("=", 1)[1].strip() != "constant"]
    if decaying and eval_points > 1:
        raise E3RLError(f"{decaying[0]} decays to 0 at each leg's budget when a run trains in {eval_points} "
                        f"legs; use --eval-points 1 with it, or a constant schedule")


def plan(seeds: int = 5, ablations: bool = True, ablation_seeds: int = 2) -> list[RunSpec]:
    """GRPO, DAPO and E3RL x ``seeds``, then E3RL's ablations (and one variant) x ``ablation_seeds``.
    E3RL runs the shipped model's recommended erase budget (3), so Erase@1 and Erase@5 are its
    budget ablations.
    Runs go seed by seed across the rows of each part, so a comparison cut short (it resumes) has
    its rows at equal seed counts, the main comparison first."""
    runs = [RunSpec(name, algo, s) for s in range(seeds)
            for name, algo in (("GRPO", "grpo"), ("DAPO", "dapo"), ("E3RL", "e3rl"))]
    if ablations:
        runs += [RunSpec(name, "e3rl", s, overrides, "ablation") for s in range(ablation_seeds)
                 for name, overrides in ABLATIONS]
    return runs


ABLATIONS: list[tuple[str, list[str]]] = [
    ("E3RL w/o base uncertainty", ["no_base_uncertainty=true"]),
    ("E3RL w/o group dynamics", ["no_group_dynamics=true"]),
    ("E3RL w/o causal allocation", ["no_causal_allocation=true"]),
    ("E3RL Erase@1", ["generation.erase.budget=1"]),
    ("E3RL Erase@5", ["generation.erase.budget=5"]),
    # Not an ablation but a variant the paper does not have: erasure keeps the policy's own slips
    # out of the loss; this row also trains on each erased attempt, with advantage -|A_i| (delta 1).
    ("E3RL trained on erased attempts", ["erased_advantage_delta=1.0"]),
]


READINGS: list[tuple[str, str, list[str]]] = [
    # (row, algo, overrides): the readings of how to train on healed rollouts (docs/method.md §6)
    ("GRPO", "grpo", []),
    ("E3RL R0", "e3rl", []),
    ("E3RL R0, GRPO loss", "e3rl", ["loss_type=grpo"]),
    ("E3RL R1", "e3rl", ["erased_advantage_delta=1.0"]),
    ("E3RL R2", "e3rl", ["contrast_advantage=0.5"]),
    ("E3RL R3", "e3rl", ["erasure_when=no_signal"]),
    ("E3RL R0, sigma floor", "e3rl", ["generation.threshold.sigma_floor=0.02"]),
    ("DAPO", "dapo", []),
]
"""The readings study: GRPO and DAPO against E3RL read each way, one config field apart."""


def readings_plan(seeds: int = 3, more: Sequence[str] = ("GRPO", "E3RL R0"), more_seeds: int = 5) -> list[RunSpec]:
    """Every row of ``READINGS`` x ``seeds``, the rows named in ``more`` x ``more_seeds``; seed by
    seed across the rows, so a study cut short (it resumes) has its rows at equal seed counts."""
    top = max(seeds, more_seeds if more else seeds)
    return [RunSpec(name, algo, s, list(overrides)) for s in range(top) for name, algo, overrides in READINGS
            if s < (more_seeds if name in more else seeds)]


def eval_command(model: str, st: Settings, mode: str, rows: Path | None = None) -> list[str]:
    """Every model is scored the same way: the test set, K samples, seed 0, erasure off or on
    (``rows``: also write every sample's row there)."""
    return e3rl_command("eval", "--model", model, "--data", st.test_data, "--samples", str(st.eval_samples),
                        "--seed", "0", "--json", "--device", "cpu", "--erase" if mode == "on" else "--no-erase",
                        *(["--out", str(rows)] if rows else []))


def slips(rows_file: Path, st: Settings) -> dict[str, Any] | None:
    """The slip rate (``slips.slip_rate``) of one evaluation's rows under plain sampling; None when
    the test set has no step-by-step reference solutions."""
    examples = load_examples(st.test_data)
    if not examples or any(not ex.solution for ex in examples):
        return None
    rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
    return slip_rate(rows, {ex.id: ex.solution for ex in examples})


def _run(cmd: list[str], log: Path, env: dict[str, str]) -> None:
    with open(log, "a", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        raise E3RLError(f"{' '.join(cmd[2:5])}... failed (exit {proc.returncode}); see {log}")


def _evaluate(model: str, st: Settings, mode: str, out: Path, log: Path, env: dict[str, str],
              rows: Path | None = None, **extra: Any) -> dict[str, Any]:
    """Score ``model`` (erasure ``mode`` off/on); the summary (plus ``extra``) is stored in ``out``
    and returned."""
    t1 = time.time()
    cmd = eval_command(model, st, mode, rows)
    with open(log, "a", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise E3RLError(f"eval of {model} failed: {proc.stderr.strip()[-500:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    summary.update(seconds=time.time() - t1, **extra)
    _write_json(out, summary)
    return summary


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(strict_dumps(data, indent=2))
    tmp.replace(path)  # a run killed mid-write leaves the old file or none, never half of one


def _train_leg(spec: RunSpec, st: Settings, run_dir: Path, budget: int, log: Path, env: dict[str, str]) -> None:
    """Train ``run_dir`` up to ``budget`` rollout tokens: a new run when it holds no checkpoint yet,
    else ``--resume`` of the same command with the larger budget (resume is exact, so a run trained
    in legs equals one trained in one go)."""
    run_file = run_dir / "run.json"
    if run_file.is_file():
        run = json.loads(run_file.read_text())
        if run.get("last_checkpoint") and run["tokens_total"] >= budget:
            return  # this leg finished before (the run was stopped before its evaluation)
    resume = run_file.is_file() and any(run_dir.glob("checkpoint-*"))
    cmd = train_command(model=st.model, data=st.train_data, algo=spec.algo, out=run_dir, seed=spec.seed,
                        group_size=st.group_size, prompts_per_step=st.prompts_per_step,
                        learning_rate=st.learning_rate, token_budget=budget, steps=st.max_steps,
                        save_steps=st.save_steps, overrides=st.common + spec.overrides, device="cpu",
                        quiet=True, overwrite=not resume, resume=resume)
    _run(cmd, log, env)


def run_one(spec: RunSpec, st: Settings, root: Path, threads: int = 1,
            on_point: Callable[[RunSpec, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train and evaluate one run; returns (and stores in ROOT/RUN/result.json) its figures.

    The run trains in ``st.eval_points`` legs; after each, its checkpoint is scored on the test set
    (erasure off) into ROOT/RUN/eval-off-K.json, and after the last also with erasure on. Every file
    is written atomically and a finished leg or evaluation is not repeated, so a killed run goes on
    from its last checkpoint when the command is run again."""
    out = root / spec.run_id
    result_file = out / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    check_schedule([*st.common, *spec.overrides], st.eval_points)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    log = out / "commands.log"
    run_dir = out / "run"
    timing_file = out / "train-seconds.json"
    timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    points: list[dict[str, Any]] = []
    for k in range(1, st.eval_points + 1):
        budget = math.ceil(st.token_budget * k / st.eval_points)
        ev_file = out / f"eval-off-{k}.json"
        if not ev_file.is_file():
            t0 = time.time()
            _train_leg(spec, st, run_dir, budget, log, env)
            timing[str(k)] = timing.get(str(k), 0.0) + time.time() - t0
            _write_json(timing_file, timing)
            run = json.loads((run_dir / "run.json").read_text())
            # the last point keeps its rows: the trained policy's slip rate is measured on them
            rows = out / "rows-off.jsonl" if k == st.eval_points else None
            _evaluate(str(run_dir / run["last_checkpoint"]), st, "off", ev_file, log, env, rows, step=run["step"],
                      rollout_tokens=run["tokens_total"])
        ev = json.loads(ev_file.read_text())
        point = {"point": k, "fraction": k / st.eval_points, "rollout_tokens": ev["rollout_tokens"],
                 "step": ev["step"], "avg_at_k": ev["avg_at_k"], "eval_seconds": ev["seconds"]}
        points.append(point)
        if on_point:
            on_point(spec, point)
    run = json.loads((run_dir / "run.json").read_text())
    on_file = out / "eval-on.json"
    ev_on = json.loads(on_file.read_text()) if on_file.is_file() else \
        _evaluate(str(run_dir / run["last_checkpoint"]), st, "on", on_file, log, env)
    ev_off = json.loads((out / f"eval-off-{st.eval_points}.json").read_text())
    log_rows = [json.loads(l) for l in (run_dir / "log.jsonl").read_text().splitlines() if l.strip()]
    result = {
        "spec": asdict(spec), "run_id": spec.run_id, "steps": run["step"], "rollout_tokens": run["tokens_total"],
        "train_seconds": sum(timing.values()),
        "train_step_seconds": sum(r["step_time"] for r in log_rows),
        "eval_seconds": sum(p["eval_seconds"] for p in points) + ev_on["seconds"],
        "avg_at_k_off": ev_off["avg_at_k"], "avg_at_k_on": ev_on["avg_at_k"],
        "pass_at_k_off": ev_off["pass_at_k"], "pass_at_k_on": ev_on["pass_at_k"],
        "erase_rate_on": ev_on["erase_rate"], "slips_off": slips(out / "rows-off.jsonl", st),
        "evals": points,
        "curve": [{"tokens": r["rollout_tokens_total"], "reward": r["reward_mean"], "erase_rate": r["erase_rate"],
                   "entropy": r["entropy_mean"], "step": r["step"]} for r in log_rows],
        "settings": asdict(st),
    }
    _write_json(result_file, result)
    return result


def baseline(st: Settings, root: Path, threads: int = 1) -> dict[str, Any]:
    """The starting checkpoint evaluated like every run (no training), with its slip rate."""
    path = root / "base.json"
    if path.is_file():
        return json.loads(path.read_text())
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log = root / "base-commands.log"
    res: dict[str, Any] = {"model": st.model}
    for mode in ("off", "on"):
        rows = root / "base-rows-off.jsonl" if mode == "off" else None
        ev = _evaluate(st.model, st, mode, root / f"base-eval-{mode}.json", log, env, rows)
        res[f"avg_at_k_{mode}"] = ev["avg_at_k"]
    res["slips_off"] = slips(root / "base-rows-off.jsonl", st)
    _write_json(path, res)
    return res


def run_all(specs: Sequence[RunSpec], st: Settings, root: Path, jobs: int = 1, threads: int | None = None,
            on_done: Callable[[dict[str, Any]], None] | None = None,
            on_point: Callable[[RunSpec, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    threads = threads or (1 if jobs > 1 else max(1, os.cpu_count() or 1))

    def one(spec: RunSpec) -> dict[str, Any]:
        res = run_one(spec, st, root, threads, on_point)
        if on_done:
            on_done(res)
        return res

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, specs))


def summarize(results: Sequence[dict[str, Any]], base: dict[str, Any] | None = None,
              ref: str = "GRPO", ablation_ref: str = "E3RL") -> list[dict[str, Any]]:
    """One row per run name: seeds, Avg@K (erasure off/on at test) mean ± CI, the mean learning
    curve, the seed-paired difference from ``ref`` (and, for an ablation, from ``ablation_ref``,
    the method it takes a part from), tokens, steps, time."""
    diffs, vs_method = paired_differences(results, ref), paired_differences(results, ablation_ref)
    rows = []
    for name, rs in by_name(results).items():
        off, on = mean_ci([r["avg_at_k_off"] for r in rs]), mean_ci([r["avg_at_k_on"] for r in rs])
        rows.append({
            "name": name, "kind": rs[0]["spec"]["kind"], "seeds": len(rs), "avg_off": off[0], "ci_off": off[1],
            "avg_on": on[0], "ci_on": on[1], "per_seed_off": [r["avg_at_k_off"] for r in rs],
            "seed_list": [r["spec"]["seed"] for r in rs], "curve": mean_curve(rs, base), "vs_ref": diffs.get(name),
            "vs_method": vs_method.get(name) if rs[0]["spec"]["kind"] == "ablation" else None,
            "rollout_tokens": sum(r["rollout_tokens"] for r in rs) / len(rs),
            "steps": sum(r["steps"] for r in rs) / len(rs),
            "train_minutes": sum(r.get("train_step_seconds", r["train_seconds"]) for r in rs) / len(rs) / 60,
            "eval_minutes": sum(r.get("eval_seconds", 0.0) for r in rs) / len(rs) / 60,
        })
    return rows


def paired_text(vs: dict[str, Any] | None, digits: int = 3) -> str:
    """A ``paired_differences`` entry as a table cell: mean ± 95% half-width (pairs), or "-"."""
    if not vs:
        return "-"
    if vs["pairs"] == 1:
        return f"{vs['mean']:+.{digits}f} (1 pair)"
    return f"{vs['mean']:+.{digits}f} ± {vs['ci']:.{digits}f} ({vs['pairs']} pairs)"


def markdown_table(rows: Sequence[dict[str, Any]], base: dict[str, Any] | None, k: int, ref: str = "GRPO",
                   ablation_ref: str = "E3RL") -> str:
    """The comparison table: final Avg@K (± 95% t interval over seeds), the seed-paired difference
    from ``ref``, the mean curve at each evaluation point, erasure at test, cost. Ablations follow in
    a table of their own, paired with ``ablation_ref`` as well as with ``ref``."""
    def cells(r: dict[str, Any]) -> tuple[str, str]:
        pm = lambda m, c: f"{m:.3f} ± {c:.3f}" if r["seeds"] > 1 else f"{m:.3f}"  # noqa: E731
        curve = " → ".join(f"{p['mean']:.3f}" for p in r.get("curve") or [])
        return (f"{curve or '-'} | {pm(r['avg_on'], r['ci_on'])} | {r['rollout_tokens']:,.0f} | {r['steps']:.0f} | "
                f"{r['train_minutes']:.1f} | {r.get('eval_minutes', 0.0):.1f} |"), pm(r["avg_off"], r["ci_off"])

    tail = (f"curve (start → each 1/n of the budget) | Avg@{k}, erasure at test | rollout tokens | steps | "
            f"train min | eval min |")
    head = (f"| run | seeds | Avg@{k}, plain sampling at test | vs {ref}, seed-paired | {tail}\n"
            f"|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    if base:
        lines.append(f"| starting model (no RL) | - | {base['avg_at_k_off']:.3f} | - | - | {base['avg_at_k_on']:.3f} | "
                     f"0 | 0 | 0 | - |")
    ablations = [r for r in rows if r.get("kind") == "ablation"]
    for r in rows:
        if r.get("kind") != "ablation":
            rest, avg = cells(r)
            lines.append(f"| {r['name']} | {r['seeds']} | {avg} | {paired_text(r.get('vs_ref'))} | {rest}")
    text = head + "\n".join(lines) + "\n"
    if ablations:
        text += (f"\n| ablation | seeds | Avg@{k}, plain sampling at test | vs {ablation_ref}, seed-paired | "
                 f"vs {ref}, seed-paired | {tail}\n|---|---|---|---|---|---|---|---|---|---|---|\n")
        for r in ablations:
            rest, avg = cells(r)
            text += (f"| {r['name']} | {r['seeds']} | {avg} | {paired_text(r.get('vs_method'))} | "
                     f"{paired_text(r.get('vs_ref'))} | {rest}\n")
    return text
