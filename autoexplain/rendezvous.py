"""Calls from several threads answered by one batched call: how a local model's forward passes
take the simulations of many units at once while each unit's code stays a plain loop.

Each unit runs in a pool thread as a `member`; its `call(request)` waits until every member still
at work is waiting too, and then the thread that serves (`in_order`, the stage's own thread) runs
`fn` on all the waiting requests. The model runs only in that thread: torch's intra-op threads
behave differently in pool threads (on a loaded 2-core machine the same three simulate calls of
the tiny model took 5.3 s in the main thread and 0.14 s in a pool thread, a difference that would
have passed for a batching gain). A unit
whose next request depends on its last answer (best-of-k's halving) needs nothing special: it
waits for the next round like the others. Members that finish leave, so the rest never wait for a
thread that will not call again.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from autoexplain import interrupt


class Rendezvous:
    def __init__(self, fn: Callable[[Sequence], list]):
        self.fn = fn  # requests -> one answer per request, in order
        self.calls = 0  # how many times fn ran
        self._cond = threading.Condition()
        self._live = 0
        self._waiting: list[dict] = []

    @contextmanager
    def member(self):
        """The block of one thread whose calls are gathered with the other members'."""
        with self._cond:
            self._live += 1
        try:
            yield self
        finally:
            with self._cond:
                self._live -= 1
                self._cond.notify_all()

    def call(self, request):
        slot = {"request": request}
        with self._cond:
            self._waiting.append(slot)
            self._cond.notify_all()
            while "answer" not in slot and "error" not in slot:
                self._cond.wait()
        if "error" in slot:
            raise slot["error"]
        return slot["answer"]

    def _serve_once(self, stop: Callable[[], bool]) -> None:
        """Run one gathered batch once every member waits, or return when `stop()` holds."""
        with self._cond:
            while not (self._waiting and len(self._waiting) >= self._live):
                if stop():
                    return
                # A finished unit's future is set just after its member leaves: look again soon.
                self._cond.wait(timeout=0.05)
            batch, self._waiting = self._waiting, []
        self.calls += 1
        try:
            interrupt.check()  # a stopped run computes nothing more: each member raises and leaves
            answers = self.fn([s["request"] for s in batch])
            for s, a in zip(batch, answers, strict=True):
                s["answer"] = a
        except BaseException as e:  # noqa: BLE001 - each caller of the batch raises it
            for s in batch:
                s["error"] = e
        with self._cond:
            self._cond.notify_all()

    def in_order(self, fn: Callable, items: Sequence, workers: int) -> Iterator:
        """fn(item) for each item in `workers` pool threads, each a member, serving their calls in
        this thread; results in the items' order. On an error the units already running finish
        (their calls are still served) before it is raised; after a stop (`interrupt`) their calls
        fail at once instead."""
        def member_fn(item):
            with self.member():
                return fn(item)

        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(items))), thread_name_prefix="units") as pool:
            futures = [pool.submit(member_fn, item) for item in items]
            try:
                for f in futures:
                    while not f.done():
                        self._serve_once(f.done)
                    yield f.result()
            finally:
                for f in futures:
                    f.cancel()
                for f in futures:
                    while not f.done():
                        self._serve_once(f.done)


class GatheredSimulator:
    """A simulator whose `simulate_many` calls, from many unit threads, run as one `simulate_jobs`
    call; everything else is the simulator's own."""

    def __init__(self, simulator):
        self.simulator = simulator
        self.rendezvous = Rendezvous(simulator.simulate_jobs)

    def simulate_many(self, explanations, records):
        return self.rendezvous.call((list(explanations), list(records)))

    def simulate(self, explanation, records):
        return self.simulate_many([explanation], records)[0]

    def __getattr__(self, name):
        return getattr(self.simulator, name)
