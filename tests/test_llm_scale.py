"""The LLM path at scale (issue 13, items 1-3): requests of many units in flight at once with
results that do not depend on the concurrency, backoff that holds no slot, every transient fault
retried (malformed bodies included), and a request that fails for good recorded as that record's or
unit's failure while the run goes on. Real HTTP servers on loopback: tests/llama_server.py's
FaultServer (scripted faults) and bench/llm_server.py's BenchServer (echo logprobs with digits)."""

from __future__ import annotations

import json
import re

import pytest
import polars as pl

from autoexplain import pipeline, preflight
from autoexplain.errors import UserError
from autoexplain.llm import LLMError, OpenAILLM, make_llm, set_limits
from autoexplain.simulate import AllAtOnceSimulator
from bench.llm_server import BenchServer
from tests.llama_server import fault_server  # noqa: F401  (fixture)


def fast(url: str, **kw) -> OpenAILLM:
    kw = {"max_retries": 3, "backoff_base": 0.01, "backoff_cap": 0.05, "api_key": "test", **kw}
    return OpenAILLM("test-model", url, **kw)


@pytest.fixture(scope="module")
def units(tiny_records):
    from autoexplain.layer import load_units

    records_dir, _ = tiny_records
    return load_units(records_dir, 1, [0, 1, 2, 3, 4, 5])


def test_backoff_holds_no_slot(fault_server):
    """One slot, and the first request gets a 429: while it waits to retry, the other prompt is sent.
    (A retry that slept on its slot would come second, before the other prompt.)"""
    srv = fault_server(fail_with=[429])
    llm = fast(srv.base_url, max_concurrency=1, backoff_base=0.3, backoff_cap=0.3)
    out = llm.complete(["a", "b"])
    assert [len(c) for c in out] == [1, 1]
    prompts = [r["json"]["prompt"] for r in srv.requests]
    assert len(prompts) == 3 and prompts[1] != prompts[0] and prompts[2] == prompts[0], prompts
    assert srv.max_inflight == 1


FAULTS = [429, 500, 503, "invalid-json", "truncated", "no-choices", "reset"]


def test_every_transient_fault_is_retried_in_prompt_logprobs(fault_server, bench_server):
    srv = fault_server(fail_with=[200] + FAULTS + ["no-logprobs"], upstream=bench_server.base_url)
    llm = fast(srv.base_url, max_concurrency=4, max_retries=10)
    llm.prompt_logprobs(["Explanation: x\nword\tunknown\n"])  # the server shows it returns logprobs
    prompts = [f"Explanation: e{i}\nword{i}\tunknown\n<end>" for i in range(12)]
    got = llm.prompt_logprobs(prompts)
    clean = fast(bench_server.base_url).prompt_logprobs(prompts)
    assert got == clean  # every prompt answered, each as the fault-free server answers it
    assert len(srv.requests) == 1 + 12 + len(FAULTS) + 1
    assert llm.usage.requests == 13


def test_every_transient_fault_is_retried_in_complete_and_chat(fault_server):
    srv = fault_server(fail_with=FAULTS)
    llm = fast(srv.base_url, max_concurrency=3, max_retries=10)
    out = llm.complete([f"p{i}" for i in range(5)], n=2)
    assert [len(c) for c in out] == [2] * 5
    srv2 = fault_server(fail_with=FAULTS, chat=lambda m: "[]")
    chat = fast(srv2.base_url, max_concurrency=3, max_retries=10).chat([[{"role": "user", "content": "hi"}]] * 4)
    assert [c.text for c in chat] == ["[]"] * 4


def test_missing_logprobs_from_a_server_that_never_sent_them_is_said_at_once(fault_server):
    srv = fault_server(fail_with=["no-logprobs"])
    with pytest.raises(LLMError, match="no prompt logprobs"):
        fast(srv.base_url).prompt_logprobs(["a b c"])
    assert len(srv.requests) == 1


def test_a_record_whose_retries_run_out_fails_alone(fault_server, bench_server):
    """No retries: the first request gets a 500 and its records are failed with the reason; every
    other record is simulated, and the run does not stop. Records are packed 5 to a request here
    (opt-in), so the failed request is one whole group of 5 (whichever was sent first)."""
    srv = fault_server(fail_with=[500], upstream=bench_server.base_url)
    sim = AllAtOnceSimulator(fast(srv.base_url, max_concurrency=1, max_retries=0), records_per_request=5)
    records = [[f"w{i}", "b", "c"] for i in range(10)]
    sims = sim.simulate("words", records)
    failed = [i for i, s in enumerate(sims) if not s.ok]
    assert failed in (list(range(5)), list(range(5, 10)))
    assert all("request failed" in sims[i].failure and "HTTP 500" in sims[i].failure for i in failed)
    assert sum(s.ok for s in sims) == 5 and len(srv.requests) == 2


def test_a_permanent_error_still_stops_the_run(fault_server):
    srv = fault_server(fail_with=[401], then_status=200)
    sim = AllAtOnceSimulator(fast(srv.base_url, max_concurrency=1))
    with pytest.raises(LLMError, match="refused the API key"):
        sim.simulate("words", [["a"], ["b"]])


def test_a_unit_whose_explainer_requests_fail_is_recorded_failed(fault_server, units):
    srv = fault_server(fail_with=[500])
    llm = fast(srv.base_url, max_concurrency=1, max_retries=0)
    table = pipeline.explain_stage(units[:4], llm, pipeline.ExplainConfig(k=2)).to_pylist()
    mine = [r for r in table if r["method"] == pipeline.EXPLAINER]
    failed = [r for r in mine if r["failure"]]
    assert len(failed) == 1 and "HTTP 500" in failed[0]["failure"] and failed[0]["candidates"] == []
    assert all(r["candidates"] and r["failure"] is None for r in mine if r is not failed[0])


def test_stages_give_the_same_tables_at_any_concurrency(units):
    """Explain and simulate at concurrency 1 and 32: the same tables, row for row, and at 32 many
    requests were in flight at once (the server answers after 200 ms then, so that they overlap: at
    40 ms, two busy cores once issued them too slowly for more than 8 to overlap)."""
    bench_server, some = BenchServer(), units[:3]  # (one record per request: 3 units make hundreds)
    tables = []
    for concurrency, bench_server.latency in ((1, 0.04), (32, 0.2)):
        llm = fast(bench_server.base_url, max_concurrency=concurrency)
        x = pipeline.explain_stage(some, llm, pipeline.ExplainConfig(k=3))
        chosen, sims = pipeline.simulate_stage(some, x, AllAtOnceSimulator(llm), seed=0)
        tables.append((x.to_pylist(), chosen.to_pylist(), sims.to_pylist()))
        llm.close()
    assert tables[0] == tables[1]
    sims = tables[0][2]
    assert sims and sum(r["expected"] is not None for r in sims) == len(sims)
    assert bench_server.max_inflight > 8, f"{bench_server.requests} requests"
    bench_server.stop()


def test_limits_default_by_server_and_are_set_per_process(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    set_limits(None, None)
    assert make_llm("openai:m@http://127.0.0.1:9/v1").max_concurrency == 64
    assert make_llm("openai:gpt-4o-mini").max_concurrency == 8
    assert make_llm("openai:m@http://127.0.0.1:9/v1").max_retries == 6
    try:
        set_limits(5, 120, retries=0)
        llm = make_llm("openai:m@http://127.0.0.1:9/v1")
        assert (llm.max_concurrency, llm.requests_per_minute, llm.max_retries) == (5, 120.0, 0)
    finally:
        set_limits(None, None)


@pytest.mark.parametrize("concurrency, rpm, words", [(0, None, "--concurrency: must be at least 1, got 0"),
                                                     (-3, None, "--concurrency: must be at least 1"),
                                                     (4, 0, "--rpm: must be more than 0")])
def test_bad_limits_fail_before_any_work(concurrency, rpm, words):
    with pytest.raises(UserError, match=words):
        preflight.check_limits(concurrency, rpm, preflight.cli_flag)


def test_every_llm_command_checks_its_concurrency_first(tmp_path):
    from tests.test_cli import _one_error_line, run

    for args in (["explain", "--records", str(tmp_path)], ["simulate", "--records", str(tmp_path), "--explanations",
                 str(tmp_path)], ["explain-layer", "--out", str(tmp_path)], ["rescore", "--out", str(tmp_path)]):
        line = _one_error_line(run(*args, "--concurrency", "0"))
        assert "--concurrency: must be at least 1, got 0" in line, (args, line)


def test_every_llm_command_checks_its_retries_first(tmp_path):
    from tests.test_cli import _one_error_line, run

    for args in (["explain", "--records", str(tmp_path)], ["simulate", "--records", str(tmp_path), "--explanations",
                 str(tmp_path)], ["explain-layer", "--out", str(tmp_path)], ["explain-model", "--out", str(tmp_path)],
                 ["rescore", "--out", str(tmp_path)], ["revise", "--out", str(tmp_path), "--unit", "1", "--text", "t"]):
        line = _one_error_line(run(*args, "--retries", "-1"))
        assert "--retries: must be at least 0, got -1" in line, (args, line)


def test_unanswered_requests_are_asked_again_by_the_next_run(fault_server, bench_server, tiny_records, tmp_path):
    """A server that leaves requests unanswered (here ten 500s, no retries): the stage is sealed with
    the count, so the run shows what it has, but it is not final. The next run makes the same folder
    again, asks only the unit whose request failed (the others come from the memo), and seals it
    final; a Prefect cache entry naming the unfinished folder is not used."""
    from autoexplain.layer import run_explain, run_score, run_simulate
    from autoexplain.storage import read_manifest, unanswered
    from autoexplain.tasks.caching import output_is_whole

    records_dir, _ = tiny_records
    out = tmp_path / "out"
    x = run_explain(records_dir, 1, out, [0, 1], explainer="embedding")
    srv = fault_server(fail_with=[200] * 30 + [500] * 10, upstream=bench_server.base_url)
    sim = AllAtOnceSimulator(fast(srv.base_url, max_concurrency=1, max_retries=0))
    first = run_simulate(records_dir, x, out, sim=sim)
    assert 0 < unanswered(first.directory) and read_manifest(first.directory)["unanswered"] == unanswered(first.directory)
    assert not output_is_whole({"path": str(first.path)})
    scored = run_score(records_dir, first, out, n_boot=20)
    assert unanswered(scored.directory) == unanswered(first.directory), "made from what is not final: not final"
    sent = len(srv.requests)
    again = run_simulate(records_dir, x, out, sim=sim)  # the server answers everything now
    assert again.directory == first.directory and unanswered(again.directory) == 0
    assert "unanswered" not in read_manifest(again.directory) and output_is_whole({"path": str(again.path)})
    rescored = run_score(records_dir, again, out, n_boot=20)
    assert rescored.directory == scored.directory and unanswered(rescored.directory) == 0, "scored again, final"
    assert 0 < len(srv.requests) - sent < sent, "only what got no answer is asked again"
    table = pl.read_parquet(again.path)
    assert table["failure"].drop_nulls().str.starts_with("request failed").sum() == 0
    third = len(srv.requests)
    run_simulate(records_dir, x, out, sim=sim)
    assert len(srv.requests) == third, "a final folder is reused as it is"


def test_chat_logprobs_missing_from_a_server_that_sent_them_are_asked_again(fault_server, bench_server):
    """What the classifier scorers read their AUC from: a reply without them, from a server that has
    sent them, is a fault (retried, so never cached); a server that never sends them is taken as it is."""
    srv = fault_server(fail_with=[200, "no-logprobs"], upstream=bench_server.base_url)
    llm = fast(srv.base_url, max_concurrency=1)
    ask = [[{"role": "user", "content": "Explanation: cats\nExample 1: a <<cat>> sat\nExample 2: a dog ran"}]]
    first = llm.chat(ask, top_logprobs=2)[0]
    second = llm.chat(ask, top_logprobs=2, sample=1)[0]
    assert first.top_logprobs and second.top_logprobs, "the reply without them was asked again"
    assert len(srv.requests) == 3
    never = fault_server(fail_with=["no-logprobs"] * 2, upstream=bench_server.base_url)
    plain = fast(never.base_url, max_concurrency=1).chat(ask * 2, top_logprobs=2)
    assert [r.top_logprobs for r in plain] == [None, None] and len(never.requests) == 2


@pytest.mark.slow
def test_explain_layer_against_a_server_that_stops_answering_exits_4_and_the_rerun_asks_only_the_rest(
        fault_server, bench_server, tiny_llama_dir, prose_corpus, tmp_path):
    """The simulator's server answers its first 8 requests and then resets every connection; with
    `--retries 0` nothing waits out a backoff, and the command ends with the `incomplete` line and
    exit 4. The server answers again, and the same command sends exactly the requests that got no
    answer (the others come from the response cache) and exits 0."""
    from tests.test_llm_cache import _cli

    srv = fault_server(fail_with=[200] * 8, then_status="reset", upstream=bench_server.base_url)
    args = ["explain-layer", "--model", tiny_llama_dir, "--corpus", str(prose_corpus), "--layer", "1", "--units", "0",
            "--tokens", "20000", "--k", "1", "--bootstrap", "20", "--window-len", "8", "--top-k", "8", "--random", "6",
            "--simulator", f"all-at-once/5:openai:bench@{srv.base_url}", "--retries", "0", "--out", str(tmp_path / "out")]
    # Packed (opt-in): at one record per request two rows can ask the very same request (a unit's
    # explanation on a random window, and the shuffled control that borrows it on the same window),
    # which the count below could not tell from a retry.
    first = _cli(tmp_path / "home", *args)
    unanswered = [json.dumps(r["json"], sort_keys=True) for r in srv.requests[8:]]
    assert first.returncode == 4, first.stderr[-3000:]
    assert unanswered and len(set(unanswered)) == len(unanswered), "each sent once: no retry"
    line = re.search(r"incomplete: (\d+) results got no LLM answer.*rerun the same command", first.stderr)
    assert line and int(line[1]) > 0, first.stderr[-3000:]  # counts the records those requests carried

    srv.then_status = 200
    again = _cli(tmp_path / "home", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "incomplete" not in again.stderr
    sent = [json.dumps(r["json"], sort_keys=True) for r in srv.requests[8 + len(unanswered):]]
    assert sorted(sent) == sorted(unanswered), "only the requests that got no answer are sent again"
