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


@pytest.fixture
def counts():
    """The process's counters, empty for the test and given back after it (the LLM line reads them)."""
    from autoexplain.counters import COUNTS

    saved = dict(COUNTS)
    COUNTS.clear()
    yield COUNTS
    COUNTS.clear()
    COUNTS.update(saved)


def answered(err: str) -> int:
    """The answered requests of a command's LLM line: every request sent, or those it says were
    answered (a loopback server's full listen queue turns connections away; they are sent again)."""
    import re

    line = re.search(r"LLM: ([\d,]+) requests? sent(?: \(([\d,]+) answered;[^)]*\))?, ", err)
    return int((line[2] or line[1]).replace(",", ""))


def llm_lines(err: str) -> list[str]:
    return [" ".join(line.split()) for line in err.splitlines() if line.startswith("LLM:")]


def test_an_unpriced_model_is_never_said_to_cost_0():
    from autoexplain.budget import Ledger

    unknown = Ledger()
    unknown.charge(40, None)
    assert "$0" not in unknown.spent_text() and unknown.spent_text().startswith("this run spent an unknown amount and 40")
    assert "1 answer of models with no known price" in unknown.spent_text()
    part = Ledger()
    part.charge(10, 0.25)
    part.charge(40, None)
    assert part.spent_text() == "this run spent at least $0.2500 and 50 tokens (1 answer of models with no known price)"
    priced = Ledger()
    priced.charge(10, 0.25)
    assert priced.spent_text() == "this run spent $0.2500 and 10 tokens"


def test_the_line_counts_every_request_sent_and_says_what_became_of_the_unanswered(fault_server, counts, capsys):  # noqa: F811
    """A 429 and a 500 before the answer: three requests sent, one answered, two sent again; then a
    server that holds its request past a 0.5 s timeout, with no retry."""
    from autoexplain.console import print_llm_usage
    from autoexplain.llm import LLMError

    set_budget(None)
    srv = fault_server(fail_with=[429, 500])
    llm = OpenAILLM("m", srv.base_url, api_key="test", backoff_base=0.01, backoff_cap=0.02)
    llm.complete(["p"], max_tokens=1)
    assert len(srv.requests) == 3
    held = fault_server(hold=True)
    slow = OpenAILLM("m", held.base_url, api_key="test", max_retries=0, timeout=0.5)
    try:
        with pytest.raises(LLMError):
            slow.complete(["q"], max_tokens=1)
    finally:
        held.release(10)
    print_llm_usage()
    assert llm_lines(capsys.readouterr().err) == [
        "LLM: 4 requests sent (1 answered; 1 HTTP 429, 1 HTTP 5xx, 1 timed out; 2 sent again), 0 answers from the "
        "cache; this run spent an unknown amount and 4 tokens (1 answer of models with no known price)"]


def test_a_run_that_ends_in_an_error_still_says_what_it_spent(fault_server, counts, capsys):  # noqa: F811
    """A command that sent requests and then failed: the LLM line, then its one error line (exit 2).
    Bad input found before any request stays one line."""
    import typer

    from autoexplain.console import run_or_exit
    from autoexplain.errors import UserError

    srv = fault_server()
    set_budget(None)
    llm = OpenAILLM("gpt-4o-mini", srv.base_url, api_key="test")

    def fails_after_asking():
        llm.complete(["p", "q"], max_tokens=1)
        raise UserError("the server rejected the request", "check it")

    with pytest.raises(typer.Exit) as ended:
        run_or_exit(fails_after_asking)
    err = capsys.readouterr().err
    lines = [" ".join(line.split()) for line in err.splitlines() if line.strip()]
    assert ended.value.exit_code == 2 and len(lines) == 2, err
    assert lines[0].startswith("LLM: 2 requests sent, 0 answers from the cache; this run spent $0.0000") and \
        lines[0].endswith(" and 8 tokens")
    assert lines[1].startswith("error: the server rejected the request")

    counts.clear()
    with pytest.raises(typer.Exit):
        run_or_exit(lambda: (_ for _ in ()).throw(UserError("--k: must be at least 1", "pass --k 1")))
    assert [line for line in capsys.readouterr().err.splitlines() if line.strip()] == ["error: --k: must be at least 1 — pass --k 1"]
