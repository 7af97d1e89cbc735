"""What LLM requests cost, from a price table kept as data (`prices.json`, overridable).

`dollars(model, prompt, cached, completion)` prices one request's tokens: `cached` of the prompt
tokens were served from the provider's prefix cache (`usage.prompt_tokens_details.cached_tokens`)
and are billed at the cached-input price. A model missing from the table has no known price (None),
so a cost is never invented; local models are not priced here (they cost 0, see `llm_local.LocalLLM`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from autoexplain.errors import UserError

TABLE = Path(__file__).with_name("prices.json")
OVERRIDE_ENV = "AUTOEXPLAIN_PRICES"


@dataclass(frozen=True)
class Price:
    input: float  # dollars per 1M prompt tokens
    cached_input: float | None  # per 1M cached prompt tokens; None: no discount
    output: float  # per 1M completion tokens


def _read(path: Path) -> dict[str, Price]:
    try:
        models = json.loads(path.read_text())["models"]
        return {name: Price(float(p["input"]), None if p.get("cached_input") is None else float(p["cached_input"]),
                            float(p["output"])) for name, p in models.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read the price table {path} ({type(e).__name__}: {e})",
                        f'write {{"models": {{"MODEL": {{"input": 0.15, "cached_input": 0.075, "output": 0.6}}}}}} '
                        f"(dollars per 1M tokens), or unset ${OVERRIDE_ENV}") from None


@lru_cache(maxsize=4)
def _table(override: str | None) -> dict[str, Price]:
    table = _read(TABLE)
    if override:
        table.update(_read(Path(override)))
    return table


def table() -> dict[str, Price]:
    """The built-in table, with $AUTOEXPLAIN_PRICES's models replacing or adding to it."""
    return _table(os.environ.get(OVERRIDE_ENV) or None)


def source() -> str:
    """Where the prices come from, as a cost line names it."""
    override = os.environ.get(OVERRIDE_ENV)
    return f"autoexplain/{TABLE.name}" + (f" and {override}" if override else "")


def price_of(model: str) -> Price | None:
    prices = table()
    if model in prices:
        return prices[model]
    prefixes = [name for name in prices if model.startswith(name + "-")]
    return prices[max(prefixes, key=len)] if prefixes else None


def dollars(model: str, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float | None:
    """One request's cost, or None when the model has no price."""
    p = price_of(model)
    if p is None:
        return None
    cached = min(cached_tokens, prompt_tokens)
    cached_rate = p.input if p.cached_input is None else p.cached_input
    return ((prompt_tokens - cached) * p.input + cached * cached_rate + completion_tokens * p.output) / 1e6


def add(*amounts: float | None) -> float | None:
    """A sum of costs that stays unknown when any part is unknown."""
    return None if any(a is None for a in amounts) else sum(amounts)


def plus(total: float | None, amount: float | None) -> float | None:
    """`add(total, amount)` for a running total started at 0.0, with the same bits, at a fraction of
    the cost (a layer's scoring adds up a hundred thousand simulations' costs): such a total is never
    -0.0, so the 0.0 that `sum` starts from changes nothing."""
    return None if total is None or amount is None else total + amount
