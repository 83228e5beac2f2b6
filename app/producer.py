"""Where a generation runs while the UI streams it: a thread of this process, or a forked child.

Both producers expose the same surface to ``session.stream_generation``: ``events`` (appended
here only; readers take a prefix), ``error``, ``stop`` (set by the consumer to end early, and here
at the end), ``first_token``, and ``start``/``join``.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Any, Callable, Iterator

from e3rl_core.errors import E3RLError
from e3rl_core.events import Event

ENGINES = ("thread", "process")


def fork_available() -> bool:
    """Whether the engine can run in a forked child process (Linux; fork is unsafe on macOS and
    missing on Windows)."""
    import multiprocessing

    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


class Producer(threading.Thread):
    """Runs the engine in its own thread and appends events to a list.

    The UI's generator is advanced by gradio one item at a time, and gradio serializes and sends
    each frame before asking for the next; if the engine ran inside that generator it would stand
    still during every frame. Here it keeps generating while a frame is on its way."""

    def __init__(self, run: Callable[[], Iterator[Event]]) -> None:
        super().__init__(daemon=True, name="e3rl-generate")
        self._run = run
        self.events: list[Event] = []  # appended by this thread only; readers take a prefix
        self.error: BaseException | None = None
        self.stop = threading.Event()  # set by the consumer to end early, and here at the end
        self.first_token = threading.Event()

    def _take(self, events: list[Event]) -> None:
        self.events.extend(events)
        if not self.first_token.is_set() and any(ev.kind == "token" for ev in events):
            self.first_token.set()

    def run(self) -> None:
        stream = self._run()
        try:
            for ev in stream:
                self._take([ev])
                if self.stop.is_set():
                    break
        except BaseException as err:  # handed to the consumer, which raises it in the handler
            self.error = err
        finally:
            stream.close()
            self.stop.set()
            self.first_token.set()


class ProcessProducer(Producer):
    """Runs the engine in a forked child process; this thread receives its events.

    A thread shares the interpreter lock with the web server: every frame gradio serializes and
    sends is time the (Python-bound) engine cannot run, and the two threads' objects bounce between
    the cores. A forked child has its own interpreter and starts at once (the loaded model is
    shared copy-on-write). It generates on one torch thread: OpenMP's thread pool does not survive
    fork (a child that opens a parallel region after the parent did hangs), and one thread never
    opens one."""

    def run(self) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        receive, send = ctx.Pipe(duplex=False)
        halt = ctx.Event()
        child = ctx.Process(target=_engine_child, args=(self._run, send, halt), daemon=True, name="e3rl-generate")
        try:
            child.start()
            send.close()  # the child's end; the parent keeps only its own
            halted_at: float | None = None
            while True:
                if self.stop.is_set() and halted_at is None:
                    halt.set()
                    halted_at = time.perf_counter()
                if halted_at is not None and time.perf_counter() - halted_at > 10:
                    break  # asked to stop and did not: killed below
                if not receive.poll(0.05):
                    continue
                try:
                    kind, payload = receive.recv()
                except EOFError:  # the child died without a word (killed, out of memory, a crash)
                    child.join(5)
                    raise E3RLError(f"the generation process ended unexpectedly (exit code {child.exitcode}); "
                                    f"try again, or start the app with --engine thread") from None
                if kind == "events":
                    self._take(payload)
                elif kind == "error":
                    raise payload
                else:
                    break
        except BaseException as err:
            self.error = err
        finally:
            halt.set()
            child.join(5)
            if child.is_alive():
                child.kill()
                child.join()
            receive.close()
            self.stop.set()
            self.first_token.set()


def _engine_child(run: Callable[[], Iterator[Event]], send: Any, halt: Any) -> None:
    """The forked child: generate on one torch thread and send events in batches (every 20 ms, the
    first token at once), then ("end", None) or ("error", exception)."""
    import torch

    torch.set_num_threads(1)
    batch: list[Event] = []
    stream = run()
    try:
        sent_at, waiting_first = time.perf_counter(), True
        for ev in stream:
            batch.append(ev)
            now = time.perf_counter()
            if now - sent_at >= 0.02 or (waiting_first and ev.kind == "token"):
                if not _deliver(send, ("events", batch)):
                    return
                batch, sent_at = [], now
                waiting_first = waiting_first and ev.kind != "token"
            if halt.is_set():
                break
        _deliver(send, ("events", batch)) and _deliver(send, ("end", None))
    except BaseException as err:
        _deliver(send, ("events", batch)) and _deliver(send, ("error", _portable(err)))
    finally:
        stream.close()
        send.close()


def _deliver(send: Any, message: tuple[str, Any]) -> bool:
    """Send to the parent; False when it has gone away (its end of the pipe is closed)."""
    try:
        send.send(message)
        return True
    except (BrokenPipeError, ConnectionResetError):
        return False


def _portable(err: BaseException) -> BaseException:
    """The exception as it can cross to the parent: itself if it pickles (with the child's
    traceback as a note), else a RuntimeError that names it."""
    import pickle
    import traceback

    err.add_note("in the generation process:\n" + "".join(traceback.format_exception(err)).rstrip())
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")
