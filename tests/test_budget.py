"""The run's budget and the provider's prefix cache (issue 13, items 5 and 8): `--budget` in dollars
or tokens stops a run cleanly before the request that could pass it, keeps what was finished, and a
rerun with a larger budget pays only for what is new; a budget of 0, negative, without a unit or in
dollars for an unpriced model is one line before any work; the cached prompt tokens a server reports
are read and priced. Real loopback servers: bench/llm_server.py (it keeps a prefix cache as
providers do) behind tests/llama_server.py's FaultServer, which counts the requests."""

from __future__ import annotations

import pytest

from autoexplain import budget, prices
from autoexplain.budget import Budget, BudgetReached, set_budget
from autoexplain.errors import UserError
from autoexplain.llm import OpenAILLM
from autoexplain.simulate import AllAtOnceSimulator
from tests.llama_server import fault_server  # noqa: F401  (fixture)
from tests.test_cli import _one_error_line
from tests.test_cli_runs import cli, home  # noqa: F401  (fixture)
from tests.test_llm_cache import _cli


@pytest.fixture(autouse=True)
def no_budget():
    set_budget(None)
    yield
    set_budget(None)


def test_budgets_are_read_in_dollars_or_tokens():
    assert budget.parse("$5") == Budget(5.0, "$") == budget.parse("5 usd") == budget.parse("5$")
    assert budget.parse("$0.25") == Budget(0.25, "$") and budget.parse("1.5 dollars") == Budget(1.5, "$")
    assert budget.parse("200000 tokens") == Budget(200_000, "tokens") == budget.parse("200k tokens")
    assert budget.parse("2M tokens") == Budget(2_000_000, "tokens") == budget.parse("2,000,000 tok")
    assert budget.parse(None) is None and budget.parse("  ") is None
    for bad, needle in (("5", "say dollars or tokens"), ("five dollars", "say dollars or tokens"),
                        ("$0", "must be more than 0"), ("-3 tokens", "must be more than 0"),
                        ("$-1", "must be more than 0"), ("0 tokens", "must be more than 0")):
        with pytest.raises(UserError, match=needle):
            budget.parse(bad)


def test_the_ledger_refuses_what_could_pass_the_limit():
    ledger = set_budget("100 tokens")
    with ledger.hold(60, None):
        with pytest.raises(BudgetReached):  # 60 in flight + 50 could pass 100
            with ledger.hold(50, None):
                pass
    assert ledger.stopped, "once refused, the run stops: nothing more is sent"
    with pytest.raises(BudgetReached):
        with ledger.hold(1, None):
            pass
    dollars = set_budget("$1")
    with dollars.hold(10**6, 0.6):
        dollars.charge(10**6, 0.55)
    with pytest.raises(BudgetReached):  # 0.55 spent + 0.5 estimated
        with dollars.hold(10, 0.5):
            pass
    assert dollars.tokens == 10**6 and dollars.dollars == pytest.approx(0.55)


def test_a_server_run_stops_before_passing_its_budget(fault_server, bench_server):
    """64 requests in flight at once; each holds its estimate (its prompt at 4 characters a token
    until answers show the server's count, plus max_tokens), so what is spent stays within the
    budget although many requests were in flight when it was reached."""
    srv = fault_server(upstream=bench_server.base_url)
    llm = OpenAILLM("bench", srv.base_url, api_key="test", max_concurrency=64)
    ledger = set_budget("4000 tokens")
    prompts = [f"Prompt {i}: " + "a few plain words " * 10 for i in range(300)]
    with pytest.raises(BudgetReached, match="the budget of 4,000 tokens is reached"):
        llm.complete(prompts, n=1, max_tokens=12)
    llm.close()
    sent = len(srv.requests)
    assert 0 < sent < 300 and ledger.tokens <= 4000, (sent, ledger.tokens)
    per_request = ledger.tokens / llm.usage.requests
    assert ledger.tokens > 4000 - 70 * (per_request + 60), "it stopped near the limit, not long before"


def test_cached_prompt_tokens_are_read_and_priced_lower(bench_server, monkeypatch):
    """The all-at-once simulator's prompts share their few-shot prefix and the explanation; the
    server's prefix cache reports those tokens as cached, and each record's cost prices its share
    of them at the cached-input rate."""
    monkeypatch.delenv(prices.OVERRIDE_ENV, raising=False)
    llm = OpenAILLM("gpt-4o-mini", bench_server.base_url, api_key="test")
    sim = AllAtOnceSimulator(llm)
    records = [[f" word{i}", " and", " more", " text", f" {j}"] for i in range(4) for j in range(5)]
    first, second = sim.simulate_many(["mentions of words", "numbers at the end"], records)
    sims = first + second
    assert all(s.ok for s in sims)
    assert sum(s.cached_tokens for s in sims) == llm.usage.cached_tokens > 0
    assert all(0 <= s.cached_tokens <= s.prompt_tokens for s in sims)
    p = prices.price_of("gpt-4o-mini")
    for s in sims:
        want = ((s.prompt_tokens - s.cached_tokens) * p.input + s.cached_tokens * p.cached_input
                + s.completion_tokens * p.output) / 1e6
        assert sim.dollars(s.prompt_tokens, s.completion_tokens, s.cached_tokens) == pytest.approx(want)
    assert any(s.cached_tokens for s in second), "the second explanation's prompts reuse the few-shot prefix"
    llm.close()


@pytest.mark.slow
@pytest.mark.parametrize("args, needle", [
    (("--budget", "0"), "--budget: cannot read the budget '0'"),
    (("--budget", "$0"), "--budget: the budget must be more than 0"),
    (("--budget", "-2 tokens"), "--budget: the budget must be more than 0"),
    (("--budget", "$5"), "--budget: is in dollars, but the model 'my-model' has no price"),
])
def test_bad_budgets_are_one_line_before_any_work(home, fault_server, tiny_llama_dir, prose_corpus, tmp_path,
                                                  args, needle):
    server = fault_server(models=["my-model"])
    out = tmp_path / "out"
    line = _one_error_line(cli(home, "explain-layer", "--model", tiny_llama_dir, "--corpus", str(prose_corpus),
                               "--layer", "1", "--out", str(out), "--explainer", f"openai:my-model@{server.base_url}",
                               *args))
    assert needle in line, line
    assert server.requests == [] and not out.exists(), "nothing sent, nothing written"


def test_a_budget_is_refused_on_dask_before_any_work(home, prefect_results, tiny_llama_dir, prose_corpus, tmp_path):
    """Each dask worker process would keep a budget of its own (`autoexplain.budget`), so a run could
    spend it once per worker: refused first, naming the parameter (no scheduler is needed to say so)."""
    from autoexplain.flows.explain_layer import rescore

    out = tmp_path / "out"
    for command in ("explain-layer", "explain-model"):
        line = _one_error_line(cli(home, command, "--model", tiny_llama_dir, "--corpus", str(prose_corpus),
                                   "--out", str(out), "--budget", "2M tokens", "--dask", "tcp://127.0.0.1:9"))
        assert line.startswith("error: --budget: cannot be kept on dask workers"), line
        assert "--rpm and --tpm still pace each worker" in line and "leave --dask out" in line, line
    assert not out.exists()
    state = rescore(out=str(out), budget="$1", dask="tcp://127.0.0.1:9", return_state=True)
    assert state.is_failed() and state.message.startswith("parameter budget: cannot be kept on dask workers"), state.message
    assert "leave budget out to run on dask (rpm and tpm" in state.message


@pytest.mark.slow
def test_a_stopped_run_resumes_and_pays_for_nothing_twice(fault_server, bench_server, tiny_llama_dir, prose_corpus,
                                                          tmp_path):
    """The same explain-layer run three ways on one server: whole; stopped by a token budget (exit
    3, one line) then resumed with a larger one; the stopped and resumed runs together send exactly
    the whole run's requests, and the scores are the same bytes."""
    srv = fault_server(upstream=bench_server.base_url)
    llm = f"openai:bench@{srv.base_url}"

    def run(out, *extra):
        return _cli(tmp_path / "home", "explain-layer", "--model", tiny_llama_dir, "--corpus", str(prose_corpus),
                    "--layer", "1", "--units", "0-1", "--tokens", "20000", "--k", "2", "--bootstrap", "20",
                    "--window-len", "8", "--top-k", "8", "--random", "6", "--explainer", llm,
                    "--simulator", f"all-at-once:{llm}", "--out", str(tmp_path / out), *extra)

    whole = run("whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    paid = len(srv.requests)
    tokens = sum(r["json"].get("max_tokens", 0) for r in srv.requests)  # a lower bound on the run's tokens
    assert paid > 10 and tokens > 0

    stopped = run("budget", "--budget", "2k tokens")
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    line = [ln for ln in stopped.stderr.splitlines() if ln.startswith("stopped:")]
    # "bench" has no price: what it cost is unknown, never $0.
    assert line and "the budget of 2,000 tokens is reached" in line[0] and "this run spent an unknown amount" in line[0], \
        stopped.stderr
    first = len(srv.requests) - paid
    assert 0 < first < paid, "some requests paid for, not all"
    assert not list((tmp_path / "budget").glob("scores/*/*.parquet")), "no scores sealed for an unfinished layer"
    assert not (tmp_path / "budget" / "runs").exists(), "no run pointer: rescore would not take it for a run"

    resumed = run("budget", "--budget", "1M tokens")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    second = len(srv.requests) - paid - first
    assert first + second == paid, "the stopped and the resumed run sent the whole run's requests, none twice"
    scores = lambda out: sorted(p.read_bytes() for p in (tmp_path / out).glob("scores/*/*.parquet"))  # noqa: E731
    assert scores("budget") == scores("whole")


@pytest.mark.slow
def test_the_flow_ends_in_a_budget_reached_state(prefect_results, bench_server, tiny_llama_dir, prose_corpus, tmp_path):
    from autoexplain.flows.explain_layer import explain_layer

    llm = f"openai:bench@{bench_server.base_url}"
    state = explain_layer(layer=1, units="0-1", model=tiny_llama_dir, corpus=str(prose_corpus), tokens=20000, k=2,
                          n_boot=20, window_len=8, top_k=8, n_random=6, explainer=llm, simulator=f"all-at-once:{llm}",
                          out=str(tmp_path / "o"), budget="500 tokens", return_state=True)
    assert state.is_completed() and state.name == "BudgetReached", (state.name, state.message)
    assert state.message.startswith("stopped: the budget of 500 tokens is reached") and "\n" not in state.message
    result = state.result()
    assert result["stopped"] == "budget" and result["tokens"] <= 500


def test_prompts_are_held_at_the_characters_per_token_the_server_counts(fault_server, bench_server):
    """Digits and spaces, which the server counts at 2 characters a token (as a tokenizer counts a
    simulator's tab-separated records at 2-3): held at 4 characters a token, each request reserved
    half of what it cost, and the third was sent with 114 tokens of the budget left for 193. The
    LLM now holds a prompt at the ratio its server's answers have shown."""
    srv = fault_server(upstream=bench_server.base_url)
    llm = OpenAILLM("bench", srv.base_url, api_key="test", max_concurrency=1)
    ledger = set_budget("500 tokens")
    prompt = "1 2 3 4 5 6 7 8 9 " * 20  # 360 characters, 180 tokens at the server
    with pytest.raises(BudgetReached):
        for i in range(10):
            llm.complete([f"{prompt}{i}"], n=1, max_tokens=12)
    llm.close()
    assert len(srv.requests) == 2 and ledger.tokens <= 500, (len(srv.requests), ledger.tokens)
