"""Where a generation runs while the UI streams it: a thread of this process, or a forked child.

Both producers expose the same surface to ``session.stream_generation``: ``events`` (appended
here only; readers take a prefix), ``error``, ``stop`` (set by the consumer to end early, and here
at the end), ``first_token``, and ``start``/``join``.
"""
from __future__ import annotations

import contextlib
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


def fork_safe(device: str) -> bool:
    """Whether a worker forked from this process can run a model on ``device``: CUDA (and MPS)
    state does not survive fork, so a forked child touching a GPU model fails or hangs; only CPU
    models can be shared with forked workers."""
    return device.split(":")[0] == "cpu"


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

    def run(self) -> None:
        stream: Iterator[Event] | None = None
        try:
            stream = self._run()
            for ev in stream:  # per token: keep it lean
                self.events.append(ev)
                if ev.kind == "token" and not self.first_token.is_set():
                    self.first_token.set()
                if self.stop.is_set():
                    break
        except BaseException as err:  # handed to the consumer, which raises it in the handler
            self.error = err
        finally:
            if stream is not None and hasattr(stream, "close"):
                stream.close()
            self.stop.set()
            self.first_token.set()


class ProcessProducer(Producer):
    """Runs the engine in a forked worker process (see ``Workers``); this thread receives its
    events. ``job(context)`` must pickle (a module-level function, or a partial of one): it is sent
    to the worker, which calls it with its copy of the pool's context."""

    def __init__(self, job: Callable[[Any], Iterator[Event]], workers: "Workers", needs: str) -> None:
        super().__init__(lambda: iter(()))
        self._job, self._workers, self._needs = job, workers, needs

    def _take(self, events: list[Event]) -> None:
        """A batch from a worker."""
        self.events.extend(events)
        if not self.first_token.is_set() and any(ev.kind == "token" for ev in events):
            self.first_token.set()

    def run(self) -> None:
        worker: _Worker | None = None
        reusable = False
        try:
            worker = self._workers.acquire(self._needs)
            worker.halt.clear()
            worker.jobs.send(self._job)
            halted_at: float | None = None
            while True:
                if self.stop.is_set() and halted_at is None:
                    worker.halt.set()
                    halted_at = time.perf_counter()
                if halted_at is not None and time.perf_counter() - halted_at > 10:
                    break  # asked to stop and did not: killed below
                if not worker.events.poll(0.05):
                    continue
                try:
                    kind, payload = worker.events.recv()
                except EOFError:  # the worker died without a word (killed, out of memory, a crash)
                    worker.proc.join(5)
                    raise E3RLError(f"the generation process ended unexpectedly (exit code "
                                    f"{worker.proc.exitcode}); try again, or start the app with --engine "
                                    f"thread") from None
                if kind == "events":
                    self._take(payload)
                    continue
                reusable = True  # it finished the job and waits for the next
                if kind == "error":
                    raise payload
                break
        except BaseException as err:
            self.error = err
        finally:
            # Done: the consumer may go on (the events are complete) while the worker is put back.
            self.stop.set()
            self.first_token.set()
            if worker is not None:
                self._workers.release(worker, reusable)


class _Worker:
    """A forked child that runs one job at a time; ``models``: what the parent had loaded when it
    forked (shared copy-on-write)."""

    def __init__(self, context: Any, models: frozenset[str]) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        job_out, job_in = ctx.Pipe(duplex=False)
        self.events, event_out = ctx.Pipe(duplex=False)
        self.jobs = job_in
        self.halt = ctx.Event()
        self.models = models
        # The child lets go of everything else it inherits, the parent's ends of these pipes
        # included: a pipe reads as ended only when every writer has closed it.
        self.proc = ctx.Process(target=_worker_main, args=(context, job_out, event_out, self.halt), daemon=True,
                                name="e3rl-engine")
        try:
            self.proc.start()
        except OSError as err:  # fork can fail for want of memory or process slots
            self.close()
            raise E3RLError(f"cannot start a generation process ({err}); free some memory, or start the app "
                            f"with --engine thread") from None
        finally:
            job_out.close()  # the child's ends; the parent keeps only its own
            event_out.close()

    def close(self) -> None:
        """End the worker (it is idle, or killed if it does not end at once) and its pipes."""
        if self.proc.pid is not None:
            with contextlib.suppress(OSError):
                self.jobs.send(None)
            self.proc.join(1)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
        self.jobs.close()
        self.events.close()


class Workers:
    """Forked worker processes for ``ProcessProducer``, reused from one generation to the next.

    Why a child process: in a thread, the Python-bound engine shares the interpreter lock with the
    web server, so every frame gradio builds and sends is time the engine cannot run. A forked
    child has its own interpreter, and shares the loaded model copy-on-write. Why reused: a fork
    per generation pays the fork, the child's first-touch page copies and its exit (measured on
    the default example without a browser: 0.62 s against 0.55 s in a thread; a reused worker,
    0.675 against 0.664 s). Workers generate on one torch thread: OpenMP's
    pool does not survive fork (a child that opens a parallel region after its parent did hangs),
    and one thread never opens one.

    ``context`` (the model store) is what jobs get in the worker, as it was at the fork; a worker
    forked before the model a job needs was loaded here is replaced, so weights are never loaded
    twice. ``context.loaded()`` names the loaded models; ``context.forked()``, if present, runs
    first in each worker (to reset locks a parent thread may have held at the fork)."""

    def __init__(self, context: Any, keep: int = 2) -> None:
        self._context = context
        self._keep = keep  # idle workers kept (the app's queue runs two generations at once)
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()

    def acquire(self, needs: str) -> _Worker:
        with self._lock:
            while self._idle:
                worker = self._idle.pop()
                if worker.proc.is_alive() and needs in worker.models:
                    return worker
                worker.close()
        return _Worker(self._context, frozenset(self._context.loaded()))

    def release(self, worker: _Worker, reusable: bool) -> None:
        with self._lock:
            if reusable and worker.proc.is_alive() and len(self._idle) < self._keep:
                self._idle.append(worker)
                return
        worker.close()

    def close(self) -> None:
        """End every idle worker (busy ones end when their generation does)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.close()


def _worker_main(context: Any, jobs: Any, send: Any, halt: Any) -> None:
    """A worker's life: one torch thread; run each job it is sent until None or its parent is gone."""
    import signal

    import torch

    # Ctrl-C in a terminal reaches the whole process group: the parent handles it, and its
    # workers end with it (their job pipe ends), without a traceback each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM ends a worker, whatever handler the parent had when it forked (``e3rl train`` run
    # in-process installs a stop-after-this-step handler): multiprocessing terminates daemonic
    # children at exit and then joins them, which would otherwise wait forever.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):  # /proc/self/fd
        _release_inherited_fds({jobs.fileno(), send.fileno()})
    if hasattr(context, "forked"):
        context.forked()
    while True:
        try:
            job = jobs.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if job is None or not _run_job(job, context, send, halt):
            return


def _release_inherited_fds(keep: set[int]) -> None:
    """Let go of every file descriptor the fork copied except stdio and ``keep``: the server's
    listening socket and open connections, a client's, pipes to other processes (a test's browser
    driver, the other workers). A connection or pipe stays open until every process holding it lets
    go, so a copy kept here would hold a finished response open, or keep a process that waits for
    the end of its input from ever seeing it. Each becomes /dev/null at the same number, so a stale
    object closing it later cannot close something else."""
    import os

    null = os.open(os.devnull, os.O_RDWR)
    try:
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd > 2 and fd != null and fd not in keep:
                with contextlib.suppress(OSError):  # the listing's own fd is gone by now
                    os.dup2(null, fd)
    finally:
        os.close(null)


def _run_job(job: Callable[[Any], Iterator[Event]], context: Any, send: Any, halt: Any) -> bool:
    """Send the job's events in batches (every 20 ms, the first token at once), then ("end", None)
    or ("error", exception). False when the parent has gone away."""
    batch: list[Event] = []
    stream: Iterator[Event] | None = None
    try:
        stream = job(context)
        sent_at, waiting_first = time.perf_counter(), True
        for ev in stream:
            batch.append(ev)
            now = time.perf_counter()
            if now - sent_at >= 0.02 or (waiting_first and ev.kind == "token"):
                if not _deliver(send, ("events", batch)):
                    return False
                batch, sent_at = [], now
                waiting_first = waiting_first and ev.kind != "token"
            if halt.is_set():
                break
        return _deliver(send, ("events", batch)) and _deliver(send, ("end", None))
    except BaseException as err:
        return _deliver(send, ("events", batch)) and _deliver(send, ("error", _portable(err)))
    finally:
        if stream is not None and hasattr(stream, "close"):
            stream.close()


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
