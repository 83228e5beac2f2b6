"""Statistics of decision effects (``effects.py``): intervals, verdicts, what chance alone gives,
the score's ranking quality, and the aggregates a researcher reads first. Pure functions of rows.

With K samples per branch most point estimates are noise, so a verdict rests on the interval: the
Newcombe hybrid score interval for a difference of two proportions (Newcombe 1998, method 10),
which keeps its coverage at small K where the Wald interval does not. ``chance_verdicts`` says how
many "helps" / "hurts" verdicts the same test would give if no decision had any effect.
"""
from __future__ import annotations

import math
from functools import lru_cache
from statistics import NormalDist
from typing import Any, Iterable, Sequence

from ..generation.decision import NEAR_MARGIN  # erasures by less than this are counted apart


VERDICTS = ("helps", "hurts", "none")
"""Of erasing (redrawing) the segment: it raises P(correct), lowers it, or no measurable difference."""


def wilson(c: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for c successes of n."""
    if n <= 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = c / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe(c_keep: int, n_keep: int, c_redraw: int, n_redraw: int,
             confidence: float = 0.95) -> tuple[float, float]:
    """Interval for p_redraw - p_keep (Newcombe's hybrid score interval from two Wilson intervals)."""
    p1, p2 = c_keep / n_keep, c_redraw / n_redraw
    l1, u1 = wilson(c_keep, n_keep, confidence)
    l2, u2 = wilson(c_redraw, n_redraw, confidence)
    d = p2 - p1
    return d - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2), d + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)


def verdict(low: float, high: float) -> str:
    """helps when the whole interval is above 0, hurts when below, else none."""
    return "helps" if low > 0 else ("hurts" if high < 0 else "none")


@lru_cache(maxsize=64)
def _significant(K: int, confidence: float) -> tuple[tuple[int, ...], ...]:
    """sign of the verdict (+1 helps, -1 hurts, 0) for every (keep, redraw) count pair at K."""
    out = []
    for a in range(K + 1):
        row = []
        for b in range(K + 1):
            lo, hi = newcombe(a, K, b, K, confidence)
            row.append(1 if lo > 0 else (-1 if hi < 0 else 0))
        out.append(tuple(row))
    return tuple(out)


def chance_rate(p: float, K: int, confidence: float = 0.95) -> float:
    """P(a "helps" verdict) when both branches succeed with the same probability p (no effect);
    "hurts" has the same chance by symmetry."""
    pmf = [math.comb(K, i) * p**i * (1 - p) ** (K - i) for i in range(K + 1)]
    sig = _significant(K, confidence)
    return sum(pmf[a] * pmf[b] for a in range(K + 1) for b in range(K + 1) if sig[a][b] > 0)


def chance_verdicts(rows: Sequence[dict[str, Any]]) -> float:
    """Expected number of "helps" verdicts (and as many "hurts") among ``rows`` if no decision had
    an effect, each at its pooled success rate, K and confidence."""
    total = 0.0
    for r in rows:
        K = int(r["samples"])
        p = (r["keep_correct"] + r["redraw_correct"]) / (2 * K)
        total += chance_rate(p, K, float(r["confidence"]))
    return total


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties counted half); None without both classes."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    ranked = sorted((s, y) for s, y in zip(scores, labels))
    # average ranks over ties
    ranks: dict[float, float] = {}
    i = 0
    while i < len(ranked):
        j = i
        while j + 1 < len(ranked) and ranked[j + 1][0] == ranked[i][0]:
            j += 1
        ranks[ranked[i][0]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(ranks[s] for s in pos)
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def _part(rows: list[dict[str, Any]]) -> dict[str, Any]:
    counts = {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}
    chance = chance_verdicts(rows)
    return {
        "n": len(rows), "helps": counts["helps"], "hurts": counts["hurts"], "none": counts["none"],
        "mean_effect": sum(r["effect"] for r in rows) / len(rows) if rows else None,
        "chance_helps": round(chance, 2), "chance_hurts": round(chance, 2),
        "p_keep": sum(r["p_keep"] for r in rows) / len(rows) if rows else None,
        "p_redraw": sum(r["p_redraw"] for r in rows) / len(rows) if rows else None,
    }


def aggregates(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """What a researcher reads first: of the erasures, how many helped / hurt / made no measurable
    difference (and what chance alone would give); of the accepted segments, how many would have
    been better redrawn (missed erasures); how well the score ranks segments that hurt (AUROC of U
    and of U - Θ, over decisions with a nonzero measured effect: positive = redraw did better); on
    the synthetic task, whether erasures hit the first wrong step, and how many came after the trace
    had already slipped (where redrawing the segment cannot repair the earlier step)."""
    rows = list(rows)
    erased = [r for r in rows if r["decision"] == "erase"]
    accepted = [r for r in rows if r["decision"] != "erase"]
    informative = [r for r in rows if r["effect"] != 0]
    with_margin = [r for r in informative if r.get("margin") is not None]
    near = [r for r in erased if r.get("margin") is not None and r["margin"] < NEAR_MARGIN]
    out: dict[str, Any] = {
        "decisions": len(rows),
        "samples": sorted({int(r["samples"]) for r in rows}),
        "confidence": sorted({float(r["confidence"]) for r in rows}),
        "erasure_in_branches": sorted({bool(r["erasure"]) for r in rows}),
        "erased": _part(erased),
        "erased_near_threshold": {"margin_below": NEAR_MARGIN, **_part(near)},
        "accepted": _part(accepted),
        "auroc_score": auroc([r["score"] for r in informative], [r["effect"] > 0 for r in informative]),
        "auroc_margin": auroc([r["margin"] for r in with_margin], [r["effect"] > 0 for r in with_margin]),
        "auroc_pairs": {"hurt": sum(r["effect"] > 0 for r in informative),
                        "did_not": sum(r["effect"] < 0 for r in informative)},
    }
    slips = [r for r in rows if r.get("holds_slip") is not None]
    if slips:
        tp = sum(1 for r in slips if r["holds_slip"] and r["decision"] == "erase")
        erased_s = sum(1 for r in slips if r["decision"] == "erase")
        slipped = sum(1 for r in slips if r["holds_slip"])
        late = [r for r in slips if r["decision"] == "erase" and r.get("after_slip")]
        out["slips"] = {"segments_with_first_slip": slipped, "erasures": erased_s, "erasures_on_first_slip": tp,
                        "precision": tp / erased_s if erased_s else None,
                        "recall": tp / slipped if slipped else None,
                        "erasures_after_a_slip": len(late),
                        "erasures_after_a_slip_that_helped": sum(r["verdict"] == "helps" for r in late)}
    return out


def binned(rows: Sequence[dict[str, Any]], bins: int = 8) -> list[dict[str, Any]]:
    """Rows with a margin, in ``bins`` quantile bins of U - Θ: each bin's mean margin, mean effect
    and a 95% interval of that mean (normal approximation over the bin's decisions)."""
    pts = sorted((r["margin"], r["effect"]) for r in rows if r.get("margin") is not None)
    if not pts:
        return []
    size = max(1, math.ceil(len(pts) / bins))
    out = []
    for i in range(0, len(pts), size):
        chunk = pts[i: i + size]
        m = [x for x, _ in chunk]
        e = [y for _, y in chunk]
        mean = sum(e) / len(e)
        sd = math.sqrt(sum((y - mean) ** 2 for y in e) / (len(e) - 1)) if len(e) > 1 else 0.0
        out.append({"margin": sum(m) / len(m), "effect": mean, "ci": 1.96 * sd / math.sqrt(len(e)), "n": len(e),
                    "low": m[0], "high": m[-1]})
    return out


def calibration_figure(rows: Sequence[dict[str, Any]], title: str = "") -> Any:
    """Plotly figure: each decision's score margin U - Θ against its measured effect (erased and
    accepted apart), and the binned mean effect with its 95% interval."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, pick, color in (("erased", lambda r: r["decision"] == "erase", "#d62728"),
                              ("accepted", lambda r: r["decision"] != "erase", "#1f77b4")):
        sel = [r for r in rows if pick(r) and r.get("margin") is not None]
        fig.add_trace(go.Scatter(
            x=[r["margin"] for r in sel], y=[r["effect"] for r in sel], mode="markers", name=f"{name} ({len(sel)})",
            marker=dict(color=color, size=6, opacity=0.45),
            customdata=[[r["key"], r["verdict"], r["ci_low"], r["ci_high"]] for r in sel],
            hovertemplate="%{customdata[0]}<br>U − Θ %{x:.3f}, effect %{y:+.2f} "
                          "[%{customdata[2]:+.2f}, %{customdata[3]:+.2f}] %{customdata[1]}<extra></extra>"))
    bins = binned(rows)
    if bins:
        fig.add_trace(go.Scatter(
            x=[b["margin"] for b in bins], y=[b["effect"] for b in bins], mode="lines+markers",
            name="binned mean ± 95%", line=dict(color="black"),
            error_y=dict(type="data", array=[b["ci"] for b in bins], visible=True),
            customdata=[[b["n"], b["low"], b["high"]] for b in bins],
            hovertemplate="margins %{customdata[1]:.3f} … %{customdata[2]:.3f} (%{customdata[0]} decisions): "
                          "mean effect %{y:+.3f}<extra></extra>"))
    fig.add_hline(y=0, line_dash="dot", line_color="gray")
    fig.add_vline(x=0, line_dash="dot", line_color="gray")
    fig.update_layout(template="plotly_white", height=460, title=title or None,
                      xaxis_title="score margin U − Θ (erased when > 0)",
                      yaxis_title="effect: P(correct | redraw) − P(correct | keep)",
                      legend=dict(orientation="h", y=-0.2))
    return fig


def summary_text(agg: dict[str, Any]) -> str:
    """The aggregates in a few lines: what a researcher reads first."""
    e, a = agg["erased"], agg["accepted"]
    K = ", ".join(map(str, agg["samples"]))

    def auc(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    lines = [
        f"{agg['decisions']} decisions, K = {K} continuations per branch, "
        f"{100 * agg['confidence'][0]:.0f}% intervals" if agg["confidence"] else f"{agg['decisions']} decisions",
        f"erasures: {e['n']}: helped {e['helps']}, hurt {e['hurts']}, no measurable difference {e['none']} "
        f"(chance alone: ~{e['chance_helps']:.1f} helped and ~{e['chance_hurts']:.1f} hurt)",
        f"  of them by a margin under {agg['erased_near_threshold']['margin_below']:g}: "
        f"{agg['erased_near_threshold']['n']} (helped {agg['erased_near_threshold']['helps']}, hurt "
        f"{agg['erased_near_threshold']['hurts']})" if "erased_near_threshold" in agg else "",
        f"accepted segments: {a['n']}: better redrawn (missed erasures) {a['helps']}, rightly kept {a['hurts']}, "
        f"no measurable difference {a['none']} (chance alone: ~{a['chance_helps']:.1f} each way)",
        f"AUROC for 'this segment hurts': score U {auc(agg['auroc_score'])}, margin U - Θ {auc(agg['auroc_margin'])} "
        f"({agg['auroc_pairs']['hurt']} hurt / {agg['auroc_pairs']['did_not']} did not)",
    ]
    if agg.get("slips"):
        s = agg["slips"]
        lines.append(f"slips: {s['erasures_on_first_slip']} of {s['erasures']} erasures held the first wrong step "
                     f"(precision {auc(s['precision'])}); {s['segments_with_first_slip']} segments held one "
                     f"(recall {auc(s['recall'])})")
        if s.get("erasures_after_a_slip") is not None:
            lines.append(f"{s['erasures_after_a_slip']} erasures came after the trace had already slipped "
                         f"({s['erasures_after_a_slip_that_helped']} of them helped)")
    return "\n".join(line for line in lines if line)
