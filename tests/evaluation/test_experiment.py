"""The reproduction's statistics and outputs, and a miniature end-to-end run of scripts/reproduce.py."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from e3rl_core.errors import E3RLError
from e3rl_core.evaluation.curves import learning_figure
from e3rl_core.evaluation.experiment import (
    RunSpec, Settings, markdown_table, mean_ci, paired_text, plan, run_one, summarize)

ROOT = Path(__file__).resolve().parents[2]


def test_mean_ci_by_hand():
    m, h = mean_ci([0.4, 0.5, 0.6])
    assert m == pytest.approx(0.5)
    assert h == pytest.approx(4.303 * 0.1 / math.sqrt(3), rel=1e-4)  # t(0.975, 2) * sd / sqrt(n)
    assert mean_ci([0.7]) == (0.7, 0.0)


def test_plan_has_three_algorithms_seeds_and_ablations():
    specs = plan(seeds=5, ablation_seeds=2)
    main = [s for s in specs if s.kind == "main"]
    assert sorted({s.name for s in main}) == ["DAPO", "E3RL", "GRPO"]
    assert all(sum(s.name == n for s in main) == 5 for n in ("GRPO", "DAPO", "E3RL"))
    ablations = {s.name: s.overrides for s in specs if s.kind == "ablation"}
    assert ablations["E3RL w/o base uncertainty"] == ["no_base_uncertainty=true"]
    assert ablations["E3RL Erase@1"] == ["generation.erase.budget=1"]
    assert ablations["E3RL trained on erased attempts"] == ["erased_advantage_delta=1.0"]
    assert sum(s.kind == "ablation" for s in specs) == 2 * len(ablations)
    assert len({s.run_id for s in specs}) == len(specs)
    # the main comparison first, seed by seed across its rows, so a comparison cut short is balanced
    assert [s.kind for s in specs] == sorted((s.kind for s in specs), key=["main", "ablation"].index)
    assert [s.seed for s in main] == sorted(s.seed for s in main)


def test_settings_refuse_impossible_eval_points():
    with pytest.raises(E3RLError, match="eval_points"):
        Settings(token_budget=3, eval_points=4)
    with pytest.raises(E3RLError, match="eval_points"):
        Settings(eval_points=0)


def test_settings_refuse_a_decaying_schedule_split_into_legs(tmp_path):
    with pytest.raises(E3RLError, match="decays to 0 at each leg's budget.*--eval-points 1"):
        Settings(common=["lr_scheduler_type=cosine"])
    assert Settings(common=["lr_scheduler_type=cosine"], eval_points=1).eval_points == 1
    assert Settings(common=["lr_scheduler_type=constant"]).eval_points == 4
    # a run's own overrides too, before anything is trained
    spec = RunSpec("cos", "grpo", 0, ["lr_scheduler_type=linear"])
    with pytest.raises(E3RLError, match="lr_scheduler_type=linear decays"):
        run_one(spec, Settings(), tmp_path)
    assert not (tmp_path / spec.run_id).exists()


def _fake(name: str, seed: int, acc: float) -> dict:
    return {"spec": {"name": name, "algo": "grpo", "seed": seed, "overrides": [], "kind": "main"},
            "run_id": RunSpec(name, "grpo", seed).run_id, "steps": 10, "rollout_tokens": 1000 + seed,
            "train_seconds": 60.0, "avg_at_k_off": acc, "avg_at_k_on": acc + 0.1,
            "evals": [{"rollout_tokens": 500, "avg_at_k": acc - 0.05}, {"rollout_tokens": 1000 + seed, "avg_at_k": acc}],
            "curve": [{"tokens": 100 * i, "reward": acc, "erase_rate": 0.0, "entropy": 0.1, "step": i} for i in range(1, 4)]}


def test_summarize_table_and_figure():
    results = [_fake("GRPO", s, a) for s, a in enumerate([0.4, 0.5, 0.6])] + [_fake("E3RL", 0, 0.55)]
    base = {"avg_at_k_off": 0.45, "avg_at_k_on": 0.5}
    rows = {r["name"]: r for r in summarize(results, base)}
    assert rows["GRPO"]["seeds"] == 3 and rows["GRPO"]["avg_off"] == pytest.approx(0.5)
    assert rows["GRPO"]["avg_on"] == pytest.approx(0.6)
    assert [p["mean"] for p in rows["GRPO"]["curve"]] == pytest.approx([0.45, 0.45, 0.5])
    assert rows["E3RL"]["vs_ref"] == {"mean": pytest.approx(0.15), "ci": 0.0, "pairs": 1}  # paired with GRPO seed 0
    table = markdown_table(list(rows.values()), base, 4)
    assert "| GRPO | 3 | 0.500 ± 0.248 | - | 0.450 → 0.450 → 0.500 |" in table
    assert "| E3RL | 1 | 0.550 | +0.150 (1 pair) |" in table
    fig = learning_figure(results, base)
    names = {t.name for t in fig.data if t.name}
    assert names == {"GRPO (3 seeds)", "E3RL (1 seed)"}
    assert "| ablation |" not in table
    band = [t for t in fig.data if t.fill == "toself"]
    assert len(band) == 1  # one band: GRPO's (E3RL has a single seed)
    # the band is the mean ± the t half-width at each point
    half = mean_ci([0.4, 0.5, 0.6])[1]
    assert max(band[0].y) == pytest.approx(0.5 + half)


def test_ablations_get_their_own_table_paired_with_e3rl_and_with_grpo():
    def ablation(seed: int, acc: float) -> dict:
        r = _fake("E3RL Erase@1", seed, acc)
        r["spec"]["kind"] = "ablation"
        return r

    results = ([_fake("GRPO", s, a) for s, a in enumerate([0.50, 0.52])] + [_fake("E3RL", s, a) for s, a in
               enumerate([0.45, 0.47])] + [ablation(0, 0.48), ablation(1, 0.51)])
    rows = {r["name"]: r for r in summarize(results, None)}
    assert rows["E3RL"]["vs_method"] is None
    vs_e3rl, vs_grpo = rows["E3RL Erase@1"]["vs_method"], rows["E3RL Erase@1"]["vs_ref"]
    assert vs_e3rl["mean"] == pytest.approx(0.035) and vs_e3rl["pairs"] == 2
    assert vs_e3rl["ci"] == pytest.approx(mean_ci([0.03, 0.04])[1])
    assert vs_grpo["mean"] == pytest.approx(-0.015)
    main, abl = markdown_table(list(rows.values()), None, 4).split("\n\n")
    assert "Erase@1" not in main and "| E3RL | 2 | 0.460 ± " in main
    assert abl.startswith("| ablation | seeds | Avg@4, plain sampling at test | vs E3RL, seed-paired | vs GRPO, seed-paired |")
    assert f"| E3RL Erase@1 | 2 | 0.495 ± {mean_ci([0.48, 0.51])[1]:.3f} | +0.035 ± {vs_e3rl['ci']:.3f} (2 pairs) | " \
           f"-0.015 ± {vs_grpo['ci']:.3f} (2 pairs) |" in abl


def test_reproduce_script_end_to_end(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "reproduce.py"), "--root", str(tmp_path / "runs"),
           "--results", str(tmp_path / "res"), "--seeds", "1", "--no-ablations", "--only", "E3RL",
           "--token-budget", "600", "--eval-points", "2", "--eval-samples", "2", "--test-data", "synthetic:test?n=3",
           "--jobs", "1", "--threads", "1", "--set", "prompts_per_step=2", "--set", "num_generations=2",
           "--set", "max_completion_length=48"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "res" / "reproduction.json").read_text())
    (run,) = data["runs"]
    assert run["rollout_tokens"] >= 600 and 0 <= run["avg_at_k_off"] <= 1
    # two legs: evaluated at half the budget and at the end, the second resuming the first
    half, end = run["evals"]
    assert 300 <= half["rollout_tokens"] < end["rollout_tokens"] and half["step"] < end["step"] == run["steps"]
    assert end["avg_at_k"] == run["avg_at_k_off"]
    assert data["base"]["slips_off"]["samples"] == 6 and run["slips_off"]["samples"] == 6
    # every command the run ran, seeds included, to rerun it by hand
    train, first_eval = run["commands"][:2]
    assert train.startswith("python -m e3rl_core.cli train ") and "--seed 0 " in train and "--out ROOT/e3rl-s0/run" in train
    assert first_eval.startswith("python -m e3rl_core.cli eval --model ROOT/e3rl-s0/run/checkpoint-")
    assert len([c for c in run["commands"] if " train " in c]) == 2
    assert data["base_commands"][0].startswith("python -m e3rl_core.cli eval --model ")
    assert (tmp_path / "res" / "reproduction.html").read_text().count("plotly") > 0
    table = (tmp_path / "res" / "reproduction-table.md").read_text()
    assert "| E3RL | 1 |" in table and "slips per 100 steps" in table
    # the training dynamics, from the run's log: E3RL erases, so its erased share is a number
    assert re.search(r"\| E3RL \| 1 \| [0-9.]+ → [0-9.]+ \| [0-9.]+ → [0-9.]+ \| [0-9.]+ → [0-9.]+ \| [0-9.]+ → [0-9.]+ \|",
                     table.split("Training dynamics")[1])
    run_dir = tmp_path / "runs" / run["run_id"]

    def trains() -> int:
        log = (run_dir / "commands.log").read_text().splitlines()
        return sum(" train " in line for line in log if line.startswith("$ "))

    assert trains() == 2 and "--resume" in [l for l in (run_dir / "commands.log").read_text().splitlines()
                                           if " train " in l][1]
    # finished runs are reused, not retrained
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert trains() == 2
    # a run stopped after its training but before its last evaluations goes on from there
    for name in ("result.json", "eval-off-2.json", "eval-on.json"):
        (run_dir / name).unlink()
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert trains() == 2 and json.loads((run_dir / "result.json").read_text())["avg_at_k_off"] == run["avg_at_k_off"]
    # the outputs can be written from the finished runs alone, training nothing
    table = (tmp_path / "res" / "reproduction-table.md").read_text()
    (tmp_path / "res" / "reproduction-table.md").unlink()
    again = subprocess.run(cmd + ["--report-only"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert trains() == 2 and (tmp_path / "res" / "reproduction-table.md").read_text() == table
    # the runs under a root were made with its settings; other settings are refused
    other = subprocess.run(cmd + ["--learning-rate", "1e-3"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert other.returncode == 2 and "other settings" in other.stderr and "learning_rate" in other.stderr


def _script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("reproduce_script", ROOT / "scripts" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_efficiency_table_lists_every_run_against_grpo():
    from e3rl_core.evaluation.curves import sample_efficiency

    results = [_fake("GRPO", s, a) for s, a in enumerate([0.5, 0.52])] + [_fake("DAPO", s, 0.6) for s in range(2)]
    base = {"avg_at_k_off": 0.45, "avg_at_k_on": 0.5}
    eff = sample_efficiency(results, base, name="DAPO")
    # DAPO's mean curve: 0.45 at 0 tokens, 0.55 at 500, 0.6 at ~1000; GRPO's final 0.51 is reached at 300 tokens
    assert eff["ratio"] == pytest.approx(300 / 1000.5)
    table = _script().efficiency_table([eff])
    assert "| run | seeds | tokens to reach GRPO's final 0.510, × GRPO's |" in table
    assert f"| DAPO | 2 | {eff['ratio']:.2f} | " in table and "| 100% |" in table
    assert _script().efficiency_table([]) == ""


def test_equal_steps_reads_grpos_curve_at_each_runs_step_count():
    from e3rl_core.evaluation.curves import at_equal_steps, interpolate

    assert interpolate([(0, 0.4), (10, 0.5), (20, 0.7)], 15) == pytest.approx(0.6)
    assert interpolate([(0, 0.4), (10, 0.5)], 11) is None  # never extrapolated
    base = {"avg_at_k_off": 0.4, "avg_at_k_on": 0.5}

    def run(name: str, seed: int, steps: int, final: float, grpo_mid: float) -> dict:
        return {**_fake(name, seed, final), "steps": steps,
                "evals": [{"step": steps // 2, "rollout_tokens": 500, "avg_at_k": grpo_mid},
                          {"step": steps, "rollout_tokens": 1000, "avg_at_k": final}]}

    results = [run("GRPO", 0, 20, 0.6, 0.5), run("GRPO", 1, 20, 0.7, 0.5),
               run("E3RL", 0, 15, 0.55, 0.45), run("E3RL", 1, 15, 0.58, 0.45), run("Long", 0, 30, 0.9, 0.5)]
    vs = at_equal_steps(results, base)
    # GRPO seed 0 at step 15: 0.5 + (0.6 - 0.5) / 2 = 0.55; seed 1: 0.5 + (0.7 - 0.5) / 2 = 0.6
    assert vs["E3RL"]["mean"] == pytest.approx(((0.55 - 0.55) + (0.58 - 0.6)) / 2) and vs["E3RL"]["pairs"] == 2
    assert "Long" not in vs  # more steps than GRPO took: no reading of its curve there
    table = _script().steps_table(results, base)
    assert f"| E3RL | 15 | {paired_text(vs['E3RL'])} |" in table


def test_slips_table_pairs_with_grpo_and_measures_the_change_from_the_start():
    def run(name: str, seed: int, rate: float) -> dict:
        return {**_fake(name, seed, 0.5), "slips_off": {"slips_per_100_steps": rate, "samples_with_slip": 0.5}}

    results = [run("GRPO", 0, 17.0), run("GRPO", 1, 18.0), run("E3RL", 0, 19.0), run("E3RL", 1, 21.0)]
    base = {"slips_off": {"slips_per_100_steps": 18.0, "samples_with_slip": 0.55}}
    table = _script().slips_table(results, base)
    half = mean_ci([19.0, 21.0])[1]
    assert f"| E3RL | 2 | 20.00 ± {half:.2f} | +2.00 ± {half:.2f} | +2.50 ± {mean_ci([2.0, 3.0])[1]:.2f} (2 pairs) |" in table
    assert "| GRPO | 2 | 17.50 ± " in table and "| starting model | - | 18.00 | - | - | 0.550 |" in table


def test_the_readings_plan_names_each_reading_one_field_apart():
    from e3rl_core.evaluation.experiment import READINGS, readings_plan
    from e3rl_core.overrides import apply_overrides
    from e3rl_core.training.config import TrainConfig

    specs = readings_plan(seeds=3, more=("GRPO", "E3RL R0"), more_seeds=5)
    count = {name: sum(s.name == name for s in specs) for name, _, _ in READINGS}
    assert count["GRPO"] == count["E3RL R0"] == 5 and all(n == 3 for k, n in count.items() if k not in ("GRPO", "E3RL R0"))
    assert [s.seed for s in specs[:len(READINGS)]] == [0] * len(READINGS)  # seed by seed across the rows
    for name, algo, overrides in READINGS:  # each row is a valid config, one field from its algorithm's preset
        cfg = apply_overrides(TrainConfig.for_algo(algo), overrides)
        assert len(overrides) <= 1 and cfg.algo == algo, name


def test_pearson_matches_the_standard_library_and_brackets_r():
    import statistics

    from e3rl_core.evaluation.curves import pearson

    xs, ys = [0.1, 0.4, 0.2, 0.5, 0.3, 0.45], [0.50, 0.44, 0.49, 0.45, 0.47, 0.43]
    c = pearson(xs, ys)
    assert c["r"] == pytest.approx(statistics.correlation(xs, ys)) and c["n"] == 6
    assert -1 <= c["low"] < c["r"] < c["high"] <= 1
    assert pearson(xs[:3], ys[:3]) is None and pearson([1, 1, 1, 1], [1, 2, 3, 4]) is None
