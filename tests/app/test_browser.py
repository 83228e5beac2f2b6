"""A real browser: Playwright drives the system Chromium (installed by the set-up with apt; no
browser download) through a generation and an audit and checks what a researcher sees. Saves
screenshots to test-artifacts/app-generate.png and app-audit.png."""
from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

CHROMIUM = os.environ.get("E3RL_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@contextmanager
def chromium() -> Iterator[Any]:
    """The system Chromium, headless, with no network of its own."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            yield browser
        finally:
            browser.close()


def generate_with(browser: Any, url: str, model: str, prompt: str, numbers: dict[str, str],
                  height: int = 1500) -> Any:
    """A page that has typed ``model`` and ``prompt`` (no gold answer), set the number boxes of the
    controls whose element ids ``numbers`` names, and clicked Generate."""
    page = browser.new_page(viewport={"width": 1400, "height": height})
    page.goto(url, wait_until="domcontentloaded")
    box = page.locator("#e3rl-model input").first
    box.fill(model)
    box.press("Enter")
    page.locator("#e3rl-prompt textarea").fill(prompt)
    page.locator("#e3rl-gold").locator("textarea, input").first.fill("")
    page.get_by_text("sampling and E3RL").click()
    for elem, value in numbers.items():
        number = page.locator(f"{elem} input[type='number']")
        for _ in range(3):  # the slider takes the typed value asynchronously; type again if it has not
            number.fill(value)
            number.press("Enter")
            try:
                page.wait_for_function("([sel, v]) => document.querySelector(sel + \" input[type='range']\").value"
                                       " === v", arg=[elem, value], timeout=3_000)
                break
            except Exception:  # playwright's TimeoutError
                continue
    page.wait_for_timeout(300)  # and once the page has sent its state
    page.get_by_role("button", name="Generate", exact=True).click()
    return page


pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)),
    reason=f"no Chromium at {CHROMIUM}: ./run setup installs it with apt-get (or set E3RL_CHROMIUM)",
)


def test_generate_in_a_browser(app_url):
    ARTIFACTS.mkdir(exist_ok=True)
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1500})
        page.goto(app_url, wait_until="domcontentloaded")
        page.get_by_role("button", name="Generate", exact=True).click()
        page.wait_for_selector("#e3rl-heatmap .e3rl-tok", timeout=60_000)  # coloured tokens stream in
        page.wait_for_selector("#e3rl-summary :text('tokens generated')", timeout=120_000)
        page.wait_for_function(  # the default example's first rollout erases a slip
            "document.querySelectorAll('#e3rl-heatmap [data-erased]').length > 0", timeout=120_000)
        page.wait_for_function(  # the chart (empty from page load) now plots the scores
            "document.querySelectorAll('#e3rl-chart .scatterlayer .point').length > 0", timeout=60_000)
        page.wait_for_function(
            "document.querySelector('#e3rl-summary') && "
            "document.querySelector('#e3rl-summary').innerText.includes('Answer:') && "
            "!document.querySelector('#e3rl-summary').innerText.includes('generating')", timeout=120_000)
        tok = page.locator("#e3rl-heatmap .e3rl-tok").first
        assert "background" in (tok.get_attribute("style") or "")
        assert "entropy" in (tok.get_attribute("title") or "")
        assert page.locator("#e3rl-heatmap .e3rl-seg").count() >= 2
        page.screenshot(path=str(ARTIFACTS / "app-generate.png"), full_page=True)
    assert (ARTIFACTS / "app-generate.png").stat().st_size > 10_000


def test_audit_replay_and_what_if_in_a_browser(app_url):
    """Generate, then audit it: the decisions table fills, a trace replays step by step with the
    same renderer, and moving a what-if slider re-judges the recorded decisions."""
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1500})
        page.goto(app_url, wait_until="domcontentloaded")
        page.get_by_role("button", name="Generate", exact=True).click()
        page.wait_for_selector("#e3rl-summary :text('finished:')", timeout=120_000)
        page.get_by_role("tab", name="Audit").click()
        page.get_by_role("button", name="refresh from this session").click()
        page.wait_for_function(  # one row per decision (the reasons appear in cells only)
            "document.querySelector('#e3rl-audit') && "
            "document.querySelector('#e3rl-audit').innerText.includes('above_threshold')", timeout=30_000)
        page.wait_for_selector("#e3rl-replay .e3rl-tok", timeout=30_000)  # the first trace, replayed in full
        full = page.locator("#e3rl-replay .e3rl-tok").count()
        steps = page.locator(".block", has_text="events shown").locator("input[type='number']").first
        steps.fill("6")
        steps.press("Enter")
        page.wait_for_function(f"document.querySelectorAll('#e3rl-replay .e3rl-tok').length < {full}",
                               timeout=30_000)
        kappa = page.locator(".block", has_text="κ").locator("input[type='number']").first
        kappa.fill("3")
        kappa.press("Enter")
        page.wait_for_selector("#e3rl-whatif :text('recorded decisions would change')", timeout=30_000)
        msg = page.inner_text("#e3rl-whatif")
        changed, total = (int(x) for x in re.findall(r"(\d+) of (\d+)", msg)[0])
        assert total > 0 and changed > 0  # a far higher bar keeps segments that were erased
        assert "true" in page.inner_text("#e3rl-whatif-table").lower()  # the changed decisions are listed
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "app-audit.png"), full_page=True)


def test_train_tab_polls_only_when_open(app_url):
    with chromium() as browser:
        page = browser.new_page()
        page.goto(app_url, wait_until="domcontentloaded")
        page.get_by_role("button", name="Generate", exact=True).wait_for()
        page.wait_for_timeout(2500)
        assert page.get_by_text("no training run yet").count() == 0  # no polling on the Generate tab
        page.get_by_role("tab", name="Train").click()
        page.get_by_text("no training run yet").wait_for(timeout=20_000)  # the status poll started


def test_a_long_trace_keeps_its_newest_line_in_view():
    """The live heatmap is a fixed-height viewport; as a trace outgrows it, the newest tokens stay
    visible (CSS only: the page below does not move on every frame)."""
    from app import render
    from e3rl_core.events import StartEvent, TokenEvent

    view = render.TraceView()
    view.apply(StartEvent(trace_id="t", model="m", prompt="p", prompt_ids=[1], config={}, seed=0, group_index=0))
    for i in range(400):
        view.apply(TokenEvent(trace_id="t", step=i, token_id=1, text=f"line {i}\n" if i % 4 == 3 else "tok ",
                              entropy=0.1, surprisal=0.1, segment=i // 40, attempt=0))
    page_html = f'<style>{render.CSS}</style><div id="e3rl-heatmap">{render.trace_html(view, with_css=False)}</div>'
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 900, "height": 900})
        page.set_content(page_html)
        box, last, first = page.evaluate("""() => {
            const s = document.querySelector('#e3rl-heatmap .e3rl-scroll').getBoundingClientRect();
            const toks = document.querySelectorAll('.e3rl-tok');
            const r = el => el.getBoundingClientRect();
            return [[s.top, s.bottom], [r(toks[toks.length - 1]).top, r(toks[toks.length - 1]).bottom],
                    [r(toks[0]).top, r(toks[0]).bottom]]; }""")
    assert box[1] - box[0] < 400  # a fixed viewport, far shorter than 100 lines
    assert box[0] <= last[0] and last[1] <= box[1] + 1  # the newest token is in view
    assert first[1] < box[0]  # the oldest scrolled out of view above
