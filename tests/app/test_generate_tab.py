"""The Generate tab: its handlers without a server (Stop, redraws, Space bounds, the unknown-character
warning), then what a first-time user sees in Chromium (Stop, the heatmap's size, the ✂ marker, the
legend, the chart, the summary across a colour toggle, where the counterfactual appears, the warning)."""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from test_browser import CHROMIUM, chromium, generate_with  # noqa: E402  (the browser tests' Chromium set-up)

from app.session import SPACE_MAX_NEW_TOKENS, ModelStore  # noqa: E402
from app.tabs import Shared  # noqa: E402
from app.tabs.generate import GEN_FIELDS, draw, examples, generate, join_history, request  # noqa: E402
from app.ui import DEFAULTS  # noqa: E402
from e3rl_core.errors import E3RLError  # noqa: E402
from e3rl_core.models import byte_level_bpe  # noqa: E402

MODEL = "checkpoints/arith-demo"
STORE = ModelStore()


def shared(space: bool = False) -> Shared:
    """What the handlers use of the server's shared state (no trained checkpoints)."""
    return Shared(store=STORE, trainer=SimpleNamespace(checkpoints=list), space=space, engine="thread",
                  default_model=MODEL, shipped=[MODEL], audit_dir=Path(tempfile.gettempdir()), session_events=None,
                  last_events=None)


def values(**kw) -> tuple:
    q, g = examples()[0]
    return tuple({**DEFAULTS, "model": MODEL, "prompt": q, "gold": g, **kw}[name] for name in GEN_FIELDS)


def test_stop_ends_with_a_frame_that_says_so_and_hands_the_partial_trace_to_audit():
    stop = threading.Event()
    before = ["an earlier event"]
    outs = []
    for out in generate(shared(), "entropy", 0, before, values(group_size=8, prompt=examples()[2][0]), stop):
        outs.append(out)
        stop.set()  # Stop as soon as the first frame is shown
    heatmap, summary, _, chart, _, events, history, info = outs[-1]
    assert re.search(r"stopped at token \d+", summary) and "generating" not in summary
    assert "stopped:" in summary and 'class="e3rl-erasing"' not in heatmap and 'class="e3rl-tok"' in heatmap
    assert info["stopped"] and history == before + events  # the partial traces join the session's events
    assert not any(e.kind == "done" for e in events if e.trace_id == events[0].trace_id)
    assert len(chart.data[-2].x) > 0  # the chart is drawn for the partial trace too
    # a redraw (the colour toggle, another rollout) keeps the stop, the timing and the counts
    heatmap2, summary2, *_ = draw(events, 0, "surprisal", info)
    assert summary2 == summary and "stopped at token" in heatmap2 and "e3rl-erasing" not in heatmap2


def test_a_colour_toggle_keeps_the_summary_with_its_timing():
    outs = list(generate(shared(), "entropy", 0, [], values(group_size=2)))
    _, summary, group, _, _, events, _, info = outs[-1]
    assert re.search(r"\d+\.\d\d s \(\d+ tok/s", summary) and "first token after" in summary
    again = draw(events, 0, "surprisal", info)
    assert again[1] == summary and again[2] == group
    other = draw(events, 1, "entropy", info)  # the other rollout: its own answer, the run's timing
    assert re.search(r"\d+\.\d\d s \(\d+ tok/s", other[1]) and other[4]["value"] == 1


def test_a_prompt_with_unknown_characters_is_warned_about_in_the_summary():
    outs = list(generate(shared(), "entropy", 0, [], values(group_size=1, prompt="a = 5 × 3. What is a?", gold="")))
    summary = outs[-1][1]
    assert summary.startswith("⚠") and "×" in summary and "rephrase" in summary


QWEN3_TEMPLATE = (  # Qwen3's thinking switch, reduced to what it does to the prompt
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory) -> str:
    """A random-init Qwen3-shaped model with a byte-level BPE tokenizer trained here and the template above."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fast = byte_level_bpe(["What is 2 + 3? Let me think step by step.\n\n2 + 3 = 5."] * 20, 300,
                          ["<|im_start|>", "<|im_end|>", "<think>", "</think>"], eos_token="<|im_end|>",
                          pad_token="<|im_end|>", chat_template=QWEN3_TEMPLATE)
    config = AutoConfig.for_model("qwen3", vocab_size=len(fast), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                  max_position_embeddings=512, pad_token_id=fast.pad_token_id)
    path = tmp_path_factory.mktemp("models") / "qwen3-chat"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    fast.save_pretrained(path)
    return str(path)


def test_the_thinking_control_reaches_a_chat_template_that_reads_it(qwen3_dir):
    def prompt_of(thinking: str) -> str:
        outs = list(generate(shared(), "entropy", 0, [], values(model=qwen3_dir, prompt="What is 2 + 3?", gold="5",
                                                               thinking=thinking, max_new_tokens=16, group_size=1)))
        return next(e for e in outs[-1][5] if e.kind == "start").prompt

    default, on, off = prompt_of("default"), prompt_of("on"), prompt_of("off")
    assert default.endswith("<|im_start|>assistant\n") and on == default  # Qwen3's default: thinking on
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # a model whose template does not read the switch says so instead of ignoring it
    with pytest.raises(Exception, match="set thinking to 'default'"):
        list(generate(shared(), "entropy", 0, [], values(thinking="off", group_size=1)))
    with pytest.raises(E3RLError, match="thinking must be one of"):
        request(shared(), values(thinking="maybe"))
    # a full prompt is used as written, whatever the switch says
    outs = list(generate(shared(), "entropy", 0, [], values(prompt=examples()[4][0], thinking="default", group_size=1)))
    assert next(e for e in outs[-1][5] if e.kind == "start").prompt == examples()[4][0]


def test_space_mode_bounds_max_new_tokens():
    with pytest.raises(E3RLError, match=f"at most {SPACE_MAX_NEW_TOKENS:,} new tokens"):
        request(shared(space=True), values(max_new_tokens=SPACE_MAX_NEW_TOKENS + 16))
    assert request(shared(space=True), values(max_new_tokens=SPACE_MAX_NEW_TOKENS)).max_new_tokens == 1024
    assert request(shared(), values(max_new_tokens=16_384)).max_new_tokens == 16_384


# ------------------------------------------------------------------------------------ in Chromium
browser = pytest.mark.skipif(not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)),
                             reason=f"no Chromium at {CHROMIUM}: ./run setup installs it with apt-get")


LAYOUT = """() => {
  const r = el => el.getBoundingClientRect();
  const block = document.querySelector('#e3rl-heatmap'), trace = block.querySelector('.e3rl-trace');
  const mid = el => (r(el).top + r(el).bottom) / 2;
  const cuts = [...block.querySelectorAll('details.e3rl-erased')].map(d => {
    const shown = (el, step) => { while (el && !el.getClientRects().length) el = el[step]; return el; };
    const mark = d.querySelector('summary'), prev = shown(d.previousElementSibling, 'previousElementSibling'),
          next = shown(d.nextElementSibling, 'nextElementSibling');
    return {markMid: mid(mark), prevMid: prev ? mid(prev) : mid(mark), nextMid: next ? mid(next) : mid(mark),
            atLineEnd: r(trace).right - r(mark).right < 60, width: r(d).width, traceWidth: r(trace).width};
  });
  const bar = r(document.querySelector('#e3rl-legend .bar'));
  const ticks = [...document.querySelectorAll('#e3rl-legend .ticks span')].map(s => {
    const t = r(s); return {top: t.top, left: t.left, right: t.right}; });
  const xticks = [...document.querySelectorAll('#e3rl-chart g.xtick text')].map(t => t.textContent);
  const legend = [...document.querySelectorAll('#e3rl-chart .legend .traces')].map(t => t.textContent);
  return {block: r(block).height, trace: r(trace).height, cuts, bar: {bottom: bar.bottom, left: bar.left,
          right: bar.right}, ticks, xticks, legend};
}"""


@browser
def test_what_a_first_time_user_sees(app_url):
    """The default example: the heatmap fits its trace, ✂ markers sit in the line, the legend's
    labels sit under its bar, the chart counts segments in whole numbers and names every mark, the
    colour toggle keeps the summary's timing, and the counterfactual appears under the run (above
    the chart); then a prompt with characters the model lacks."""
    with chromium() as b:
        page = b.new_page(viewport={"width": 1400, "height": 1500})
        page.goto(app_url, wait_until="domcontentloaded")
        page.get_by_role("button", name="Generate", exact=True).click()
        page.wait_for_selector("#e3rl-summary :text('finished:')", timeout=120_000)
        page.wait_for_function("document.querySelectorAll('#e3rl-chart .scatterlayer .point').length > 0",
                               timeout=60_000)
        got = page.evaluate(LAYOUT)
        assert got["block"] - got["trace"] < 40, got  # no empty viewport under a short trace
        assert got["cuts"], "the default example's rollout 0 erases"
        for cut in got["cuts"]:  # inline: on the line of what precedes and follows it (unless it ends a line)
            assert abs(cut["markMid"] - cut["prevMid"]) < 14 and cut["width"] < cut["traceWidth"] / 2, cut
            assert abs(cut["markMid"] - cut["nextMid"]) < 14 or cut["atLineEnd"], cut
        bar, ticks = got["bar"], got["ticks"]
        assert len(ticks) == 3 and all(t["top"] >= bar["bottom"] - 1 for t in ticks)  # under the bar
        assert abs(ticks[0]["left"] - bar["left"]) < 4 and abs(ticks[-1]["right"] - bar["right"]) < 4
        assert got["xticks"] and all(re.fullmatch(r"\d+", t) for t in got["xticks"]), got["xticks"]
        assert len(got["legend"]) == 6 and any("erased" in t for t in got["legend"]), got["legend"]

        summary = page.inner_text("#e3rl-summary")
        assert re.search(r"\d+\.\d\d s \(", summary) and "first token after" in summary
        styles = "[...document.querySelectorAll('#e3rl-heatmap .e3rl-tok')].map(t => t.getAttribute('style')).join()"
        before = page.evaluate(styles)
        page.locator("#e3rl-colour").get_by_label("surprisal").check()  # the colour toggle
        page.wait_for_function(f"{styles} !== {before!r}", timeout=30_000)  # the heatmap is recoloured
        page.wait_for_timeout(500)
        assert page.inner_text("#e3rl-summary") == summary  # the timing stays

        page.get_by_role("button", name="Counterfactual (erasure off)").click()
        page.wait_for_selector("#e3rl-counterfactual :text('erasures 0')", timeout=120_000)
        where = page.evaluate("""() => { const r = s => document.querySelector(s).getBoundingClientRect();
            return {cf: r('#e3rl-counterfactual').top, summary: r('#e3rl-summary').bottom, chart: r('#e3rl-chart').top}; }""")
        assert where["summary"] <= where["cf"] < where["summary"] + 80 and where["cf"] < where["chart"], where

        page.locator("#e3rl-prompt textarea").fill("a = 5 × 3. What is a?")
        page.locator("#e3rl-gold").locator("textarea, input").first.fill("")
        page.get_by_role("button", name="Generate", exact=True).click()
        page.wait_for_selector("#e3rl-summary :text('rephrase')", timeout=120_000)
        assert "×" in page.inner_text("#e3rl-summary")


@pytest.fixture(scope="module")
def rambling_model(tmp_path_factory) -> Path:
    """A random-init model that rarely ends: near-uniform over 4,096 tokens, one of them <eos>."""
    from e3rl_core.models import save_random_model

    return save_random_model(tmp_path_factory.mktemp("models") / "rambling", "tiny-llama", init_std=0.02, seed=1,
                             vocab_size=4096)


@browser
def test_stop_shows_where_it_stopped_and_keeps_the_partial_trace(app_url, rambling_model):
    """A long generation, stopped: the page says where, keeps the partial trace with nothing left
    struck through, and draws its chart."""
    with chromium() as b:
        page = generate_with(b, app_url, str(rambling_model), "hello there", {"#e3rl-max-new-tokens": "2000"})
        page.wait_for_selector("#e3rl-heatmap .e3rl-tok", timeout=120_000)
        page.wait_for_timeout(500)
        page.locator("#e3rl-stop").click()
        page.wait_for_selector("#e3rl-summary :text('stopped at token')", timeout=60_000)
        summary = page.inner_text("#e3rl-summary")
        n = int(re.search(r"stopped at token (\d+)", summary).group(1))
        assert 0 < n < 2000 and "generating" not in summary and "stopped:" in summary
        assert page.locator("#e3rl-heatmap .e3rl-tok").count() > 0
        assert page.locator("#e3rl-heatmap .e3rl-erasing").count() == 0
        assert f"stopped at token {n}" in page.inner_text("#e3rl-heatmap")
        page.wait_for_function(  # the per-token signal of the partial trace is plotted
            "[...document.querySelectorAll('#e3rl-chart .scatterlayer .js-line')]"
            ".some(p => (p.getAttribute('d') || '').length > 20)", timeout=30_000)


def test_the_pages_run_joins_the_session_once_it_has_ended():
    earlier = list(generate(shared(), "entropy", 0, [], values(group_size=1)))[-1][5]
    outs = list(generate(shared(), "entropy", 0, earlier, values(group_size=2), edits=True))
    assert all(len(out) == 8 for out in outs)  # heatmap ... events, info, edits: no session events per frame
    *_, events, info, ops = outs[-1]
    streaming = next(out for out in outs if not out[6].get("tail"))
    assert join_history(earlier, streaming[5], streaming[6]) == earlier  # not before the run has ended
    history = join_history(earlier, events, info)
    assert history == earlier + events
    assert join_history(history, events, info) == history  # a failed click leaves the last run: not added twice


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """A hybrid model the engine runs exactly (Jamba) and one it refuses (RecurrentGemma)."""
    from e3rl_core.evaluation.compat import family_model

    dirs = {}
    for name in ("jamba", "recurrent_gemma"):
        model, tok = family_model(name)
        path = tmp_path_factory.mktemp("families") / name
        model.save_pretrained(path)
        tok.save_pretrained(path)
        dirs[name] = str(path)
    return dirs


def test_the_generate_tab_runs_a_hybrid_and_refuses_what_the_engine_refuses(family_dirs):
    from e3rl_core.evaluation.compat import family_model
    from e3rl_core.generation.families import UnsupportedModelError, inspect_model

    outs = list(generate(shared(), "entropy", 0, [], values(model=family_dirs["jamba"], group_size=2,
                                                           max_new_tokens=24)))
    assert sum(e.kind == "done" for e in outs[-1][5]) == 2
    with pytest.raises(UnsupportedModelError) as cli_error:
        inspect_model(family_model("recurrent_gemma")[0])
    with pytest.raises(Exception) as app_error:
        list(generate(shared(), "entropy", 0, [], values(model=family_dirs["recurrent_gemma"], group_size=1)))
    assert str(cli_error.value) in str(app_error.value)  # the one line the command line prints


@browser
def test_a_new_user_finds_every_tab_on_top_sees_the_run_and_its_reasons(app_url):
    """At 1400 x 900: the tab strip is at the top of the page; a click on Generate brings the run's
    views into the window with a busy bar at once; an opened ✂ shows its tokens in colour with U,
    Θ, margin and reason; the templated prompt is under the summary; a failed request leaves the
    previous run dimmed and labelled; the Audit tab's trace list names the question."""
    with chromium() as b:
        page = b.new_page(viewport={"width": 1400, "height": 900})
        page.goto(app_url, wait_until="domcontentloaded")
        tabs = page.locator("button[role='tab']")
        tabs.first.wait_for()
        assert [t.strip() for t in tabs.all_inner_texts()] == ["Generate", "Audit", "Decision effects", "Train"]
        assert max(t.bounding_box()["y"] for t in tabs.all()) < 200  # one strip, at the top
        page.get_by_role("button", name="Generate", exact=True).click()
        page.wait_for_function("document.querySelector('#e3rl-heatmap').classList.contains('e3rl-busy') || "
                               "/finished:/.test(document.querySelector('#e3rl-summary').innerText)", timeout=10_000)
        page.wait_for_selector("#e3rl-summary :text('finished:')", timeout=120_000)
        box = page.locator("#e3rl-heatmap").bounding_box()
        assert 0 <= box["y"] < 900 / 2, box  # scrolled into view
        # the busy mark clears in a step after the last frame (IDLE_JS); on a loaded machine it lags the summary
        page.wait_for_function("document.querySelectorAll('.e3rl-busy, .e3rl-stale').length === 0", timeout=15_000)
        page.locator("#e3rl-heatmap details.e3rl-erased summary").first.click()
        why = page.locator("#e3rl-heatmap details.e3rl-erased[open] .e3rl-why").first.inner_text()
        assert re.search(r"U=\d\.\d{3}, Θ=\d\.\d{3}, margin [+-]\d\.\d{3}.*: erase \(", why), why
        gone = page.locator("#e3rl-heatmap details.e3rl-erased[open] .e3rl-gone").first
        assert gone.is_visible() and "rgb(" in gone.get_attribute("style") and "entropy" in gone.get_attribute("title")
        page.get_by_text("prompt as the model read it").click()
        assert "Question:" in page.locator("details.e3rl-prompt pre").inner_text()

        page.locator("#e3rl-model input").fill("no/such/model-dir")
        page.locator("#e3rl-model input").press("Enter")
        page.get_by_role("button", name="Generate", exact=True).click()
        page.wait_for_function("document.querySelector('#e3rl-heatmap').classList.contains('e3rl-stale') && "
                               "!document.querySelector('#e3rl-heatmap').classList.contains('e3rl-busy')",
                               timeout=60_000)
        label = page.evaluate("getComputedStyle(document.querySelector('#e3rl-heatmap'), '::after').content")
        assert "previous run" in label
        # dimmed (its opacity eases down over 0.2 s)
        page.wait_for_function("+getComputedStyle(document.querySelector('#e3rl-heatmap')).opacity < 0.6",
                               timeout=5_000)

        page.locator("button[role='tab']", has_text="Audit").click()
        page.wait_for_selector("#e3rl-replay .e3rl-tok", timeout=60_000)
        picked = page.locator("#e3rl-replay-trace input").input_value()
        assert picked.startswith("“a = 11 + 5.") and "rollout 0 · seed 8" in picked, picked
        assert re.search(r"rows 1–\d+ of \d+ \(page 1 of 1\)", page.inner_text("#e3rl-audit-page-line"))
