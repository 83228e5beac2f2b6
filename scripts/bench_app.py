"""Benchmark: the workbench in a real browser vs the CLI, same settings, side by side.

    python scripts/bench_app.py [--repeats 3]

UI: Playwright drives the system Chromium (/usr/bin/chromium) against a launched app; it clicks
Generate on the default example and measures click -> first coloured token in the page, and
click -> the "finished" line (all rollouts done), giving tokens/s as seen by the user.
CLI: `e3rl generate` with the same model, prompt, seed and settings (its own elapsed time, model
load excluded, as it reports). Repeats alternate UI and CLI; medians are printed as a table.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ui_once(page, url: str, question: str, group: int) -> tuple[float, float, int]:
    page.goto(url, wait_until="domcontentloaded")
    page.get_by_role("button", name="Generate", exact=True).wait_for()
    prompt = page.get_by_label("prompt (a one-line question is wrapped in the task template)")
    prompt.fill(question)
    box = page.locator(".block", has_text="group size G").locator("input[type='number']").first
    box.fill(str(group))
    box.press("Enter")
    page.wait_for_timeout(300)
    t0 = time.perf_counter()
    page.get_by_role("button", name="Generate", exact=True).click()
    page.wait_for_selector("#e3rl-heatmap .e3rl-tok", timeout=120_000)
    first = time.perf_counter() - t0
    page.wait_for_selector("#e3rl-summary :text('finished:')", timeout=300_000)
    total = time.perf_counter() - t0
    text = page.inner_text("#e3rl-summary")
    tokens = int(re.search(r"finished: (\d+) tokens", text).group(1))
    return first, total, tokens


def cli_once(question: str, gold: str, group: int, seed: int) -> tuple[float, int]:
    cmd = [sys.executable, "-m", "e3rl_core.cli", "generate", "--model", "checkpoints/arith-demo", "--question",
           question, "--group-size", str(group), "--seed", str(seed), "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True).stderr
    m = re.search(r"(\d+) tokens generated.*?([\d.]+) s \(", out)
    return float(m.group(2)), int(m.group(1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--example", type=int, default=0, help="which built-in example (0 = the default)")
    p.add_argument("--group-size", type=int, default=None, help="G (default: the app's default)")
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    from app.main import launch
    from app.ui import DEFAULTS, examples

    question, gold = examples()[args.example]
    group = args.group_size or DEFAULTS["group_size"]
    demo, url = launch(port=free_port(), block=False)
    ui, cli = [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 1400})
        ui_once(page, url, question, group)  # warm-up: model load, first compile of the page
        for _ in range(args.repeats):
            ui.append(ui_once(page, url, question, group))
            cli.append(cli_once(question, gold, group, DEFAULTS["seed"]))
        browser.close()
    demo.close()
    ui_first = statistics.median(u[0] for u in ui)
    ui_rate = statistics.median(u[2] / u[1] for u in ui)
    cli_rate = statistics.median(c[1] / c[0] for c in cli)
    same = {u[2] for u in ui} | {c[1] for c in cli}
    print(f"Machine: {platform.machine()}, {os.cpu_count()} threads; Python {platform.python_version()}")
    print(f"Settings: checkpoints/arith-demo, example {args.example}, G={group}, seed {DEFAULTS['seed']}, "
          f"T={DEFAULTS['temperature']}, policy {DEFAULTS['policy']}; tokens per run: {sorted(same)}; "
          f"medians of {args.repeats} alternating repeats\n")
    print("| measure | UI (browser) | CLI | ratio | goal |")
    print("|---|---|---|---|---|")
    print(f"| click -> first streamed token | {ui_first:.2f} s | - | - | < 1.5 s |")
    ui_stream = statistics.median(u[2] / max(u[1] - u[0], 1e-9) for u in ui)
    print(f"| throughput, click -> all rollouts finished | {ui_rate:.0f} tok/s | {cli_rate:.0f} tok/s | "
          f"{ui_rate / cli_rate:.2f}x | >= 0.8x |")
    print(f"| throughput, first token -> finished | {ui_stream:.0f} tok/s | {cli_rate:.0f} tok/s | "
          f"{ui_stream / cli_rate:.2f}x | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
