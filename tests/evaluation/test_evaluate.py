"""Evaluation: the unbiased pass@k against brute force, and `e3rl eval` end to end."""
from __future__ import annotations

import itertools
import json
import math

import pandas as pd
import pytest

from e3rl_core.cli import main
from e3rl_core.evaluation.evaluate import default_ks, pass_at_k


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_pass_at_k_equals_brute_force_enumeration(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
            assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    assert default_ks(6) == [1, 2, 4, 6] and default_ks(8) == [1, 2, 4, 8]


def test_eval_end_to_end(model_dir, tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    traces = tmp_path / "traces.jsonl"
    code = main(["eval", "--model", str(model_dir), "--data", "synthetic:test?difficulty=1&n=3", "--samples", "4",
                 "--max-new-tokens", "24", "--segment-mode", "delimiter", "--segment-tokens", "8",
                 "--out", str(out), "--traces-out", str(traces), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("avg_at_k", "pass_at_k", "k", "n_problems", "erase_rate"):
        assert key in summary
    assert summary["n_problems"] == 3 and summary["k"] == [1, 2, 4]
    rows = pd.read_json(out, lines=True)
    assert len(rows) == 12 and set(rows["sample"]) == {0, 1, 2, 3}
    assert summary["avg_at_k"] == pytest.approx(rows["correct"].mean())
    assert summary["mean_tokens_generated"] == pytest.approx(rows["tokens_generated"].mean())
    assert len(traces.read_text().splitlines()) > 12


def test_eval_bad_input(model_dir, tmp_path, capsys):
    assert main(["eval", "--model", str(model_dir), "--data", "synthetic:test?n=2", "--samples", "2", "--k", "4"]) == 2
    assert "k <= --samples" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--data", f"jsonl:{tmp_path}/none.jsonl"]) == 2
    assert "no such file" in capsys.readouterr().err
