"""Stopping a run at once: Ctrl-C (SIGINT) or SIGTERM ends a command within seconds, also while
LLM requests are in flight or waiting to retry.

Python's KeyboardInterrupt alone does not: the kernel hands a signal to any thread of the process,
and Python runs the handler only in the main thread, once that thread runs Python code again; a
main thread waiting on a future (a stage on its units, a flow on its tasks) may not for minutes.
The units wait on their LLM requests, which wait on the server up to the request timeout and then
retry after a backoff, and a thread pool's threads are joined when the interpreter exits. So:

- `signals()` (every CLI command runs inside it) sets handlers for SIGINT and SIGTERM and a wakeup
  fd: Python's C-level handler writes the signal's number there from whichever thread got it, and
  a watcher thread reads it and calls `stop` at once. The handler in the main thread, when it runs,
  raises `Interrupted` there (once: Prefect's SIGTERM bridge sends the signal again while unwinding;
  the CLI's `console.run_or_exit` turns it, or any exception that unwinds a stopped run, into its line).
- `stop(signum)` sets the process's stop flag and calls `abandon()` on everything `watch`ed: a
  `Pool` fails every future not yet done with `Interrupted`, so whoever waits on it returns at once;
  a limiter wakes its waiters. Code that would wait checks the flag: `check()` before each LLM
  attempt (none is sent after a stop), `sleep()` for backoff and rate-limit waits.
- `Pool` runs LLM requests on daemon threads: one blocked in a socket read is abandoned when the
  process exits, not joined (ThreadPoolExecutor's threads are).
- `shielded(fn)` starts a helper process (Prefect's temporary server, `flows.server`) with SIGINT
  and SIGTERM blocked: a terminal's Ctrl-C goes to the whole process group, as does the SIGTERM of
  `timeout` or a CI runner (systemd's, to every process of the service), and the run must still
  record its end there.
- Should the command still run `GRACE` seconds after the signal (a wait none of this reaches), the
  watcher runs the exit handlers (Prefect's temporary server stops) and ends the process.

A stopped stage seals nothing (the exception unwinds past `Stage.seal`; its temporary folder goes).
Answers already received are in the response cache and finished units in the memo, so rerunning
the same command goes on from there.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import signal
import threading
import weakref
from concurrent.futures import Future, InvalidStateError
from contextlib import contextmanager
from typing import Callable

SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE = 10.0  # seconds from the signal to a forced end; a stop that works takes a few

_STOP = threading.Event()
_GOT: list[int] = []  # the signal that stopped the run
_RAISED: list[bool] = []  # the main thread's handler has raised
_WATCHED: weakref.WeakSet = weakref.WeakSet()
_LOCK = threading.Lock()
_INSTALLED: list[bool] = []
_FORGIVE = threading.Event()  # set by `reset`: a stop before it ends nothing after it
_SILENCED: list[Callable[[], None]] = []  # what gives back the logging a stop silenced


class Interrupted(KeyboardInterrupt):
    """The run was told to stop (SIGINT or SIGTERM): raised wherever it was waiting."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    def __reduce__(self):
        return (type(self), (self.signum,))


def stopping() -> bool:
    return _STOP.is_set()


def signum() -> int:
    """The signal that stopped the run (SIGINT when it was stopped otherwise)."""
    return _GOT[0] if _GOT else int(signal.SIGINT)


def check() -> None:
    if _STOP.is_set():
        raise Interrupted(signum())


def sleep(seconds: float) -> None:
    """time.sleep, ended by a stop (raising Interrupted)."""
    if _STOP.wait(max(0.0, seconds)):
        raise Interrupted(signum())


def watch(thing) -> None:
    """Call `thing.abandon()` at a stop (at once if stopped already). Held weakly."""
    with _LOCK:
        _WATCHED.add(thing)
        now = _STOP.is_set()
    if now:
        thing.abandon()


def stop(signum: int = signal.SIGINT) -> bool:
    """Stop the run: True for the call that did, False when it was stopped already."""
    with _LOCK:
        watched = _stopped(signum)
    for thing in watched or ():
        thing.abandon()
    return watched is not None


def _stopped(signum: int) -> list | None:
    """Set the stop (under _LOCK) and return what to abandon; None when it was set already."""
    if _STOP.is_set():
        return None
    if not _GOT:
        _GOT.append(int(signum))
    _STOP.set()
    return list(_WATCHED)


def reset() -> None:
    """Clear a stop, for a process that goes on after one (tests, a user's notebook): its logging
    comes back, and no watcher of a block begun before now stops or ends it."""
    global _FORGIVE
    with _LOCK:
        _STOP.clear()
        _GOT.clear()
        _RAISED.clear()
        _FORGIVE.set()
        _FORGIVE = threading.Event()
        for loud in reversed(_SILENCED):  # under the lock: a stop that comes now silences after
            loud()
        _SILENCED.clear()


def _handler(signum, frame) -> None:
    # Takes no lock (the main thread may hold the one it would take): `stop` is the watcher's.
    if not _GOT:
        _GOT.append(int(signum))
    if not _RAISED:
        _RAISED.append(True)
        raise Interrupted(signum)


def _watch(fd: int, forced: Callable[[int], None], forgive: threading.Event) -> None:
    """Read signal numbers off the wakeup fd; at the first SIGINT or SIGTERM, stop the run and, if
    it has not ended GRACE seconds later, end the process.

    `forgive` is the event of the block's start, set by the next `reset`. This thread may read its
    signal late, after the block has ended and a reset has let the process go on: it then neither
    stops, silences nor ends what came after. The check, the stop and the silence are one step
    under _LOCK, as a reset is, and only a reset gives logging back (a forgiven watcher that did
    also gave back what a later stop had just silenced). Either slip, in a test suite that goes on
    after in-process stops, ended the whole suite 10 s later with exit 130."""
    while True:
        try:
            got = os.read(fd, 64)
        except OSError:
            got = b""
        if not got:  # the command ended and closed the pipe
            os.close(fd)
            return
        stopped = [s for s in got if s in SIGNALS]
        if stopped:
            break
    with _LOCK:
        late = forgive.is_set()
        watched = None if late else _stopped(stopped[0])
        if not late:
            _quiet()
    for thing in watched or ():
        thing.abandon()
    if late or forgive.wait(GRACE):  # a reset gave the logging back: the process goes on
        os.close(fd)
        return
    forced(signum())
    # The exit handlers (Prefect's temporary server is stopped by one), for a few seconds at most.
    ending = threading.Thread(target=atexit._run_exitfuncs, daemon=True)
    ending.start()
    ending.join(5.0)
    os._exit(128 + signum())


def _quiet() -> None:
    """No more log records (called under _LOCK): a stopped run says so in one line, not with the
    logs of its unwinding (Prefect logs a crash with its traceback, its internal loggers ignore
    `logging.disable`, and when Ctrl-C also stopped its temporary server, every call to it that
    fails). `reset` gives it back, for a process that goes on."""
    level = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    silenced = [logger for logger in [logging.getLogger(), *list(logging.Logger.manager.loggerDict.values())]
                if isinstance(logger, logging.Logger) and not logger.disabled]
    for logger in silenced:
        logger.disabled = True

    def loud() -> None:
        logging.disable(level)
        for logger in silenced:
            logger.disabled = False

    _SILENCED.append(loud)


@contextmanager
def signals(forced: Callable[[int], None]):
    """Stop the run on SIGINT or SIGTERM while the block runs (see the module's docstring).
    `forced(signum)` is called before the process is ended for not stopping in time. Only the main
    thread can set handlers; elsewhere, and inside another such block, this does nothing."""
    if threading.current_thread() is not threading.main_thread() or _INSTALLED:
        yield
        return
    read, write = os.pipe()
    os.set_blocking(write, False)
    before = {s: signal.signal(s, _handler) for s in SIGNALS}
    wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    _INSTALLED.append(True)
    threading.Thread(target=_watch, args=(read, forced, _FORGIVE), name="autoexplain-signals", daemon=True).start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(wakeup)
        for s, handler in before.items():
            if handler is not None:
                signal.signal(s, handler)
        _INSTALLED.clear()
        os.close(write)


def shielded(fn: Callable[[], object]) -> None:
    """Call fn in a thread that blocks SIGINT and SIGTERM, and wait for it: a process it starts
    inherits the blocked signals, so one sent to the whole process group (a terminal's Ctrl-C, the
    SIGTERM of `timeout`) does not reach it. For Prefect's temporary server: the stopped run's end
    must still be recorded there before the command exits (the command stops the server itself)."""
    failed: list[BaseException] = []

    def call():
        signal.pthread_sigmask(signal.SIG_BLOCK, set(SIGNALS))
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
            failed.append(e)

    thread = threading.Thread(target=call, name="autoexplain-shielded", daemon=True)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]


def ignore_ctrl_c() -> None:
    """For a helper process (a spawned pool worker): Ctrl-C in a terminal reaches the whole process
    group, and a worker it interrupts prints a traceback; the run's process ends its helpers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Pool:
    """Daemon threads, at most `workers`, that run what is submitted (an LLM's requests): `submit(fn,
    *args)` -> Future. At a stop every future not done yet fails with Interrupted, so its caller
    returns at once; a call already running goes on in its thread until it ends or the process does."""

    def __init__(self, workers: int, name: str):
        self._workers, self._name = workers, name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._threads = 0
        self._open: set[Future] = set()
        self._lock = threading.Lock()
        self._closed = False
        watch(self)

    def submit(self, fn, *args) -> Future:
        check()
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("submit to a closed Pool")
            self._open.add(future)
        future.add_done_callback(self._forget)
        self._queue.put((future, fn, args))
        if not self._idle.acquire(blocking=False):
            with self._lock:
                if self._threads < self._workers:
                    self._threads += 1
                    threading.Thread(target=self._work, name=f"{self._name}_{self._threads}", daemon=True).start()
        return future

    def _forget(self, future: Future) -> None:
        with self._lock:
            self._open.discard(future)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            _run(*item)
            del item
            self._idle.release()

    def abandon(self) -> None:
        with self._lock:
            waiting = list(self._open)
        for future in waiting:
            _settle(future.set_exception, Interrupted(signum()))

    def close(self) -> None:
        """Cancel what has not started and let the threads end (none is waited for)."""
        with self._lock:
            self._closed, threads = True, self._threads
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in range(threads):
            self._queue.put(None)


def _run(future: Future, fn, args) -> None:
    try:
        if not future.set_running_or_notify_cancel():
            return  # cancelled before it started
    except RuntimeError:
        return  # failed by a stop before it started
    try:
        result = fn(*args)
    except BaseException as e:  # noqa: BLE001 - the caller of the future raises it
        _settle(future.set_exception, e)
    else:
        _settle(future.set_result, result)


def _settle(setter, value) -> None:
    try:
        setter(value)
    except InvalidStateError:
        pass  # a stop failed it first: its caller has gone
