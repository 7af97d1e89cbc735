"""Process-wide counts of the expensive calls, so that tests and logs can prove what a run did.

`COUNTS["subject_forward"]` counts subject forward passes, `"llm_requests"` explainer/simulator LLM
requests answered, `"llm_sent"` those sent (a server's every attempt; `"llm_429"`, `"llm_5xx"`,
`"llm_timeouts"` and `"llm_faults"` the attempts that got a 429, a server error (HTTP 500-599), timed
out, or failed otherwise, `"llm_retries"` the
attempts sent again), `"simulate"` simulator calls (one per explanation and record batch), `"score_units"`
units scored, `"units_read"` units whose records a simulate or score stage read and `"model_loads"`
models loaded (`subject.load_subject`: a subject, or a local LLM's model). They are
plain counters: reading them costs nothing and changes nothing.
"""

from collections import Counter

COUNTS: Counter = Counter()


def snapshot() -> dict[str, int]:
    return dict(COUNTS)


def since(before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in COUNTS.items() if v - before.get(k, 0)}


def counted(n: int, one: str, many: str | None = None) -> str:
    """'1 request', '2 requests', '1,204 answers': a count with its noun in the right number."""
    return f"{n:,} {one if n == 1 else many or one + 's'}"
