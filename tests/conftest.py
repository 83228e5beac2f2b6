"""Shared fixtures: tiny random-init Llama, Qwen2 and Qwen3 models built from configs (no download)."""
from __future__ import annotations

import pytest
import torch

from e3rl_core.events import SegmentEvent
from e3rl_core.generation.config import GenerationConfig
from e3rl_core.generation.generator import ErasableGenerator
from e3rl_core.models import random_model, save_random_model
from e3rl_core.overrides import apply_overrides

torch.set_num_threads(2)


@pytest.fixture(scope="session", params=["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
def tiny(request):
    """(model, tokenizer) with peaked output distributions, so signals vary from token to token."""
    return random_model(request.param, init_std=0.3, seed=1)


@pytest.fixture(scope="session")
def tiny_llama():
    return random_model("tiny-llama", init_std=0.3, seed=1)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny model saved with save_pretrained, tokenizer included."""
    return save_random_model(tmp_path_factory.mktemp("models") / "tiny", "tiny-llama", init_std=0.3, seed=1)


def make_config(*overrides: str) -> GenerationConfig:
    base = ["max_new_tokens=48", "segment.mode=fixed", "segment.segment_tokens=8"]
    return apply_overrides(GenerationConfig(), base + list(overrides))


def median_score(model, tok, prompt: str, *overrides: str) -> float:
    """A fixed threshold that erases often: midway between two distinct scores near the median of
    first attempts with erasure off (midway, so float noise of 1e-7 cannot flip a decision)."""
    gen = ErasableGenerator(model, tok, make_config("threshold.policy=none", *overrides))
    raw = sorted(e.score for e in gen.stream(prompt, group_size=4, seed=0) if isinstance(e, SegmentEvent))
    scores = [x for i, x in enumerate(raw) if i == 0 or x - raw[i - 1] > 1e-3]  # one per cluster
    mid = len(scores) // 2
    return (scores[mid - 1] + scores[mid]) / 2 if len(scores) > 1 else scores[0] - 0.5


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """A launched workbench (its own runs directory) for the module's tests; closed afterwards."""
    from app.main import launch

    demo, url = launch(port=free_port(), block=False, runs_root=str(tmp_path_factory.mktemp("runs")))
    yield url
    demo.close()
