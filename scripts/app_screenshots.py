"""The README's screenshots of the workbench on the shipped model, as a new user meets it: Chromium
at 1400 x 900, the first example, the default settings.

    python scripts/app_screenshots.py --out docs/images [--prefix app-]

Writes PREFIXgenerate.png (the window right after the run: what is in view), PREFIXerasure.png (the
heatmap with the first erased attempt opened), PREFIXaudit.png (the Audit tab as it opens) and
PREFIXwhat-if.png (the what-if at κ = 3); with --effects, PREFIXeffects.png (the Decision effects
tab after a job over the group's decisions, K = 8) and PREFIXeffects-detail.png (the first erasure's
keep and redraw continuations). The app runs as its own process (`e3rl app`).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from bench_app import free_port, start_app  # noqa: E402

BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/images")
    p.add_argument("--prefix", default="app-")
    p.add_argument("--effects", action="store_true", help="also the Decision effects tab after a job (a few minutes)")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = start_app(port)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, headless=True, args=BROWSER_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="load")
            page.get_by_role("button", name="Generate", exact=True).click()
            page.wait_for_selector("#e3rl-summary :text('finished:')", timeout=300_000)
            page.wait_for_timeout(1500)  # the chart's last redraw
            page.screenshot(path=str(out / f"{args.prefix}generate.png"))
            page.locator("#e3rl-heatmap details.e3rl-erased summary").first.click()
            page.wait_for_timeout(300)
            heat = page.locator("#e3rl-heatmap")
            heat.scroll_into_view_if_needed()
            page.screenshot(path=str(out / f"{args.prefix}erasure.png"), clip=_around(heat, page))
            page.locator("button[role='tab']", has_text="Audit").first.click()
            page.wait_for_selector("#e3rl-whatif :text('recorded decisions would change')", timeout=60_000)
            page.wait_for_timeout(800)
            page.evaluate("() => window.scrollTo(0, 0)")
            page.screenshot(path=str(out / f"{args.prefix}audit.png"))
            kappa = page.locator("xpath=//span[normalize-space()='κ']/ancestor::div[contains(@class,'block')][1]"
                                 "//input[@type='number']").first
            kappa.fill("3")
            kappa.press("Enter")
            page.wait_for_function("/^[1-9]\\d* of \\d+ recorded/.test("
                                   "document.querySelector('#e3rl-whatif').innerText)", timeout=60_000)
            page.wait_for_timeout(800)
            table = page.locator("#e3rl-whatif-table")
            table.scroll_into_view_if_needed()
            page.screenshot(path=str(out / f"{args.prefix}what-if.png"), clip=_around(table, page, below=120))
            if args.effects:
                effects(page, out, args.prefix)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"screenshots in {out}")
    return 0


def effects(page, out: Path, prefix: str) -> None:
    """The Decision effects tab after a job over the Audit tab's rows (K = 8), and the detail of the
    first erasure (its keep and redraw continuations)."""
    page.evaluate("() => window.scrollTo(0, 0)")
    page.locator("#e3rl-audit [data-testid='cell-0-0']").click()  # rollout 0, segment 0, attempt 0: erased
    page.locator("button[role='tab']", has_text="Decision effects").click()
    page.get_by_label("filtered rows").check()
    page.get_by_role("button", name="Measure effects").click()
    page.wait_for_function("/, finished/.test(document.querySelector('#e3rl-effects-progress').innerText)",
                           timeout=900_000)
    page.wait_for_timeout(2500)  # the next poll draws the plot
    page.screenshot(path=str(out / f"{prefix}effects.png"), full_page=True)
    page.locator("button[role='tab']", has_text="Audit").click()
    page.locator("#e3rl-audit [data-testid='cell-0-1']").click()  # the same row again (another cell: a new select)
    page.locator("button[role='tab']", has_text="Decision effects").click()
    detail = page.locator("#e3rl-effects-detail")
    page.wait_for_function("(document.querySelector('#e3rl-effects-detail')?.innerText || '').length > 20",
                           timeout=30_000)
    detail.screenshot(path=str(out / f"{prefix}effects-detail.png"))


def _around(locator, page, below: int = 200) -> dict:
    """A clip of the page around an element: its box widened to the window, and ``below`` px more."""
    box = locator.bounding_box()
    width = page.viewport_size["width"]
    return {"x": 0, "y": max(0, box["y"] - 60), "width": width, "height": min(box["height"] + 60 + below, 1600)}


if __name__ == "__main__":
    sys.exit(main())
