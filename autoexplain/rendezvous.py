"""Calls from several threads answered by one batched call: how a local model's forward passes
take the simulations of many units at once while each unit's code stays a plain loop.

Each unit runs in its own thread as a `member`; its `call(request)` waits until every member
still at work is waiting too, and then one of them runs `fn` on all the waiting requests. A unit
whose next request depends on its last answer (best-of-k's halving) needs nothing special: it
waits for the next round like the others. Members that finish leave, so the rest never wait for
a thread that will not call again.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Sequence


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
                self._run_if_all_wait()

    def call(self, request):
        slot = {"request": request}
        with self._cond:
            self._waiting.append(slot)
            self._run_if_all_wait()
            while "answer" not in slot and "error" not in slot:
                self._cond.wait()
        if "error" in slot:
            raise slot["error"]
        return slot["answer"]

    def _run_if_all_wait(self) -> None:
        # Run with the lock held: every member is waiting or outside, and a thread that joins now
        # waits for this batch rather than starting a smaller one beside it.
        if not self._waiting or len(self._waiting) < self._live:
            return
        batch, self._waiting = self._waiting, []
        self.calls += 1
        try:
            answers = self.fn([s["request"] for s in batch])
            for s, a in zip(batch, answers, strict=True):
                s["answer"] = a
        except BaseException as e:  # noqa: BLE001 - each caller of the batch raises it
            for s in batch:
                s["error"] = e
        self._cond.notify_all()


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
