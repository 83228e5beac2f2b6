"""The page after a long run, in Chromium: how long a tab switch, the collapse toggle and a what-if
change take once the last frame of a 4,096-kept-token run with hundreds of erasures has arrived.
(scripts/bench_live_browser.py measures the frames while the run streams; this measures what follows.)

    python scripts/bench_page_browser.py [--tokens 4096] [--segment-tokens 4] [--repeats 5] [--shots DIR]

The model and request are scripts/bench_live_browser.py's (random-init Qwen3-shaped, byte-level
BPE, no end-of-sequence token; G = 1, erasure on with the e3rl policy and Erase@3), with segments
cut at newlines and at most --segment-tokens tokens: a chatty model's trace of many short segments,
hundreds of them erased. The app runs as its own process (`e3rl app`), Playwright drives the system
Chromium at 1400 x 900.

Each action is timed from the moment Playwright acts until a check that runs in the page's
animation frames (so it waits for a free main thread, as a user's eye does) sees its result:
- tab switch: the tab's panel shown with its content (Audit: the decisions table has rows, a trace
  is replayed and its what-if line shown; Generate: the heatmap; Train: its start button);
- collapse: the heatmap's collapsed class applied, and the next frame painted;
- what-if: penalty λ typed into the what-if's box (0, 1, 0, ...) until the what-if's summary
  line changes; first a click on the table's first row picks its trace (replay and what-if drawn,
  reported apart).
The first switch to Audit right after the run is reported on its own (what a user meets first),
then --repeats rounds of each action; the table gives the median and the worst.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from bench_app import free_port, start_app  # noqa: E402
from bench_live_browser import make_model, open_page  # noqa: E402

TAB = "button[role='tab']"
# The check that a tab's content is on screen (its panel shown and filled).
SHOWN = {
    "Audit": "() => { const t = document.querySelector('#e3rl-audit');"
             " return !!(t && t.offsetParent && t.querySelectorAll('.virtual-row').length > 0"
             " && document.querySelector('#e3rl-replay .e3rl-tok')"
             " && /recorded decisions would change/.test(document.querySelector('#e3rl-whatif')?.innerText || '')); }",
    "Generate": "() => { const h = document.querySelector('#e3rl-heatmap'); return !!(h && h.offsetParent); }",
    "Train": "() => [...document.querySelectorAll('button')].some(b => b.offsetParent &&"
             " /^(Start training|Train)$/.test(b.textContent.trim()))",
}
# The what-if's penalty λ (G = 1: the e3rl baseline of a lone rollout is its own score, so κ has
# nothing to scale and λ sets the bar)
LAMBDA_BOX = ("xpath=//span[normalize-space()='penalty λ']/ancestor::div[contains(@class,'block')][1]"
              "//input[@type='number']")


def timed(page, action, check: str, arg=None, timeout: float = 120_000) -> float:
    """Seconds from ``action()`` until ``check`` is true in an animation frame of the page."""
    t0 = time.perf_counter()
    action()
    page.wait_for_function(check, arg=arg, polling="raf", timeout=timeout)
    return time.perf_counter() - t0


def switch(page, name: str) -> float:
    return timed(page, lambda: page.locator(TAB, has_text=name).first.click(), SHOWN[name])


def collapse(page) -> float:
    box = page.locator("#e3rl-collapse input[type='checkbox']")
    want = not box.is_checked()
    check = ("(on) => document.querySelector('#e3rl-heatmap').classList.contains('e3rl-collapse') === on")
    return timed(page, lambda: box.click(), check, arg=want)


def what_if(page, value: float) -> float:
    before = page.inner_text("#e3rl-whatif")
    box = page.locator(LAMBDA_BOX).first

    def act() -> None:
        box.fill(f"{value:g}")
        box.press("Enter")

    return timed(page, act, "(old) => { const e = document.querySelector('#e3rl-whatif');"
                            " return !!e && e.innerText.trim() !== '' && e.innerText !== old; }", arg=before)


def pick_trace(page) -> float:
    """Click the decisions table's first row: its trace is replayed, and its what-if computed."""
    cell = page.locator("#e3rl-audit [data-testid='cell-0-0']")
    return timed(page, lambda: cell.click(),
                 "() => !!document.querySelector('#e3rl-replay .e3rl-tok') && "
                 "/recorded decisions would change/.test(document.querySelector('#e3rl-whatif')?.innerText || '')")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="kept tokens of the run")
    p.add_argument("--segment-tokens", type=int, default=4, help="segments end at a newline or after this many tokens")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--shots", help="save screenshots of the page after the run here")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="e3rl-bench-page-"))
    model = tmp / "bpe-qwen3"
    make_model(model, args.tokens)
    port = free_port()
    server = start_app(port)
    url = f"http://127.0.0.1:{port}/"
    times: dict[str, list[float]] = {"tab switch": [], "collapse toggle": [], "what-if change": []}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, headless=True,
                                         args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = open_page(browser, url, model, args.tokens, segment_tokens=args.segment_tokens)
            page.set_viewport_size({"width": 1400, "height": 900})
            t0 = time.perf_counter()
            page.get_by_role("button", name="Generate", exact=True).click()
            page.wait_for_selector("#e3rl-summary :text('finished:')", timeout=1_800_000)
            run_s = time.perf_counter() - t0
            summary = page.inner_text("#e3rl-summary").splitlines()
            first = switch(page, "Audit")  # straight after the last frame
            # rows the table holds (its grid's row count, less the header) and rows drawn in the DOM
            n_rows = page.evaluate("() => [+document.querySelector('#e3rl-audit [role=grid]')"
                                   ".getAttribute('aria-rowcount') - 1,"
                                   " document.querySelectorAll('#e3rl-audit .virtual-row').length]")
            if args.shots:
                shot(page, args.shots, "after-run-audit")
            print(f"first switch to Audit: {first:.2f} s, {n_rows} rows", file=sys.stderr)
            picked = pick_trace(page)
            for i in range(args.repeats):
                # λ = 0 keeps every segment, λ = 1 erases fewer than recorded (0.3): each changes the line
                times["what-if change"].append(what_if(page, (0.0, 1.0)[i % 2]))
                times["tab switch"].append(switch(page, "Generate"))
                times["collapse toggle"].append(collapse(page))
                times["collapse toggle"].append(collapse(page))
                times["tab switch"].append(switch(page, "Train"))
                times["tab switch"].append(switch(page, "Audit"))
            if args.shots:
                switch(page, "Generate")
                shot(page, args.shots, "after-run-generate")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"Machine: {platform.machine()}, {os.cpu_count()} threads; Python {platform.python_version()}")
    print(f"One rollout (G = 1, erasure on, segments at newlines or <= {args.segment_tokens} tokens), "
          f"{run_s:.0f} s: {' · '.join(s for s in summary if 'tokens generated' in s or 'finished' in s)}")
    print(f"The Audit tab's decisions table after opening it: {n_rows[0]:,} rows sent to the page, "
          f"{n_rows[1]} drawn\n")
    print(f"First switch to Audit after the last frame: {first:.2f} s")
    print(f"Then a click on the table's first row: its trace replayed and its what-if shown in {picked:.2f} s\n")
    print("| after the run (goal: median <= 1 s) | n | median | worst |")
    print("|---|---|---|---|")
    for name, xs in times.items():
        print(f"| {name} | {len(xs)} | {statistics.median(xs):.2f} s | {max(xs):.2f} s |")
    return 0


def shot(page, folder: str, name: str) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(Path(folder) / f"{name}.png"))


if __name__ == "__main__":
    sys.exit(main())
