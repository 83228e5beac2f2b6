"""The live heatmap in Chromium on a paper-length trace: cost per frame vs trace length, click ->
first token, and the UI's tokens/s against the CLI's at 4k tokens.

    python scripts/bench_live_browser.py [--lengths 1024,4096,16384] [--pairs 3] [--rate-tokens 4096]

The model is random-init, Qwen3-shaped (hidden 256, 4 layers, GQA 8:4), with a byte-level BPE tokenizer of
512 tokens trained here and no end-of-sequence token, so a rollout runs to its token budget. The
app runs as its own process (`e3rl app`, its default engine), Playwright drives the system
Chromium; the Generate tab's defaults apply (erasure on: the e3rl policy, Erase@3) with segments of
at most 512 tokens, G = 1, max new tokens = the longest length.

Per frame, from one rollout of the longest length, over the frames while the trace grows through
the last 512 tokens before each length:
- browser main-thread time: Chromium's own TaskDuration (DevTools Performance.getMetrics), and the
  part of it spent in layout and style;
- server CPU: the app process's user + system time (/proc; the rollout itself runs in a worker
  process and is not counted);
- bytes received by the page (DevTools Network.dataReceived over the event stream).
The harness polls the page every 0.1 s for the frame number (the edits text's sequence number)
and the trace's length (kept tokens, from the summary line); a poll reads two short strings.

Then --pairs runs of --rate-tokens tokens in the UI, each followed by two `e3rl generate` runs of
the same model, prompt, seed and settings, each in a process warmed by a short run (on 1 and on 2
torch threads, the faster counted), with the app and the browser
stopped (SIGSTOP) meanwhile, as scripts/bench_app.py does: click -> first token (in the page) and
the rate the UI shows vs the CLI's (ratio within each pair).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from bench_app import WATCH, descendants, free_port, paused, start_app  # noqa: E402

PROMPT = "Let me think step by step.\n\n"  # two lines: used as written by the app and by --prompt
SEED = 0
CORPUS = ["Let me think step by step. 12 + 7 = 19, so the answer is 19.\n\n",
          "First, compute the sum. Then check it: café, naïve, 東京, résumé.\n\n"] * 50
POLL = """() => {
  const e = document.querySelector('#e3rl-live-edits textarea');
  const m = e && /"n": (\\d+)/.exec(e.value.slice(0, 24));
  const s = document.querySelector('#e3rl-summary');
  const t = s && /kept (\\d+)/.exec(s.textContent);
  return [m ? +m[1] : -1, t ? +t[1] : 0, !!(s && s.textContent.includes('finished:'))];
}"""


def make_model(path: Path, longest: int) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from e3rl_core.models import byte_level_bpe

    tok = byte_level_bpe(CORPUS, 512, ["<pad>"], pad_token="<pad>")
    # the small-qwen3 preset's shape: a CPU decodes it at ~100-200 tokens/s, a few times a real
    # model's rate on a GPU, so a frame carries a realistic number of tokens
    config = AutoConfig.for_model("qwen3", vocab_size=len(tok), hidden_size=256, intermediate_size=768,
                                  num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                                  max_position_embeddings=longest + 256, initializer_range=0.02, eos_token_id=None,
                                  pad_token_id=0)
    import torch

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)


def request_config(path: Path, tokens: int) -> dict:
    """The generation config the app builds for this bench's request (the CLI reads it from the
    model directory, so both sides run the same settings)."""
    from app.session import GenRequest

    req = GenRequest(model=str(path), prompt=PROMPT, gold="", max_new_tokens=tokens, segment_tokens=512,
                     group_size=1, seed=SEED)
    return req.config(str(path)).to_dict()


def open_page(browser, url: str, model: Path, tokens: int, segment_tokens: int = 512):
    """A page with the bench's request typed in (segments of at most ``segment_tokens``), ready to
    click Generate."""
    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    page.goto(url, wait_until="load")
    page.get_by_role("button", name="Generate", exact=True).wait_for()
    box = page.locator("#e3rl-model input").first
    box.fill(str(model))
    box.press("Enter")
    box.blur()
    page.locator("#e3rl-prompt textarea").fill(PROMPT)
    page.locator("#e3rl-gold").locator("textarea, input").first.fill("")
    page.get_by_text("sampling and E3RL").click()
    for elem, value in {"#e3rl-max-new-tokens": tokens, "#e3rl-segment-tokens": segment_tokens, "#e3rl-group-size": 1}.items():
        number = page.locator(f"{elem} input[type='number']")
        for _ in range(5):  # a slider takes a typed value asynchronously: type again until it shows it
            number.fill(str(value))
            number.press("Enter")
            try:
                page.wait_for_function("([sel, v]) => document.querySelector(sel + \" input[type='range']\").value"
                                       " === v", arg=[elem, str(value)], timeout=3_000)
                break
            except Exception:  # playwright's TimeoutError
                continue
        else:
            sys.exit(f"error: the page did not take {value} in {elem}")
    page.wait_for_timeout(300)
    return page


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def task_metrics(cdp) -> dict[str, float]:
    return {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}


def long_run(browser, url: str, model: Path, longest: int, server_pid: int) -> tuple[list[dict], dict]:
    """``_long_run``, again if the page ran another model (a typed model box the page had not taken)."""
    for _ in range(3):
        samples, info = _long_run(browser, url, model, longest, server_pid)
        if f"kept {longest}," in info["summary"]:
            return samples, info
        print(f"warning: the run did not keep {longest} tokens ({info['summary']!r}); running it again",
              file=sys.stderr)
    sys.exit("error: the page did not run the bench's request three times in a row")


def _long_run(browser, url: str, model: Path, longest: int, server_pid: int) -> tuple[list[dict], dict]:
    """One rollout of ``longest`` tokens, sampled every 0.1 s: frame number, tokens, main-thread
    time, server CPU, bytes received."""
    page = open_page(browser, url, model, longest)
    cdp = page.context.new_cdp_session(page)
    cdp.send("Performance.enable")
    cdp.send("Network.enable")
    received = [0]
    cdp.on("Network.dataReceived", lambda e: received.__setitem__(0, received[0] + e["dataLength"]))
    page.evaluate(WATCH)
    page.get_by_role("button", name="Generate", exact=True).click()
    samples = []
    while True:
        page.wait_for_timeout(100)
        frame, tokens, done = page.evaluate(POLL)
        m = task_metrics(cdp)
        samples.append(dict(frame=frame, tokens=tokens, done=done, task=m["TaskDuration"],
                            layout=m["LayoutDuration"] + m["RecalcStyleDuration"], script=m["ScriptDuration"],
                            server=cpu_seconds(server_pid), bytes=received[0], t=time.perf_counter()))
        if done:
            break
    marks = page.evaluate("() => window.__bench")
    summary = page.inner_text("#e3rl-summary")
    page.close()
    return samples, dict(first=(marks["first"] - marks["click"]) / 1000, summary=summary)


def per_frame(samples: list[dict], length: int, span: int = 512) -> dict:
    """Costs per frame while the trace grew from ``length - span`` to ``length`` tokens (the
    run's last frame excluded): the mean
    (all the work in the window over its frames, the rare redraws of an erased segment and the
    chart's redraws included) and the median over the poll intervals (a typical frame)."""
    # While the trace streams: the last frame (the whole trace, what a redraw or reconnect shows) is
    # not an edit, and it would fall in the window of the final length. Its bytes arrive before the
    # page has drawn it (the poll then still reads "not finished"), so the last second goes too.
    end = next((s["t"] for s in samples if s["done"]), float("inf")) - 1.0
    inside = [s for s in samples if length - span <= s["tokens"] <= length and s["frame"] >= 0 and s["t"] < end]
    if len(inside) < 2 or inside[-1]["frame"] == inside[0]["frame"]:
        return {}
    a, b = inside[0], inside[-1]
    frames = b["frame"] - a["frame"]
    steps = [(x, y) for x, y in zip(inside, inside[1:]) if y["frame"] > x["frame"]]

    def cost(key: str, scale: float) -> tuple[float, float]:
        mean = (b[key] - a[key]) * scale / frames
        return mean, statistics.median((y[key] - x[key]) * scale / (y["frame"] - x["frame"]) for x, y in steps)

    return dict(frames=frames, tokens_per_frame=(b["tokens"] - a["tokens"]) / frames,
                task=cost("task", 1e3), layout=cost("layout", 1e3), server=cost("server", 1e3),
                kib=cost("bytes", 1 / 1024), rate=(b["tokens"] - a["tokens"]) / (b["t"] - a["t"]))


CLI = """
import contextlib, io, re, sys, torch
from e3rl_core.cli import main
torch.set_num_threads(int(sys.argv.pop(1)))
for args in (sys.argv[1:] + ["--max-new-tokens", "64"], sys.argv[1:]):  # a short warm-up run, then the timed one
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        main(args)
m = re.search(r"(\\d+) tokens generated.*?([\\d.]+) s \\(", err.getvalue())
print(m.group(2), m.group(1))
"""


def cli_rate(model: Path, tokens: int) -> float:
    """``e3rl generate`` on the same request (settings from the model directory), warm, on 1 and on
    2 torch threads, whichever is faster (a small model decodes faster on one thread than on two
    here, and the CLI's user would pick the faster)."""
    args = ["generate", "--model", str(model), "--prompt", PROMPT, "--group-size", "1", "--seed", str(SEED),
            "--max-new-tokens", str(tokens), "--device", "cpu"]
    best = 0.0
    for threads in (1, 2):
        out = subprocess.run([sys.executable, "-c", CLI, str(threads), *args], capture_output=True, text=True,
                             cwd=ROOT, check=True)
        seconds, generated = out.stdout.split()
        best = max(best, int(generated) / float(seconds))
    return best


def rate_pair(browser, url: str, model: Path, tokens: int) -> dict:
    for _ in range(3):
        pair = _rate_pair(browser, url, model, tokens)
        if pair:
            return pair
    sys.exit("error: the page did not run the bench's request three times in a row")


def _rate_pair(browser, url: str, model: Path, tokens: int) -> dict | None:
    """A UI run of the request and the CLI's rate right after it; None if the page ran another model."""
    page = open_page(browser, url, model, tokens)
    page.evaluate(WATCH)
    page.get_by_role("button", name="Generate", exact=True).click()
    page.wait_for_function("() => window.__bench.done", polling=500, timeout=900_000)
    marks = page.evaluate("() => window.__bench")
    text = page.inner_text("#e3rl-summary")
    page.close()
    if f"kept {tokens}," not in text:
        print(f"warning: the run did not keep {tokens} tokens ({text!r}); running it again", file=sys.stderr)
        return None
    generated = int(re.search(r"tokens generated (\d+)", text).group(1))
    shown = float(re.search(r"\(([\d.]+) tok/s", text).group(1))
    first = (marks["first"] - marks["click"]) / 1000
    seen = generated / ((marks["done"] - marks["first"]) / 1000)
    with paused(descendants(os.getpid())):  # the CLI alone on the machine, right after the UI run
        cli = cli_rate(model, tokens)
    return dict(first=first, shown=shown, seen=seen, cli=cli, generated=generated)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="1024,4096,16384", help="trace lengths (tokens) to report per-frame costs at")
    p.add_argument("--pairs", type=int, default=3, help="UI runs of --rate-tokens, each paired with CLI runs")
    p.add_argument("--rate-tokens", type=int, default=4096)
    p.add_argument("--chromium", default="/usr/bin/chromium")
    args = p.parse_args()
    lengths = sorted(int(x) for x in args.lengths.split(","))
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="e3rl-bench-live-"))
    model = tmp / "bpe-qwen3"
    make_model(model, max(lengths + [args.rate_tokens]))
    # The model's recommended settings = the app's request, so `e3rl generate` runs the same.
    (model / "e3rl_generation.json").write_text(json.dumps(request_config(model, args.rate_tokens)))
    port = free_port()
    server = start_app(port)
    url = f"http://127.0.0.1:{port}/"
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, headless=True,
                                         args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            warm = open_page(browser, url, model, 64)  # loads the model in the app once
            warm.get_by_role("button", name="Generate", exact=True).click()
            warm.wait_for_selector("#e3rl-summary :text('finished:')", timeout=300_000)
            warm.close()
            t0 = time.perf_counter()
            samples, info = long_run(browser, url, model, max(lengths), server.pid)
            print(f"{max(lengths):,}-token rollout in the UI: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            pairs = [rate_pair(browser, url, model, args.rate_tokens) for _ in range(args.pairs)]
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"Machine: {platform.machine()}, {os.cpu_count()} threads; Python {platform.python_version()}")
    print(f"One rollout of {max(lengths):,} tokens (G = 1, erasure on, segments <= 512 tokens); "
          f"{info['summary'].splitlines()[-1]}\n")
    print("Per frame: mean over the window (rare redraws included) / median over the harness's polls (a typical "
          "frame)\n")
    print("| tokens so far | frames in the window | tokens per frame | browser main thread | of which layout + "
          "style | server CPU | KiB received | tokens/s in the window |")
    print("|---|---|---|---|---|---|---|---|")
    rows = {n: per_frame(samples, n) for n in lengths}
    for n, r in rows.items():
        if not r:
            print(f"| {n:,} | (no frames in this window) | | | | | | |")
            continue
        cells = " | ".join(f"{r[k][0]:.1f} / {r[k][1]:.1f}{unit}" for k, unit in
                           (("task", " ms"), ("layout", " ms"), ("server", " ms"), ("kib", "")))
        print(f"| {n:,} | {r['frames']} | {r['tokens_per_frame']:.0f} | {cells} | {r['rate']:.0f} |")
    lo, hi = rows.get(lengths[0]), rows.get(lengths[-1])
    if lo and hi:
        ratio = {k: [hi[k][i] / max(lo[k][i], 1e-9) for i in (0, 1)] for k in ("task", "server", "kib")}
        print(f"\n{lengths[-1]:,} vs {lengths[0]:,} tokens, per frame, mean / median (goal <= 1.5x): browser "
              f"{ratio['task'][0]:.2f}x / {ratio['task'][1]:.2f}x, server {ratio['server'][0]:.2f}x / "
              f"{ratio['server'][1]:.2f}x, bytes {ratio['kib'][0]:.2f}x / {ratio['kib'][1]:.2f}x")
    firsts = ", ".join(f"{x['first']:.2f}" for x in pairs)
    print(f"\nclick -> first token: {info['first']:.2f} s in the long run; {firsts} s in the "
          f"{args.rate_tokens:,}-token runs (goal < 1.5 s)")
    print(f"\n| {args.rate_tokens:,}-token run | tokens generated | UI rate shown | UI, first token -> finished | "
          f"CLI (alone) | shown / CLI (goal >= 0.8x) |")
    print("|---|---|---|---|---|---|")
    for i, x in enumerate(pairs):
        print(f"| {i + 1} | {x['generated']:,} | {x['shown']:.0f} tok/s | {x['seen']:.0f} tok/s | {x['cli']:.0f} tok/s "
              f"| {x['shown'] / x['cli']:.2f}x |")
    if pairs:
        print(f"| median | | | | | {statistics.median(x['shown'] / x['cli'] for x in pairs):.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
