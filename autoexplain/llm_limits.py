"""Limits of the server LLMs: a token bucket that paces requests, a sliding `Window` that holds
requests per minute and tokens per minute in every minute from the first request, and `Slots`, the
number of requests in flight at once.

`OpenAILLM` takes one token of its requests bucket and one request of its requests window, and a
request's estimated tokens from its tokens window, before each attempt, and settles the tokens
window with the server's count once answered;
it holds a slot for each attempt, takes one slot away when a request times out and gives one back
when the answers say one more request would be answered in time (see `llm_openai`). The limits are
set per process with `llm.set_limits`. Their waits end at a stop (`interrupt`), raising Interrupted.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from autoexplain import interrupt


class TokenBucket:
    """A rate per minute with a burst: `acquire(n)` takes n, waiting for the refill if needed. It
    paces requests; the limits per minute are `Window`'s. `spent` is everything taken."""

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
        self._tokens -= amount
        self.spent += amount
        return -self._tokens / self.rate if self._tokens < 0 else 0.0

    def acquire(self, amount: float = 1) -> None:
        with self._lock:
            wait = self._take(amount)  # reserved now, so waiters are served in arrival order
        if wait > 0:
            interrupt.sleep(wait)


class Window:
    """At most `limit` per `seconds` in any window of that length (half-open), from the first take:
    `acquire(n)` reserves n at the earliest time the last `seconds` hold room for it, in arrival
    order, and waits until then; `settle(entry, n)` makes that take n once the true count is known.
    A token bucket that starts full lets a burst through and then a minute's refill: more than the
    limit in the first minute, what a provider answers with 429s.
    `spent` is everything taken."""

    def __init__(self, limit: float, seconds: float = 60.0):
        self.limit, self.seconds = float(limit), float(seconds)
        self._entries: deque[list[float]] = deque()  # [time, amount], in time order; some in the future
        self._sum = 0.0
        self.spent = 0.0
        self._lock = threading.Lock()

    def _reserve(self, amount: float) -> tuple[list[float], float]:
        now = time.monotonic()
        while self._entries and self._entries[0][0] <= now - self.seconds:
            self._sum -= self._entries.popleft()[1]
        at = max(now, self._entries[-1][0]) if self._entries else now  # never ahead of an earlier taker
        total = self._sum
        for t, a in self._entries:  # oldest first: each one out of the window makes room
            if t > at - self.seconds:
                if total + amount <= self.limit:
                    break
                at = t + self.seconds
            total -= a
        entry = [at, amount]
        self._entries.append(entry)
        self._sum += amount
        self.spent += amount
        return entry, at - now

    def acquire(self, amount: float = 1) -> list[float]:
        """Take `amount` (at most the limit: a request larger than it goes alone in its window)."""
        with self._lock:
            entry, wait = self._reserve(min(float(amount), self.limit))
        if wait > 0:
            interrupt.sleep(wait)
        return entry

    def settle(self, entry: list[float], amount: float) -> None:
        """What the take `entry` truly counted: `amount` replaces what it took."""
        with self._lock:
            change, entry[1] = amount - entry[1], amount
            self.spent += change
            if self._entries and entry[0] >= self._entries[0][0]:  # still in the books, not expired
                self._sum += change


class Slots:
    """At most `limit` holders at once (`with slots:`, or `take()` and `give()`), and a limit that
    moves while slots are held. `lower()` takes one slot away (a request timed out), never the last.
    Lowered below the number held, it admits nobody until enough holders have left, so it neither
    deadlocks (holders leave as usual, each waking a waiter) nor lets more in than the new limit.

    `answered(ticket, seconds)` gives one back, up to the limit it started at, on evidence that one
    more request would not time out: `evidence` answers in a row (and a limit's worth at least),
    each sent while the limit was full and not changed since, each quick enough that `ahead` says one more would finish well
    inside `timeout`. Probing by sending more would cost a whole timeout per probe against a server
    that answers one request at a time. A timeout soon after a raise means the evidence misled:
    the next raise needs twice as much.

    `say(was, limit)` is called, in order, at each raise and once per burst of timeouts.
    Every timeout still takes its slot away at once (waiting to see how many follow would send more
    requests into the overload), but against a server that answers one request at a time most of
    the requests in flight outwait the timeout together: one line each would bury the run's log
    under 60 lines in a second that say one thing, that the limit was too high. A timeout of a request
    sent under the limit now is news and begins a burst; one sent under an older limit joins the
    burst open, as that limit's overload. The burst is said, whole, at the first sign that it is
    over, never after a wait, so that the lines are the same for the same order of events: news of
    the limit now (an answer or a timeout of a request sent under it), or no request left in flight.
    So a caller lowers before it gives the timed-out request's slot back (`OpenAILLM` does): the
    other way round, `give` (which cannot tell a timeout from an answer) could close the burst first,
    and that timeout would be said on a line of its own."""

    MOST_EVIDENCE = 1024  # a run that keeps timing out after raises stops raising for good, in effect

    def __init__(self, limit: int, timeout: float | None = None, evidence: int = 16, say=None):
        self.limit = self.ceiling = int(limit)
        self.held, self.timeout = 0, timeout
        self._need = int(evidence)  # answers in a row a raise needs now
        self._epoch = self._streak = 0  # the limit's changes so far; answers in a row that say "raise"
        self._probe: int | None = None  # the epoch the last raise began, until a timeout in it
        self._was: int | None = None  # the limit before the burst of timeouts open, None when none is
        self._say = say or (lambda was, limit: None)
        self._cond = threading.Condition()
        interrupt.watch(self)

    def take(self) -> tuple[int, bool]:
        """Wait for a slot and hold it. The ticket: the limit's epoch, and whether this holder filled it."""
        with self._cond:
            while True:
                interrupt.check()
                if self.held < self.limit:
                    break
                self._cond.wait()
            self.held += 1
            return self._epoch, self.held >= self.limit

    def give(self) -> None:
        with self._cond:
            self.held -= 1
            if self.held == 0:
                self._report()  # nothing in flight: no more timeouts of the burst can come
            self._cond.notify()  # the slot left, for one waiter (a raise wakes one more itself)

    def __enter__(self) -> "Slots":
        self.take()
        return self

    def __exit__(self, *exc) -> None:
        self.give()

    def _changed(self) -> None:
        self._epoch += 1
        self._streak = 0

    def _report(self) -> None:
        """Say the burst of timeouts open, if it moved the limit, and close it (under the lock)."""
        if self._was is not None and self._was != self.limit:
            self._say(self._was, self.limit)
        self._was = None

    def lower(self, ticket: tuple[int, bool] | None = None) -> int | None:
        """A request holding `ticket` timed out: take one slot away. The new limit, or None when it
        was 1 already. Without a ticket, it is a burst of its own."""
        with self._cond:
            if ticket is not None and ticket[0] == self._probe:  # sent under the last raise: one too many
                self._need = min(self.MOST_EVIDENCE, 2 * self._need)
                self._probe = None
            if ticket is None or ticket[0] == self._epoch or self._was is None:
                self._report()  # news of the limit now (or no burst to join): the one before is over
                self._was = self.limit
            lowered = None
            if self.limit > 1:
                self.limit -= 1
                self._changed()
                lowered = self.limit
            if self.held == 0:
                self._report()
            return lowered

    def ahead(self, seconds: float) -> bool:
        """Whether one request more than the limit would still be answered well inside the timeout,
        given an answer that took `seconds` with the limit full. The worst case is a server that
        answers one request at a time (llama-cpp-python's), where `seconds` is `limit` answers'
        work and one more request adds one answer's: seconds * (limit + 1) / limit. A server that
        answers them together does better. Half the timeout leaves room for the server's pace to vary."""
        return self.timeout is not None and seconds * (self.limit + 1) / self.limit < self.timeout / 2

    def answered(self, ticket: tuple[int, bool], seconds: float) -> int | None:
        """A request holding `ticket` was answered after `seconds`: the raised limit, or None."""
        epoch, full = ticket
        with self._cond:
            if epoch == self._epoch:
                self._report()  # answered under the limit now: the timeouts before it are over
            if epoch != self._epoch or self.limit >= self.ceiling:
                return None  # sent under another limit: it says nothing of this one
            if not full:
                return None  # fewer asked than the limit allows: nothing learned about one more
            self._streak = self._streak + 1 if self.ahead(seconds) else 0
            # At least a round of the slots too: at a high limit, `_need` answers are the quickest few.
            if self._streak < max(self._need, self.limit):
                return None
            self.limit += 1
            self._changed()
            self._say(self.limit - 1, self.limit)
            self._probe = self._epoch
            self._cond.notify()
            return self.limit

    def abandon(self) -> None:
        with self._cond:
            self._cond.notify_all()  # each waiter raises Interrupted
