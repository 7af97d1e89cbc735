"""Simulate: predict a unit's activation on each token of a record from its explanation alone.

Every simulator returns, per record, one expected activation (0-10 scale) per *subject* token, or a
failure with its reason. A failure is never turned into zeros: the scorer skips failed records and
reports how many there were.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass
class Simulation:
    """A simulator's prediction for one record."""

    expected: list[float] | None  # one value per subject token; None when the simulation failed
    failure: str | None = None  # why it failed (parse error, missing digits, ...)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.expected is not None


class Simulator(Protocol):
    """Anything that maps (explanation, records' tokens) to per-token predictions."""

    name: str

    def simulate(self, explanation: str, records: Sequence[Sequence[str]]) -> list[Simulation]:
        """records: each record's subject tokens, as decoded strings. One Simulation per record."""
        ...
