"""Limits of the server LLMs: a token bucket, for requests per minute and for tokens per minute,
and `Slots`, the number of requests in flight at once.

`OpenAILLM` takes one token of its requests bucket and a request's estimated tokens from its tokens
bucket before each attempt, and settles the tokens bucket with the server's count once answered;
it holds a slot for each attempt and takes one slot away for good when a request times out (see
`llm_openai`). The limits are set per process with `llm.set_limits`. Their waits end at a stop
(`interrupt`), raising Interrupted.
"""

from __future__ import annotations

import threading
import time

from autoexplain import interrupt


class TokenBucket:
    """A rate per minute with a burst: `acquire(n)` takes n (one request, or a request's estimated
    tokens), waiting for the refill if needed; `settle(n)` takes n more, or gives -n back, once the
    true count is known. `spent` is everything taken."""

    def __init__(self, per_minute: float, burst: float = 1):
        self.rate, self.capacity = per_minute / 60.0, float(max(1, burst))
        self._tokens, self._t = self.capacity, time.monotonic()
        self.spent = 0.0
        self._lock = threading.Lock()

    def _take(self, amount: float) -> float:
        """Take `amount` now (under the lock) and return how long the taker must wait for it."""
        now = time.monotonic()
        self._tokens = min(self.capacity, self._tokens + (now - self._t) * self.rate)
        self._t = now
        self._tokens = min(self.capacity, self._tokens - amount)  # a refund never lifts it above the burst
        self.spent += amount
        return -self._tokens / self.rate if self._tokens < 0 else 0.0

    def acquire(self, amount: float = 1) -> None:
        with self._lock:
            wait = self._take(amount)  # reserved now, so waiters are served in arrival order
        if wait > 0:
            interrupt.sleep(wait)

    def settle(self, amount: float) -> None:
        with self._lock:
            self._take(amount)  # owed by the next taker: it waits for the refill


class Slots:
    """At most `limit` holders at once (`with slots:`), and a limit that can be lowered while slots
    are held: `lower()` takes one slot away for good, never the last. Lowered below the number held,
    it admits nobody until enough holders have left, so it neither deadlocks (holders leave as
    usual, each waking a waiter) nor lets more in than the new limit."""

    def __init__(self, limit: int):
        self.limit, self.held = int(limit), 0
        self._cond = threading.Condition()
        interrupt.watch(self)

    def __enter__(self) -> "Slots":
        with self._cond:
            while True:
                interrupt.check()
                if self.held < self.limit:
                    break
                self._cond.wait()
            self.held += 1
        return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            self.held -= 1
            self._cond.notify()  # a lowered limit is never raised: only a leaving holder can let one in

    def lower(self) -> int | None:
        """Take one slot away: the new limit, or None when it was 1 already."""
        with self._cond:
            if self.limit <= 1:
                return None
            self.limit -= 1
            return self.limit

    def abandon(self) -> None:
        with self._cond:
            self._cond.notify_all()  # each waiter raises Interrupted
