"""A spending limit for one run: `--budget '$5'` or `--budget '2M tokens'` (flow parameter `budget`).

The ledger is per process, like the concurrency limits (`llm.set_limits`), so a run on dask workers
cannot keep one and is refused a budget (`preflight.check_dask`). Every LLM answer that was
paid for is charged to it (`LLM._record`), answers read from the response cache cost nothing. A
server request first reserves its estimate (its prompt at the characters per token its server's
answers have shown, 4 until then, plus max_tokens per sample) and is refused when what is spent,
plus what is in flight, plus its estimate would pass the limit; so a run stops before the request that would overspend, and can pass the limit only by
what the estimates missed. A local model is asked only while the limit is not reached.

A refused request raises `BudgetReached`, which is no request failure: it ends the stage. What was
finished stays (each unit's memo, each answer in the response cache), and a rerun with a larger
budget resumes from there, paying only for what is new. The budget limits what this run spends,
not what earlier runs spent.
"""

from __future__ import annotations

import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass

from autoexplain.counters import counted
from autoexplain.errors import UserError

EXAMPLES = "'$5', '0.5 usd', '200000 tokens' or '2M tokens'"
_SCALE = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}


@dataclass(frozen=True)
class Budget:
    """At most `amount` dollars (`unit` "$") or tokens (`unit` "tokens"), prompt plus completion."""

    amount: float
    unit: str

    def __str__(self) -> str:
        return f"${self.amount:g}" if self.unit == "$" else f"{self.amount:,.0f} tokens"


def parse(text: str | float | None) -> Budget | None:
    """'$5', '5$', '5 usd', '5 dollars', '200000 tokens', '200k tokens', '2M tokens'; None: no limit."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    s = str(text).strip().lower().replace(",", "").replace("_", "")
    money = re.fullmatch(r"\$\s*([0-9.e+-]+)|([0-9.e+-]+)\s*(?:\$|usd|dollars?)", s)
    count = re.fullmatch(r"([0-9.e+-]+)\s*([kmb]?)\s*(?:tokens?|tok)", s)
    try:
        if money:
            budget = Budget(float(money.group(1) or money.group(2)), "$")
        elif count:
            budget = Budget(float(count.group(1)) * _SCALE[count.group(2)], "tokens")
        else:
            raise ValueError
    except ValueError:
        raise UserError(f"cannot read the budget '{text}': say dollars or tokens", f"write it as {EXAMPLES}") from None
    if not budget.amount > 0:
        raise UserError(f"the budget must be more than 0, got '{text}'",
                        f"give a positive budget ({EXAMPLES}), or leave it out for no limit")
    return budget


class BudgetReached(UserError):
    """The run's budget would be passed by the next request: the stage stops, keeping what it finished."""

    def __init__(self, budget: Budget):
        super().__init__(f"the budget of {budget} is reached: no request that could pass it was sent, and finished "
                         "units are kept",
                         "rerun the same command with a larger --budget (flow parameter budget) to go on: "
                         "nothing finished is asked again")
        self.budget = budget


class Ledger:
    """What this process has spent on LLM answers, and what its requests in flight may spend."""

    def __init__(self, budget: Budget | None = None):
        self.budget = budget
        self.tokens, self.dollars = 0, 0.0
        self.unpriced = 0  # answers of models without a price: their dollars are unknown
        self._held = 0.0  # estimates of the requests in flight, in the budget's unit
        self.stopped = False  # a request was refused: the run ends at the budget
        self._lock = threading.Lock()

    def _spent(self) -> float:
        return self.dollars if self.budget.unit == "$" else self.tokens

    def spent_text(self) -> str:
        """What the answers paid for so far cost (the requests still in flight when the budget
        stopped the run are answered, and counted, before a command reports it)."""
        if not self.unpriced:
            return f"this run spent ${self.dollars:.4f} and {counted(self.tokens, 'token')}"
        # An unknown price is never $0: the line says what is known as a floor, or nothing.
        floor = f"at least ${self.dollars:.4f}" if self.dollars else "an unknown amount"
        return (f"this run spent {floor} and {counted(self.tokens, 'token')} ({counted(self.unpriced, 'answer')} "
                "of models with no known price)")

    def charge(self, tokens: int, dollars: float | None) -> None:
        with self._lock:
            self.tokens += tokens
            if dollars is None:
                self.unpriced += 1
            else:
                self.dollars += dollars

    def absorb(self, tokens: int, dollars: float, unpriced: int) -> None:
        """What other processes of the run spent (dask workers, `run_settings.collect`), for its line."""
        with self._lock:
            self.tokens += tokens
            self.dollars += dollars
            self.unpriced += unpriced

    def _refuse(self) -> BudgetReached:
        self.stopped = True
        return BudgetReached(self.budget)

    @contextmanager
    def hold(self, tokens: int, dollars: float | None):
        """Reserve a request's estimate while it is in flight; raise BudgetReached, sending nothing,
        when it might pass the limit. The answer's true cost is charged by `charge`."""
        if self.budget is None:
            yield
            return
        amount = (dollars or 0.0) if self.budget.unit == "$" else tokens
        with self._lock:
            if self.stopped or self._spent() + self._held + amount > self.budget.amount:
                raise self._refuse()
            self._held += amount
        try:
            yield
        finally:
            with self._lock:
                self._held -= amount

    def check(self) -> None:
        """Raise BudgetReached when the limit is reached (before a local model's batch)."""
        if self.budget is None:
            return
        with self._lock:
            if self.stopped or self._spent() >= self.budget.amount:
                raise self._refuse()


_LEDGER = Ledger()


def set_budget(budget: Budget | str | None) -> Ledger:
    """Start this process's ledger afresh, with a limit or none (a CLI command, a flow run)."""
    global _LEDGER
    _LEDGER = Ledger(parse(budget) if not isinstance(budget, Budget) else budget)
    return _LEDGER


def ledger() -> Ledger:
    return _LEDGER
