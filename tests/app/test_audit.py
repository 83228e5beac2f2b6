"""The audit's group lookup and what-if. What-if with unchanged settings gives back every decision the
generator recorded: the audit replays the same rule (generation.decision) in the same order over the
recorded attempts."""
from __future__ import annotations

from collections import Counter

import pytest
from conftest import make_config, median_score

from app import audit
from e3rl_core.events import group_traces, read_events, write_events
from e3rl_core.generation.generator import ErasableGenerator

PROMPTS = ["Compute 12 + 7 = ", "x"]

# name -> (settings, reasons the recorded traces must contain so that the check is not vacuous);
# "{thr}" is a fixed threshold at the median first-attempt score, so about half the segments erase.
CASES = {
    "fallback": (["threshold.policy=fixed", "threshold.value={thr}", "erase.budget=1"], {"fallback", "restored"}),
    "trace_cap": (["threshold.policy=fixed", "threshold.value={thr}", "erase.max_per_trace=1"], {"trace_cap"}),
    "e3rl": (["threshold.policy=e3rl", "threshold.kappa=0.0", "erase.budget=1"], {"above_threshold"}),
    "e3rl_cap": (["threshold.policy=e3rl", "threshold.kappa=-0.5", "erase.max_per_trace=1"], {"trace_cap"}),
}


def recorded(model, tok, tmp_path, settings):
    """Generate 2 groups of 4, write the events to JSONL and read them back (as the Audit tab does)."""
    gen = ErasableGenerator(model, tok, make_config(*settings))
    path = tmp_path / "trace.jsonl"
    write_events(gen.stream(PROMPTS, group_size=4, seed=5), path)
    traces = group_traces(read_events(path))
    return [[t for t in traces if t.start.group_id == g] for g in range(len(PROMPTS))]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_unchanged_settings_give_back_every_recorded_decision(tiny, tmp_path, case, temperature):
    model, tok = tiny
    extra = [f"sampling.temperature={temperature}"]
    settings, needed = CASES[case]
    if any("{thr}" in s for s in settings):
        thr = median_score(model, tok, PROMPTS[0], *extra)
        settings = [s.format(thr=thr) for s in settings]
    groups = recorded(model, tok, tmp_path, settings + extra)
    reasons = Counter(s.reason for g in groups for t in g for s in t.segments)
    assert needed <= set(reasons), f"the traces must exercise {needed}; got {dict(reasons)}"
    for group in groups:
        df = audit.what_if(group, {})
        assert len(df) == sum(len(t.segments) for t in group)
        assert not df["changed"].any()
        mismatched = df[(df["new_decision"] != df["decision"]) | (df["new_reason"] != df["reason"])]
        assert mismatched.empty, mismatched.to_string()
        assert (df["new_score"] - df["score"]).abs().max() < 1e-9
        thr = df[df["threshold"].notna()]
        assert df["new_threshold"].isna().equals(df["threshold"].isna())
        assert (thr["new_threshold"] - thr["threshold"]).abs().max() < 1e-9


def test_other_settings_rejudge_the_recorded_attempts(tiny_llama, tmp_path):
    model, tok = tiny_llama
    thr = median_score(model, tok, PROMPTS[0])
    group = recorded(model, tok, tmp_path, ["threshold.policy=fixed", f"threshold.value={thr}", "erase.budget=1"])[0]
    erased = sum(s.decision == "erase" for t in group for s in t.segments)
    never = audit.what_if(group, {"threshold.value": 1e9})
    assert (never["new_reason"] == "below_threshold").sum() == len(never) - (never["reason"] == "restored").sum()
    assert never["changed"].sum() == erased > 0
    off = audit.what_if(group, {"erase.enabled": False})
    assert set(off["new_decision"]) <= {"accept", "forced_accept"}
    grouped = audit.what_if(group, {"threshold.policy": "e3rl", "threshold.kappa": 0.5})  # waits for the group
    assert len(grouped) == len(never) and grouped["new_threshold"].notna().all()


def test_group_of_uses_fields_not_ids(tiny_llama):
    model, tok = tiny_llama
    gen = ErasableGenerator(model, tok, make_config("max_new_tokens=4"))
    # "my-run" group 1 and "my-run-1" group 0 give ids that share a dash-separated prefix
    a = gen.generate(["1 + 1 = ", "2 * 3 = "], group_size=2, seed=0, trace_prefix="my-run")
    b = gen.generate(["1 + 1 = ", "2 * 3 = "], group_size=2, seed=0, trace_prefix="my-run-1")
    traces = a + b
    assert audit.group_of(traces, a[2].trace_id) == a[2:]
    assert audit.group_of(traces, b[1].trace_id) == b[:2]
    assert audit.group_of(traces, b[3].trace_id) == b[2:]
