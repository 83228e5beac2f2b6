"""The reproduction's statistics and outputs, and a miniature end-to-end run of scripts/reproduce.py."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from e3rl_core.evaluation.experiment import RunSpec, figure, markdown_table, mean_ci, plan, summarize

ROOT = Path(__file__).resolve().parents[2]


def test_mean_ci_by_hand():
    m, h = mean_ci([0.4, 0.5, 0.6])
    assert m == pytest.approx(0.5)
    assert h == pytest.approx(4.303 * 0.1 / math.sqrt(3), rel=1e-4)  # t(0.975, 2) * sd / sqrt(n)
    assert mean_ci([0.7]) == (0.7, 0.0)


def test_plan_has_three_algorithms_seeds_and_ablations():
    specs = plan(seeds=3)
    main = [s for s in specs if s.kind == "main"]
    assert sorted({s.name for s in main}) == ["DAPO", "E3RL", "GRPO"]
    assert all(sum(s.name == n for s in main) == 3 for n in ("GRPO", "DAPO", "E3RL"))
    ablations = {s.name: s.overrides for s in specs if s.kind == "ablation"}
    assert ablations["E3RL w/o base uncertainty"] == ["no_base_uncertainty=true"]
    assert ablations["E3RL Erase@1"] == ["generation.erase.budget=1"]
    assert len({s.run_id for s in specs}) == len(specs)


def _fake(name: str, seed: int, acc: float) -> dict:
    return {"spec": {"name": name, "algo": "grpo", "seed": seed, "overrides": [], "kind": "main"},
            "run_id": RunSpec(name, "grpo", seed).run_id, "steps": 10, "rollout_tokens": 1000 + seed,
            "train_seconds": 60.0, "avg_at_k_off": acc, "avg_at_k_on": acc + 0.1,
            "curve": [{"tokens": 100 * i, "reward": acc, "erase_rate": 0.0, "entropy": 0.1, "step": i} for i in range(1, 4)]}


def test_summarize_table_and_figure():
    results = [_fake("GRPO", s, a) for s, a in enumerate([0.4, 0.5, 0.6])] + [_fake("E3RL", 0, 0.55)]
    rows = {r["name"]: r for r in summarize(results)}
    assert rows["GRPO"]["seeds"] == 3 and rows["GRPO"]["avg_off"] == pytest.approx(0.5)
    assert rows["GRPO"]["avg_on"] == pytest.approx(0.6)
    table = markdown_table(list(rows.values()), {"avg_at_k_off": 0.45, "avg_at_k_on": 0.5}, 4)
    assert "| GRPO | 3 | 0.500 ± 0.248 |" in table and "| E3RL | 1 | 0.550 |" in table
    fig = figure(results)
    assert len(fig.data) == 2 * len(results)


def test_reproduce_script_end_to_end(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "reproduce.py"), "--root", str(tmp_path / "runs"),
           "--results", str(tmp_path / "res"), "--seeds", "1", "--no-ablations", "--only", "E3RL",
           "--token-budget", "300", "--eval-samples", "2", "--test-data", "synthetic:test?n=3", "--jobs", "1",
           "--threads", "1", "--set", "max_completion_length=48", "--set", "prompts_per_step=2",
           "--set", "num_generations=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "res" / "reproduction.json").read_text())
    (run,) = data["runs"]
    assert run["rollout_tokens"] >= 300 and 0 <= run["avg_at_k_off"] <= 1
    assert (tmp_path / "res" / "reproduction.html").read_text().count("plotly") > 0
    assert "| E3RL | 1 |" in (tmp_path / "res" / "reproduction-table.md").read_text()
    # finished runs are reused, not retrained
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    log = (tmp_path / "runs" / run["run_id"] / "commands.log").read_text().splitlines()
    assert sum(" train " in line for line in log if line.startswith("$ ")) == 1
