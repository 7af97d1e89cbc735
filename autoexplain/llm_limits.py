"""Rate limits of the server LLMs: a token bucket, for requests per minute and for tokens per minute.

`OpenAILLM` takes one token of its requests bucket and a request's estimated tokens from its tokens
bucket before each attempt, and settles the tokens bucket with the server's count once answered
(see `llm_openai`). The limits are set per process with `llm.set_limits`. Their waits end at a stop
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

