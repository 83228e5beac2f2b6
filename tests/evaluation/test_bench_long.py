"""The long-trace bench parts (e)-(h): the table they print, the profiler labelling of cache
updates, and the per-process training-step memory measurement."""
from __future__ import annotations

import re

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from e3rl_core.cli import main
from e3rl_core.errors import ConfigError
from e3rl_core.evaluation import bench_long
from e3rl_core.evaluation.bench import _Bench, run_generate_bench
from e3rl_core.generation.kvcache import GrowingLayer
from e3rl_core.models import random_model


def test_long_parts_print_one_table(capsys):
    assert main(["bench", "generate", "--quick", "--repeats", "1", "--parts", "efgh",
                 "--long-model", "random:tiny-qwen3"]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| (")]
    parts = [r.split("|")[1].strip() for r in rows]
    assert parts.count("(e) long traces") == 2 and parts.count("(g) erase+regenerate") == 2
    assert parts.count("(f) cache update") == 1 and parts.count("(h) train-step memory") == 3
    assert parts.count("(e) shipped model") == 2  # the shipped model's context holds the quick lengths
    for r in rows:
        if r.startswith("| (e)"):
            # four measured throughputs, each a positive number, and both ratios
            assert len([float(x.replace(",", "")) for x in re.findall(r"([\d,]+) tok/s", r)]) == 2
            assert re.search(r"\d+\.\d\dx generate; \d+\.\d\dx static", r)
        if r.startswith("| (f)"):
            shares = [float(x) for x in re.findall(r"([\d.]+)% (?:timer|torch)", r)]
            assert len(shares) == 4 and all(0 < s < 100 for s in shares)
    assert "R^2 = " in table and "random:tiny-qwen3" in table


def test_unknown_parts_are_refused():
    with pytest.raises(ConfigError, match="choose from abcdefgh"):
        run_generate_bench(parts="az")


def test_cache_update_shares_and_the_classes_restored():
    before = (GrowingLayer.update, DynamicLayer.update)
    model, tok = random_model("small-qwen3")
    b = _Bench(model, tok, "random:small-qwen3", torch.device("cpu"), 1, lambda m: None)
    prompt = list(range(8, 90)) * 25  # 2,050 tokens: DynamicCache's copy of the cache shows
    for profiler in (False, True):
        share = {k: bench_long.cache_update_share(b, prompt, 16, k, profiler=profiler) for k in ("static", "dynamic")}
        assert 0 < share["static"] < share["dynamic"] < 1
    assert (GrowingLayer.update, DynamicLayer.update) == before


def test_training_step_memory_grows_quadratically_only_for_the_eager_reference():
    # tiny-qwen3 at 2,048 tokens: the eager maps are 2 layers x 4 heads x 2080^2 floats per row (~138 MB)
    linear = bench_long.train_step_peak("random:tiny-qwen3", 2048, "linear", "cpu", "auto")
    eager = bench_long.train_step_peak("random:tiny-qwen3", 2048, "eager", "cpu", "auto")
    assert 0 < linear and eager > 2 * linear
