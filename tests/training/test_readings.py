"""The readings of how to train on healed rollouts (issue: why E3RL trains worse), each one
config field: R1 erased attempts with a negative advantage (``erased_advantage_delta``), R2 a
segment-local contrast (``contrast_advantage``), R3 erasure only where a group has no signal
(``erasure_when``); and the decision rule's floor on the group's spread (``threshold.sigma_floor``)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from e3rl_core.errors import ConfigError
from e3rl_core.events import group_traces, iter_events
from e3rl_core.generation.config import ThresholdConfig
from e3rl_core.generation.generator import ErasableGenerator
from e3rl_core.generation.thresholds import make_policy
from e3rl_core.models import load_model, recommended_config
from e3rl_core.overrides import apply_overrides
from e3rl_core.tasks.datasets import load_examples, render_prompt
from e3rl_core.training.config import TrainConfig
from e3rl_core.training.rollout import build_batch, healed_segments, kept_segments
from e3rl_core.training.trainer import Trainer

DEMO = str(Path(__file__).resolve().parents[2] / "checkpoints" / "arith-demo")
DATA = "synthetic:train?n=64&seed=3&difficulty=4"


def small(*extra: str) -> TrainConfig:
    base = TrainConfig.for_algo("e3rl", recommended_config(DEMO))
    return apply_overrides(base, ["num_generations=4", "prompts_per_step=2", "max_steps=2", "learning_rate=1e-3",
                                  "max_completion_length=96", "save_steps=2", "log_rollouts=0", *extra])


def test_sigma_floor_keeps_a_margin_over_a_group_that_writes_the_same_line():
    for floor, want in ((0.0, 0.5), (0.05, 0.55)):
        policy = make_policy(ThresholdConfig(policy="e3rl", kappa=1.0, sigma_floor=floor, warmup_segments=0))
        for row in range(4):
            policy.observe_first(row, 0, 0.5)  # four identical first attempts: sigma = 0
        assert policy.parts(0, 0, 0).baseline == pytest.approx(want)
    policy = make_policy(ThresholdConfig(policy="e3rl", kappa=1.0, sigma_floor=0.05, warmup_segments=0))
    for row, score in enumerate((0.0, 1.0, 0.0, 1.0)):  # sigma = 0.5 > floor: unchanged
        policy.observe_first(row, 0, score)
    assert policy.parts(0, 0, 0).baseline == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="sigma_floor"):
        ThresholdConfig(sigma_floor=-1)


@pytest.fixture(scope="module")
def erased_traces():
    model, tok = load_model(DEMO, device="cpu")
    cfg = apply_overrides(recommended_config(DEMO), ["threshold.policy=fixed", "threshold.value=0.02", "max_new_tokens=80"])
    question = load_examples("synthetic:test?n=1&difficulty=5")[0].question
    traces = ErasableGenerator(model, tok, cfg).generate([render_prompt(question, tok)], group_size=3, seed=0)
    assert sum(len(t.erasures) for t in traces)
    return traces


def test_healed_segments_are_the_kept_segments_that_replaced_an_erased_attempt(erased_traces):
    for tr in erased_traces:
        numbered = dict(zip([t.segment for t in tr.kept_tokens()], kept_segments(tr)))
        assert healed_segments(tr) == sorted({numbered[e.segment] for e in tr.erasures})
    batch = build_batch(erased_traces, [1.0, 0.0, 0.0], pad_id=0, erased_rows=True)
    for i, tr in enumerate(erased_traces):
        assert batch.healed[i].nonzero().squeeze(1).tolist() == healed_segments(tr)
    assert batch.healed[3:].sum() == 0  # erased rows mark nothing
    plain = build_batch(erased_traces, [1.0, 0.0, 0.0], pad_id=0)
    assert plain.healed.sum() == 0 and len(plain) == 3


def test_the_contrast_pairs_an_erased_attempt_with_its_replacement(erased_traces, tmp_path):
    """R2 against a reference computed by hand: every token's advantage = its segment's (uniform:
    A_i) + c on a healed segment; an erased row's tokens -c - delta*|A_parent|."""
    rewards = [1.0, 0.0, 0.0]
    batch = build_batch(erased_traces, rewards, pad_id=0, erased_rows=True)
    c, delta = 0.3, 0.1
    trainer = Trainer(small(f"contrast_advantage={c}", f"erased_advantage_delta={delta}", "allocation=uniform"),
                      model=DEMO, data=DATA, out=tmp_path / "r2")
    got = trainer._advantages(batch, torch.ones(len(batch), int(batch.n_segments.max())))
    a = trainer._rollout_advantages(batch)
    for i in range(len(batch)):
        mask = batch.completion_mask[i] > 0
        seg = batch.segment_ids[i][mask]
        if batch.parent[i] < 0:
            want = a[i] + c * torch.isin(seg, torch.tensor(healed_segments(erased_traces[i]))).float()
        else:
            want = torch.full_like(seg, -c - delta * abs(float(a[batch.parent[i]])), dtype=torch.float32)
        assert torch.allclose(got[i][mask], want, atol=1e-6), i
    # the contrast acts where the group's outcomes tie (A = 0 for every rollout)
    tied = build_batch(erased_traces, [1.0, 1.0, 1.0], pad_id=0, erased_rows=True)
    adv = trainer._advantages(tied, torch.ones(len(tied), int(tied.n_segments.max())))
    assert (adv[:3] > 0).any() and (adv[3:][tied.completion_mask[3:] > 0] == -c).all()


def test_erasure_only_where_a_group_has_no_signal(tmp_path):
    """R3: the first pass samples plainly; a group with no correct rollout is generated again with
    erasure (its traces replace it, both count as generated); a group with a correct one is not."""
    hard = "synthetic:train?n=64&seed=3&difficulty=5"  # most groups have no correct rollout
    trainer = Trainer(small("erasure_when=no_signal", "log_rollouts=1"), model=DEMO, data=hard, out=tmp_path / "r3")
    seen: list[bool] = []
    real = Trainer._heal

    def spy(self, groups, batch, prompts, seeds, rounds):
        before = [[t.trace_id for t in g] for g in groups]
        healed = real(self, groups, batch, prompts, seeds, rounds)
        for g, ids in zip(groups, before):
            ok = any((self._reward(t.done.text, t.start.gold) or 0) > 0 for t in g)
            seen.append([t.trace_id for t in g] != ids)
            if [t.trace_id for t in g] == ids:  # kept: had a correct rollout, generated without erasure
                assert ok and not any(t.erasures for t in g)
                assert all(not t.start.config["erase"]["enabled"] for t in g)
            else:  # healed: generated with erasure, the same seeds
                assert all(t.start.config["erase"]["enabled"] for t in g)
        return healed

    import types
    trainer._heal = types.MethodType(spy, trainer)
    for _ in range(2):
        row = trainer.train_step()
        assert row["groups_healed"] == sum(seen[-2:])
    assert len(seen) == 4 and any(seen)  # every group seen, at least one healed
    # the log holds the first rollout of each step and, where a group was healed, its first healed one
    logged = group_traces(iter_events(tmp_path / "r3" / "rollouts.jsonl"))
    for step in (1, 2):
        traces = [t for t in logged if t.start.train_step == step]
        assert not traces[0].start.config["erase"]["enabled"]
        healed = any(seen[2 * (step - 1): 2 * step])
        assert len(traces) == 1 + healed and all(t.start.config["erase"]["enabled"] for t in traces[1:])
    with pytest.raises(ConfigError, match="erasure_when=no_signal"):
        apply_overrides(TrainConfig.for_algo("grpo"), ["erasure_when=no_signal"])


def test_zero_variance_counts_groups_whose_rewards_are_all_equal(erased_traces):
    from e3rl_core.training.rollout import zero_variance_counts

    # the fixture is one group of 3 (one prompt, one generate call)
    assert zero_variance_counts(erased_traces, [1.0, 0.0, 0.0]) == {"groups": 1.0, "zero_variance": 0.0}
    assert zero_variance_counts(erased_traces, [1.0, 1.0, None]) == {"groups": 1.0, "zero_variance": 1.0}
    assert zero_variance_counts([], []) == {"groups": 0.0, "zero_variance": 0.0}
