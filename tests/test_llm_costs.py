"""What a run's LLM requests cost, as each unit's rows say it and as the run's spend line says it:
the two add up (a request that returns k choices bills its prompt once), and the line is printed on
every way a run can end once it sent a request. Real loopback servers (bench/llm_server.py honours
`n`; tests/llama_server.py's FaultServer scripts faults)."""

from __future__ import annotations

import pytest

from autoexplain import pipeline, prices
from autoexplain.budget import set_budget
from autoexplain.llm import OpenAILLM
from tests.llama_server import fault_server  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def units(tiny_records):
    from autoexplain.layer import load_units

    records_dir, _ = tiny_records
    return load_units(records_dir, 1, [0, 1])


def test_unit_rows_add_up_to_what_the_requests_were_charged(bench_server, units, monkeypatch):
    """k = 3 from a server that honours `n`: one request per unit and polarity, its prompt billed
    once. The rows' tokens and dollars sum to the run's ledger and the LLM's own count."""
    monkeypatch.delenv(prices.OVERRIDE_ENV, raising=False)
    monkeypatch.setattr(bench_server.prefix_cache, "block", 0)
    spent = set_budget(None)
    llm = OpenAILLM("gpt-4o-mini", bench_server.base_url, api_key="test", max_retries=1)
    rows = [r for r in pipeline.explain_stage(units, llm, pipeline.ExplainConfig(k=3)).to_pylist()
            if r["method"] == pipeline.EXPLAINER]
    assert len(rows) == 4 and llm.usage.requests == 4, "n honoured: one request per unit and polarity"
    assert sum(r["prompt_tokens"] for r in rows) == llm.usage.prompt_tokens
    assert sum(r["completion_tokens"] for r in rows) == llm.usage.completion_tokens
    assert sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows) == spent.tokens
    assert sum(r["dollars"] for r in rows) == pytest.approx(spent.dollars)
