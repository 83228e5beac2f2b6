"""Learning curves of the reproduction's runs: held-out Avg@K vs rollout tokens, mean ± 95% band
over seeds, seed-paired differences, and sample efficiency by bootstrap over seeds. Pure functions
of the per-run result dicts that ``experiment.run_one`` writes (``evals``: one point per leg)."""
from __future__ import annotations

import math
import random
from typing import Any, Sequence

# Two-sided 95% Student t quantiles by degrees of freedom (n - 1); beyond 10, 1.96 is close enough.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t interval (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T95.get(n - 1, 1.96) * sd / math.sqrt(n)


def curve_points(result: dict[str, Any], base: dict[str, Any] | None,
                 x: str = "rollout_tokens") -> list[tuple[float, float]]:
    """(x, Avg@K with erasure off) of one run, x the rollout tokens (default) or the optimizer ``step``:
    the starting model at 0, then every evaluation that recorded x (a run from before the curves has
    only its final one)."""
    pts = [(0.0, float(base["avg_at_k_off"]))] if base else []
    evals = result.get("evals") or [{"rollout_tokens": result.get("rollout_tokens"), "step": result.get("steps"),
                                     "avg_at_k": result["avg_at_k_off"]}]
    return pts + [(float(p[x]), float(p["avg_at_k"])) for p in evals if p.get(x) is not None]


def by_name(results: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        out.setdefault(r["spec"]["name"], []).append(r)
    return out


def mean_curve(runs: Sequence[dict[str, Any]], base: dict[str, Any] | None) -> list[dict[str, float]]:
    """Point by point over seeds: mean tokens, mean Avg@K and the half-width of its 95% t interval.
    Runs of one name share their evaluation points (the same fractions of one budget); a run with
    fewer points (one still going) cuts the curve to the points all have."""
    curves = [curve_points(r, base) for r in runs]
    n = min(len(c) for c in curves)
    out = []
    for i in range(n):
        xs, ys = [c[i][0] for c in curves], [c[i][1] for c in curves]
        m, h = mean_ci(ys)
        out.append({"tokens": sum(xs) / len(xs), "mean": m, "ci": h, "seeds": len(ys)})
    return out


def tokens_to_reach(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """The first rollout-token count at which a piecewise-linear curve reaches ``target``; None if
    it never does."""
    if not points:
        return None
    if points[0][1] >= target:
        return points[0][0]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if y1 >= target:
            return x0 + (x1 - x0) * (target - y0) / (y1 - y0)
    return None


def _efficiency_ratio(runs: Sequence[dict[str, Any]], refs: Sequence[dict[str, Any]],
                      base: dict[str, Any] | None) -> float:
    target = sum(r["avg_at_k_off"] for r in refs) / len(refs)
    budget = sum(r["rollout_tokens"] for r in refs) / len(refs)
    curve = [(p["tokens"], p["mean"]) for p in mean_curve(runs, base)]
    t = tokens_to_reach(curve, target)
    return math.inf if t is None else t / budget


def sample_efficiency(results: Sequence[dict[str, Any]], base: dict[str, Any] | None, name: str = "E3RL",
                      ref: str = "GRPO", n_boot: int = 2000, seed: int = 0) -> dict[str, Any] | None:
    """The rollout tokens ``name`` needs to reach ``ref``'s final mean Avg@K, over ``ref``'s tokens
    (< 1: fewer). The interval resamples the seeds of both (independently, with replacement) and
    takes the 2.5/97.5 percentiles; a resample whose curve never reaches the target counts as
    infinite, so an upper end of inf means the target was missed in over 2.5% of resamples."""
    groups = by_name(results)
    if name not in groups or ref not in groups:
        return None
    runs, refs = groups[name], groups[ref]
    rng = random.Random(seed)
    boots = sorted(_efficiency_ratio([rng.choice(runs) for _ in runs], [rng.choice(refs) for _ in refs], base)
                   for _ in range(n_boot))
    lo, hi = boots[int(0.025 * (n_boot - 1))], boots[math.ceil(0.975 * (n_boot - 1))]
    return {"name": name, "ref": ref, "ratio": _efficiency_ratio(runs, refs, base), "ci_low": lo, "ci_high": hi,
            "reached_share": sum(math.isfinite(b) for b in boots) / n_boot,
            "target": sum(r["avg_at_k_off"] for r in refs) / len(refs), "seeds": (len(runs), len(refs)),
            "n_boot": n_boot}


def paired_differences(results: Sequence[dict[str, Any]], ref: str = "GRPO",
                       key: str = "avg_at_k_off") -> dict[str, dict[str, Any]]:
    """Per name: the mean over shared seeds of (run - ``ref`` run of the same seed) and its 95% t
    interval. Pairing removes what a seed does to every algorithm alike (its prompt order)."""
    groups = by_name(results)
    refs = {r["spec"]["seed"]: r[key] for r in groups.get(ref, [])}
    out = {}
    for name, runs in groups.items():
        if name == ref:
            continue
        diffs = [r[key] - refs[r["spec"]["seed"]] for r in runs if r["spec"]["seed"] in refs]
        if diffs:
            m, h = mean_ci(diffs)
            out[name] = {"mean": m, "ci": h, "pairs": len(diffs)}
    return out


def interpolate(points: Sequence[tuple[float, float]], x: float) -> float | None:
    """A piecewise-linear curve's value at ``x``; None outside the points (no extrapolation)."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[0][1] if len(points) == 1 and points[0][0] == x else None


def at_equal_steps(results: Sequence[dict[str, Any]], base: dict[str, Any] | None,
                   ref: str = "GRPO") -> dict[str, dict[str, Any]]:
    """The comparison at equal optimizer steps instead of equal rollout tokens: per name, over shared
    seeds, (run's final Avg@K - ``ref``'s curve of the same seed read at the run's step count),
    linear between ``ref``'s evaluations. A run with more steps than its ``ref`` reached is left out."""
    groups = by_name(results)
    refs = {r["spec"]["seed"]: curve_points(r, base, x="step") for r in groups.get(ref, [])}
    out = {}
    for name, runs in groups.items():
        if name == ref:
            continue
        diffs, steps = [], []
        for r in runs:
            at = interpolate(refs[r["spec"]["seed"]], float(r["steps"])) if r["spec"]["seed"] in refs else None
            if at is not None:
                diffs.append(r["avg_at_k_off"] - at)
                steps.append(r["steps"])
        if diffs:
            m, h = mean_ci(diffs)
            out[name] = {"mean": m, "ci": h, "pairs": len(diffs), "steps": sum(steps) / len(steps)}
    return out


DYNAMICS_KEYS = ("reward_mean", "entropy_mean", "advantage_abs_mean", "erase_rate", "zero_variance_groups")
"""Training-log metrics ``training_dynamics`` follows: reward, token entropy of the rollouts, mean
|advantage| over trained tokens, share of rollout tokens erased, share of trained groups with no
signal (all rewards equal; logged since the readings study, absent from older logs)."""


def quarter_means(log_rows: Sequence[dict[str, Any]], key: str) -> tuple[float, float] | None:
    """Mean of ``key`` over the first and over the last quarter of a run's steps (at least one step
    each); None when the log has no value for it."""
    vals = [float(r[key]) for r in log_rows if isinstance(r.get(key), (int, float))]
    if not vals:
        return None
    q = max(1, len(vals) // 4)
    return sum(vals[:q]) / q, sum(vals[-q:]) / q


def training_dynamics(logs: dict[str, Sequence[Sequence[dict[str, Any]]]],
                      keys: Sequence[str] = DYNAMICS_KEYS) -> dict[str, dict[str, Any]]:
    """Per run name (``logs``: name -> each seed's log rows): each key's first- and last-quarter
    means, averaged over the seeds, and the number of seeds. How the algorithms differ while they
    train: a higher reward with a smaller advantage is less signal per token."""
    out: dict[str, dict[str, Any]] = {}
    for name, runs in logs.items():
        row: dict[str, Any] = {"seeds": len(runs)}
        for key in keys:
            pairs = [p for p in (quarter_means(rows, key) for rows in runs) if p is not None]
            row[key] = (sum(a for a, _ in pairs) / len(pairs), sum(b for _, b in pairs) / len(pairs)) if pairs else None
            row[key + "_seeds"] = len(pairs)  # seeds whose log has the key (older logs lack newer keys)
        out[name] = row
    return out


def pearson(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float] | None:
    """Pearson's r with its 95% interval (Fisher z, normal); None under 4 points or a constant."""
    n = len(xs)
    if n < 4:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    r = max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))
    z, half = math.atanh(max(-0.999999, min(0.999999, r))), 1.96 / math.sqrt(n - 3)  # atanh(±1) is infinite
    return {"r": r, "low": math.tanh(z - half), "high": math.tanh(z + half), "n": n}


def _smoothed_reward(result: dict[str, Any], grid: Sequence[float], window: int) -> list[float | None]:
    """A run's training reward (``window``-step moving mean) read at each token count of ``grid``
    (the last step at or before it; None before its first step)."""
    ys = [c["reward"] for c in result["curve"]]
    xs = [c["tokens"] for c in result["curve"]]
    smooth = [sum(ys[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(ys))]
    out: list[float | None] = []
    j = -1
    for g in grid:
        while j + 1 < len(xs) and xs[j + 1] <= g:
            j += 1
        out.append(smooth[j] if j >= 0 else None)
    return out


COLORS = {"GRPO": "#1f77b4", "DAPO": "#ff7f0e", "E3RL": "#2ca02c"}
ABLATION_COLORS = ["#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i: i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def learning_figure(results: Sequence[dict[str, Any]], base: dict[str, Any] | None = None, window: int = 10,
                    k: int = 4) -> Any:
    """Plotly figure, two panels sharing the x axis (rollout tokens, erased included). Top: held-out
    Avg@K (erasure off) per algorithm, mean over seeds with a 95% band (ablations: dotted means).
    Bottom: training reward, ``window``-step moving mean, averaged over seeds."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.62, 0.38],
                        subplot_titles=(f"held-out Avg@{k}, plain sampling (mean ± 95% band over seeds)",
                                        f"training reward ({window}-step moving mean, mean over seeds)"))
    extra = iter(ABLATION_COLORS * 4)
    for name, runs in by_name(results).items():
        main = runs[0]["spec"]["kind"] == "main"
        color = COLORS.get(name) or next(extra)
        curve = mean_curve(runs, base)
        xs = [p["tokens"] for p in curve]
        mean = [p["mean"] for p in curve]
        label = f"{name} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
        if main and len(runs) > 1:
            upper = [p["mean"] + p["ci"] for p in curve]
            lower = [p["mean"] - p["ci"] for p in curve]
            fig.add_trace(go.Scatter(x=xs + xs[::-1], y=upper + lower[::-1], fill="toself", mode="lines",
                                     line=dict(width=0), fillcolor=_rgba(color, 0.18), hoverinfo="skip",
                                     legendgroup=name, showlegend=False), row=1, col=1)
        fig.add_trace(go.Scatter(x=xs, y=mean, mode="lines+markers", name=label, legendgroup=name,
                                 line=dict(color=color, dash="solid" if main else "dot"),
                                 customdata=[[p["ci"], p["seeds"]] for p in curve],
                                 hovertemplate="%{x:,.0f} tokens: %{y:.3f} ± %{customdata[0]:.3f} "
                                               "(%{customdata[1]} seeds)<extra>" + name + "</extra>"),
                      row=1, col=1)
        top = max(r["rollout_tokens"] for r in runs)
        grid = [top * i / 60 for i in range(1, 61)]
        per_run = [_smoothed_reward(r, grid, window) for r in runs]
        reward = []
        for i in range(len(grid)):
            vals = [v[i] for v in per_run if v[i] is not None]
            reward.append(sum(vals) / len(vals) if vals else None)
        fig.add_trace(go.Scatter(x=grid, y=reward, mode="lines", legendgroup=name, showlegend=False,
                                 line=dict(color=color, dash="solid" if main else "dot"),
                                 hovertemplate="%{x:,.0f} tokens: reward %{y:.3f}<extra>" + name + "</extra>"),
                      row=2, col=1)
    if base:
        fig.add_hline(y=base["avg_at_k_off"], line_dash="dash", line_color="gray", row=1, col=1,
                      annotation_text="starting model", annotation_position="bottom right")
    fig.update_xaxes(title_text="rollout tokens generated (erased included)", row=2, col=1)
    fig.update_yaxes(title_text=f"Avg@{k}", row=1, col=1)
    fig.update_yaxes(title_text="reward", row=2, col=1)
    fig.update_layout(template="plotly_white", height=720, legend=dict(orientation="h", y=-0.12))
    return fig
