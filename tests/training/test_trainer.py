"""The trainer end to end on the shipped demo model: rollouts, loss masks, checkpoints, resume, errors."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from e3rl_core.cli import main as cli_main
from e3rl_core.errors import ConfigError, ModelLoadError
from e3rl_core.events import read_events
from e3rl_core.generation.generator import ErasableGenerator
from e3rl_core.models import load_model, recommended_config
from e3rl_core.overrides import apply_overrides
from e3rl_core.tasks.datasets import DataError, load_examples, render_prompt
from e3rl_core.training import checkpoint as ckpt
from e3rl_core.training import distributed
from e3rl_core.training.config import TrainConfig
from e3rl_core.training.losses import LOSSES
from e3rl_core.training.rollout import build_batch, erased_attempts, kept_segments
from e3rl_core.training.trainer import Trainer, TrainingDivergedError

DEMO = str(Path(__file__).resolve().parents[2] / "checkpoints" / "arith-demo")
DATA = "synthetic:train?n=64&seed=3&difficulty=4"


def small(algo: str = "e3rl", *extra: str) -> TrainConfig:
    base = TrainConfig.for_algo(algo, recommended_config(DEMO))
    return apply_overrides(base, ["num_generations=4", "prompts_per_step=2", "max_steps=4", "learning_rate=1e-3",
                                  "max_completion_length=128", "save_steps=2", "log_rollouts=1", *extra])


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / f"checkpoint-{step:06d}" / "model.safetensors")


def test_rollout_batch_trains_on_kept_tokens_only():
    model, tok = load_model(DEMO, device="cpu")
    cfg = apply_overrides(recommended_config(DEMO), ["threshold.policy=fixed", "threshold.value=0.02", "max_new_tokens=80"])
    question = load_examples("synthetic:test?n=1&difficulty=5")[0].question
    traces = ErasableGenerator(model, tok, cfg).generate([render_prompt(question, tok)], group_size=3, seed=0)
    assert any(t.erasures for t in traces), "the low threshold should erase something"
    batch = build_batch(traces, [1.0, 0.0, None], pad_id=0)
    for i, tr in enumerate(traces):
        p, done = tr.start.prompt_ids, tr.done
        n = len(p) + len(done.token_ids)
        assert batch.input_ids[i, :n].tolist() == p + done.token_ids
        assert batch.completion_mask[i, : len(p)].sum() == 0 and batch.completion_mask[i, n:].sum() == 0
        assert batch.completion_mask[i, len(p):n].sum() == len(done.token_ids)
        assert batch.segment_ids[i, len(p):n].tolist() == kept_segments(tr)
        erased_steps = {(e.segment, e.attempt) for e in tr.erasures}
        kept = [t.token_id for t in tr.tokens if (t.segment, t.attempt) not in erased_steps]
        assert kept == done.token_ids  # erased attempts never reach the loss
    assert torch.isnan(batch.rewards[2])


def test_groups_of_separate_generate_calls_stay_apart():
    """Dynamic sampling draws several rounds; group_id restarts at 0 in each, groups must not merge."""
    model, tok = load_model(DEMO, device="cpu")
    gen = ErasableGenerator(model, tok, apply_overrides(recommended_config(DEMO), ["max_new_tokens=8"]))
    prompt = render_prompt("a = 1 + 2. What is a?", tok)
    a = gen.generate([prompt], group_size=2, seed=0, trace_prefix="r0")
    b = gen.generate([prompt], group_size=2, seed=5, trace_prefix="r1")
    assert [t.start.group_id for t in a + b] == [0, 0, 0, 0]
    assert build_batch(a + b, [1.0, 0.0, 1.0, 1.0], pad_id=0).group_ids.tolist() == [0, 0, 1, 1]


def test_train_writes_logs_checkpoints_and_rollouts(tmp_path):
    out = tmp_path / "run"
    result = Trainer(small(), model=DEMO, data=DATA, out=out).train()
    assert result.status == "finished" and result.step == 4
    rows = [json.loads(l) for l in (out / ckpt.LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("reward_mean", "reward_std", "accuracy", "entropy_mean", "erase_rate", "tokens_generated",
                "tokens_kept", "tokens_erased", "clip_ratio", "loss", "kl", "grad_norm", "step_time",
                "zero_variance_groups"):
        assert all(key in r for r in rows), key
    assert all(0.0 <= r["zero_variance_groups"] <= 1.0 for r in rows)
    assert all(r["tokens_generated"] == r["tokens_kept"] + r["tokens_erased"] for r in rows)
    events = read_events(out / ckpt.ROLLOUTS_FILE)
    assert {e.kind for e in events} >= {"start", "token", "segment", "done"}
    starts = [e for e in events if e.kind == "start"]  # log_rollouts=1: the first rollout of each step
    assert [(s.train_step, s.batch, s.group_id, s.group_index) for s in starts] == [
        (k, f"s{k}r0d0", 0, 0) for k in (1, 2, 3, 4)]
    assert [p.name for _, p in ckpt.checkpoints(out)] == ["checkpoint-000002", "checkpoint-000004"]
    run = json.loads((out / ckpt.RUN_FILE).read_text())
    assert run["status"] == "finished" and run["last_checkpoint"] == "checkpoint-000004"
    # plain transformers loads a checkpoint; the generation settings travel with it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(out / "checkpoint-000004")
    AutoTokenizer.from_pretrained(out / "checkpoint-000004")
    assert torch.equal(m.state_dict()["model.embed_tokens.weight"], weights(out, 4)["model.embed_tokens.weight"])
    assert recommended_config(str(out / "checkpoint-000004")).erase.enabled
    # training moved the weights
    init = load_file(Path(DEMO) / "model.safetensors")
    assert not torch.equal(init["model.embed_tokens.weight"], weights(out, 4)["model.embed_tokens.weight"])


def test_first_iteration_ratio_is_one_and_second_clips(tmp_path):
    rows = []
    cfg = small("grpo", "num_iterations=3", "max_steps=2", "learning_rate=0.05", "epsilon=0.01")
    Trainer(cfg, model=DEMO, data=DATA, out=tmp_path / "r", callbacks=[rows.append]).train()
    assert any(r["clip_ratio"] > 0 for r in rows)  # later passes move the ratio past a tight clip


def test_resume_equals_uninterrupted(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    Trainer(small(), model=DEMO, data=DATA, out=full).train()
    Trainer(small("e3rl", "max_steps=2"), model=DEMO, data=DATA, out=part).train()
    result = Trainer(small(), model=DEMO, data=DATA, out=part, resume=True).train()
    assert result.step == 4
    a, b = weights(full, 4), weights(part, 4)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    la = [json.loads(l) for l in (full / ckpt.LOG_FILE).read_text().splitlines()]
    lb = [json.loads(l) for l in (part / ckpt.LOG_FILE).read_text().splitlines()]
    assert [r["tokens_generated"] for r in la] == [r["tokens_generated"] for r in lb]
    # the killed-and-resumed run's rollouts file keeps each step once (steps after the checkpoint dropped)
    assert [e.train_step for e in read_events(part / ckpt.ROLLOUTS_FILE) if e.kind == "start"] == [1, 2, 3, 4]
    # resuming a finished run says so and changes nothing
    again = Trainer(small(), model=DEMO, data=DATA, out=part, resume=True).train()
    assert again.status == "already_finished" and again.step == 4
    assert torch.equal(weights(part, 4)["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_cli_train_resume_finished_says_so(tmp_path, capsys):
    out = tmp_path / "c"
    args = ["train", "--model", DEMO, "--data", DATA, "--algo", "grpo", "--out", str(out), "--steps", "1",
            "--group-size", "2", "--prompts-per-step", "2", "--quiet", "--set", "max_completion_length=30"]
    assert cli_main(args) == 0
    assert cli_main(["train", "--out", str(out), "--resume", "--quiet"]) == 0
    assert "already finished at step 1" in capsys.readouterr().err
    assert cli_main(args) == 2  # the directory holds a run now
    assert "--resume to continue it, --overwrite to replace it" in capsys.readouterr().err
    assert cli_main(args + ["--overwrite"]) == 0
    assert cli_main(["train", "--out", str(out), "--resume", "--quiet", "--group-size", "4"]) == 2
    assert "only --steps and --token-budget may change" in capsys.readouterr().err


def test_cli_train_in_process_leaves_the_callers_signal_handlers(tmp_path):
    # A forked app worker inherits the handlers of the process it came from: a stop-after-this-step
    # SIGTERM handler left behind made multiprocessing's exit-time terminate + join wait forever.
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    args = ["train", "--model", DEMO, "--data", DATA, "--algo", "grpo", "--out", str(tmp_path / "s"), "--steps", "1",
            "--group-size", "2", "--prompts-per-step", "2", "--quiet", "--set", "max_completion_length=16"]
    assert cli_main(args) == 0
    assert {s: signal.getsignal(s) for s in before} == before


def test_out_dir_guards(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ckpt.RunDirError, match="holds no e3rl run"):
        Trainer(small(), model=DEMO, data=DATA, out=other, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"
    with pytest.raises(ckpt.RunDirError, match="nothing to resume"):
        Trainer(small(), model=DEMO, data=DATA, out=tmp_path / "new", resume=True)


def test_bad_configs_and_data(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="at least 2 rollouts"):
        Trainer(small("grpo", "num_generations=1"), model=DEMO, data=DATA, out=tmp_path / "g")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError):
        Trainer(small(), model=DEMO, data=f"jsonl:{empty}?question=q&answer=a", out=tmp_path / "e")
    with pytest.raises(ModelLoadError, match="not found"):
        Trainer(small(), model=str(tmp_path / "no-model"), data=DATA, out=tmp_path / "m")
    assert not (tmp_path / "m").exists()  # nothing left behind
    monkeypatch.setattr(distributed, "init", lambda device=None: distributed.Dist(rank=0, world=2))
    with pytest.raises(ConfigError, match="does not divide across 2 processes"):
        Trainer(small("e3rl", "prompts_per_step=3"), model=DEMO, data=DATA, out=tmp_path / "d")


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "nan"
    real = LOSSES.get("dapo")
    calls = {"n": 0}

    def flaky(per_tok, mask, norm):
        calls["n"] += 1
        loss = real(per_tok, mask, norm)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setitem(LOSSES._items, "dapo", flaky)
    with pytest.raises(TrainingDivergedError, match="step 3") as err:
        Trainer(small("e3rl", "save_steps=1", "save_total_limit=null"), model=DEMO, data=DATA, out=out).train()
    assert err.value.step == 3
    assert [s for s, _ in ckpt.checkpoints(out)] == [1, 2]
    run = json.loads((out / ckpt.RUN_FILE).read_text())
    assert run["status"] == "failed" and "step 3" in run["message"]


def test_killed_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "kill"
    Trainer(small("e3rl", "max_steps=2"), model=DEMO, data=DATA, out=out).train()
    before = weights(out, 2)
    original = torch.save

    def dying(obj, path, *a, **k):
        raise KeyboardInterrupt  # the process dies while writing the next checkpoint

    monkeypatch.setattr(torch, "save", dying)
    with pytest.raises(KeyboardInterrupt):
        Trainer(small("e3rl", "max_steps=4"), model=DEMO, data=DATA, out=out, resume=True).train()
    monkeypatch.setattr(torch, "save", original)
    assert [s for s, _ in ckpt.checkpoints(out)] == [2]
    assert not list(out.glob(".tmp-checkpoint-*"))
    assert torch.equal(weights(out, 2)["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    # a leftover half-written directory (SIGKILL gives no chance to clean) is ignored by resume
    (out / ".tmp-checkpoint-000004-x").mkdir()
    result = Trainer(small("e3rl", "max_steps=4"), model=DEMO, data=DATA, out=out, resume=True).train()
    assert result.step == 4 and not list(out.glob(".tmp-checkpoint-*"))


def test_stop_request_ends_cleanly_with_checkpoint(tmp_path):
    out = tmp_path / "stop"
    rows = []
    result = Trainer(small("grpo", "max_steps=10", "save_steps=100"), model=DEMO, data=DATA, out=out,
                     callbacks=[rows.append], should_stop=lambda: len(rows) >= 2).train()
    assert result.status == "stopped" and result.step == 2
    assert json.loads((out / ckpt.RUN_FILE).read_text())["status"] == "stopped"
    assert [s for s, _ in ckpt.checkpoints(out)] == [2]


def test_algo_presets_and_ablations():
    g, d, e = (TrainConfig.for_algo(a) for a in ("grpo", "dapo", "e3rl"))
    assert (g.loss_type, g.epsilon_high, g.generation.erase.enabled) == ("grpo", None, False)
    assert (d.loss_type, d.epsilon_high, d.dynamic_sampling, d.generation.erase.enabled) == ("dapo", 0.28, True, False)
    assert (e.allocation, e.generation.erase.enabled) == ("causal_attention", True)
    ab = apply_overrides(e, ["no_base_uncertainty=true", "no_group_dynamics=true", "no_causal_allocation=true"])
    gen = ab.effective_generation()
    assert gen.score.weight_base == 0 and gen.threshold.policy == "zscore" and ab.effective_allocation == "uniform"
    with pytest.raises(ConfigError, match="loss type"):
        apply_overrides(e, ["loss_type=ppo"])
    assert TrainConfig.from_dict(e.to_dict()) == e


def test_erased_attempts_get_negative_advantage_when_delta_set(tmp_path):
    model, tok = load_model(DEMO, device="cpu")
    cfg = apply_overrides(recommended_config(DEMO), ["threshold.policy=fixed", "threshold.value=0.02", "max_new_tokens=80"])
    question = load_examples("synthetic:test?n=1&difficulty=5")[0].question
    traces = ErasableGenerator(model, tok, cfg).generate([render_prompt(question, tok)], group_size=3, seed=0)
    n_erased = sum(len(t.erasures) for t in traces)
    assert n_erased
    batch = build_batch(traces, [1.0, 0.0, 0.0], pad_id=0, erased_rows=True)
    assert len(batch) == 3 + n_erased and batch.parent[:3].tolist() == [-1, -1, -1]
    row = 3  # the first erased attempt of the first trace that erased
    parent = int(batch.parent[row])
    tr = traces[parent]
    e = tr.erasures[0]
    erased = [t.token_id for t in tr.tokens if (t.segment, t.attempt) == (e.segment, e.attempt)]
    ids = tr.start.prompt_ids + tr.done.token_ids[: e.start] + erased
    assert batch.input_ids[row, : len(ids)].tolist() == ids
    assert batch.completion_mask[row].sum() == len(erased)  # only the erased tokens are trained on
    assert torch.isnan(batch.rewards[row])
    # the trainer turns them into -delta * |A_parent|
    trainer = Trainer(small("e3rl", "erased_advantage_delta=0.1", "allocation=uniform"), model=DEMO, data=DATA,
                      out=tmp_path / "d")
    adv = trainer._advantages(batch, torch.ones(len(batch), int(batch.n_segments.max())))
    a_parent = float(adv[parent][batch.completion_mask[parent] > 0][0])
    got = adv[row][batch.completion_mask[row] > 0]
    assert torch.allclose(got, torch.full_like(got, -0.1 * abs(a_parent)))


def test_an_erased_attempt_restored_by_the_fallback_is_not_penalized(tiny_llama):
    """With the fallback, an erased attempt can come back as the kept one; it must then not also
    appear as an erased row (it would be both reinforced and penalized)."""
    from e3rl_core.generation.config import GenerationConfig

    model, tok = tiny_llama
    cfg = apply_overrides(GenerationConfig(), ["threshold.policy=fixed", "threshold.value=-1", "erase.budget=2",
                                               "erase.max_per_trace=100", "erase.fallback=best", "max_new_tokens=16"])
    trace = ErasableGenerator(model, tok, cfg).generate("Compute 12 + 7 = ", seed=0)[0]
    restored = [(s.segment, s.restored_from) for s in trace.segments if s.reason == "restored"]
    assert restored  # every attempt is erased, so the best one comes back
    rows = erased_attempts(trace)
    erased = {(e.segment, e.attempt) for e in trace.erasures}
    assert len(rows) == len(erased - set(restored)) > 0
    kept = trace.done.token_ids
    for seg, att in restored:  # the restored tokens are the kept ones, and only there
        ids = [t.token_id for t in trace.tokens if (t.segment, t.attempt) == (seg, att)]
        e = next(x for x in trace.erasures if (x.segment, x.attempt) == (seg, att))
        assert kept[e.start: e.start + len(ids)] == ids
        assert (kept[: e.start], ids) not in rows


def test_checkpoints_are_flushed_to_disk_before_the_rename(tmp_path, tiny_llama, monkeypatch):
    model, tok = tiny_llama
    synced: list[Path] = []
    real = ckpt._fsync
    monkeypatch.setattr(ckpt, "_fsync", lambda p: (synced.append(Path(p)), real(p)))
    final = ckpt.save_checkpoint(tmp_path, 3, model, tok, {"step": 3}, {"extra.json": {"a": 1}}, keep=None)
    files = sorted(p.relative_to(final) for p in final.rglob("*") if p.is_file())
    tmp_dir = next(p for p in synced if p.name.startswith(".tmp-checkpoint-"))  # written there, then renamed
    names = sorted(p.relative_to(tmp_dir) for p in synced if tmp_dir in p.parents)
    assert names == files and ckpt.STATE_FILE in {p.name for p in files}  # every file, before the rename
    assert synced[-1] == tmp_path  # then the directory holding the rename


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_decays_over_the_token_budget_when_it_ends_the_run(tmp_path, kind):
    """A run ended by rollout_token_budget (max_steps left large) decays to 0 at the budget, not at a
    max_steps it never reaches: each step's logged lr (the next step's) follows the larger progress."""
    import math

    rows: list[dict] = []
    cfg = small("grpo", f"lr_scheduler_type={kind}", "max_steps=1000", "rollout_token_budget=1200",
                "learning_rate=1e-3", "save_steps=1000")
    Trainer(cfg, model=DEMO, data=DATA, out=tmp_path / kind, callbacks=[rows.append]).train()
    assert len(rows) >= 2 and rows[-1]["rollout_tokens_total"] >= 1200 > rows[-2]["rollout_tokens_total"]
    for row in rows:
        progress = max(row["step"] / 1000, min(1.0, row["rollout_tokens_total"] / 1200))
        factor = 1 - progress if kind == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        assert row["lr"] == pytest.approx(1e-3 * factor, abs=1e-12), row["step"]
    assert rows[-1]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_a_run_interrupted_before_its_first_step_reads_stopped_not_failed(tmp_path, monkeypatch):
    out = tmp_path / "early"
    trainer = Trainer(small("grpo", "max_steps=2"), model=DEMO, data=DATA, out=out)

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    run = json.loads((out / ckpt.RUN_FILE).read_text())
    assert run["status"] == "stopped" and run["message"] == "interrupted before its first step"
