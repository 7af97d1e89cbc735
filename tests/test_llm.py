"""The LLM backends against real things: llama.cpp's server, tiny real transformers models, and a
fault-injecting HTTP server on loopback for retries, rate limits and error messages."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from autoexplain.errors import UserError
from autoexplain.llm import LLMError, OpenAILLM, TokenBucket, make_llm
from autoexplain.llm_local import LocalLLM
from tests.llama_server import fault_server, free_port, llama_server  # noqa: F401  (fixtures)

DIGITS = [str(i) for i in range(11)]
# The simulator's prompt shape: token<TAB>value lines, the target token's value left unknown.
TABLE = "".join(f"{w}\t{v}\n" for w, v in [("the", 0), ("cat", 7), ("sat", 1), ("on", 0), ("dog", 8), ("a", 0)])
SIM_PROMPT = f"Neuron 3 fires on animals.\n<start>\n{TABLE}mat\tunknown\n<end>\n"


class VirtualClock:
    """Stands in for the `time` module of `autoexplain.llm_limits` and for `interrupt.sleep` (the waits of the
    backoff and of the rate limits), so that the limiter's and the backoff's waits are read, not measured:
    `sleep` records how long it was asked to wait and, when `advancing`, moves the clock on by that much
    instead of waiting."""

    def __init__(self, advancing: bool = True):
        self.now, self.advancing, self.sleeps = 1000.0, advancing, []
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            if self.advancing:
                self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    import autoexplain.interrupt
    import autoexplain.llm_limits

    def install(advancing: bool = True) -> VirtualClock:
        c = VirtualClock(advancing)
        monkeypatch.setattr(autoexplain.interrupt, "sleep", c.sleep)  # the backoff's and the rate limits' waits
        monkeypatch.setattr(autoexplain.llm_limits, "time", c)  # the rate limits' clock
        return c

    return install


def fast(url: str, **kw) -> OpenAILLM:
    kw = {"max_retries": 3, "backoff_base": 0.01, "backoff_cap": 0.05, "api_key": "test", **kw}
    return OpenAILLM("test-model", url, **kw)


# -- llama.cpp server -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server_llm(llama_server):
    llm = OpenAILLM(llama_server.model, llama_server.base_url, max_concurrency=2, backoff_base=0.05)
    yield llm
    llm.close()


@pytest.mark.slow
def test_server_complete_counts_tokens(server_llm):
    with server_llm.track() as usage:
        out = server_llm.complete(["The capital of France is", "One, two, three,"], n=2, max_tokens=8)
    assert [len(samples) for samples in out] == [2, 2]
    assert any(c.text.strip() for samples in out for c in samples)
    assert all(0 < c.completion_tokens <= 8 and c.prompt_tokens >= 4 for samples in out for c in samples)
    # llama.cpp ignores `n`: each sample is its own request, and every one is counted.
    assert usage.requests == 4
    assert usage.prompt_tokens == sum(c.prompt_tokens for s in out for c in s)
    assert usage.completion_tokens == sum(c.completion_tokens for s in out for c in s)
    assert server_llm.usage.requests >= 4


@pytest.mark.slow
def test_server_prompt_logprobs_cover_the_prompt(server_llm):
    prompts = [SIM_PROMPT, "café 日本語 ok\tunknown"]
    with server_llm.track() as usage:
        results = server_llm.prompt_logprobs(prompts, top=15)
    for prompt, r in zip(prompts, results):
        assert len(r.tokens) == len(r.offsets) == len(r.top_logprobs) == r.prompt_tokens
        assert r.offsets == sorted(r.offsets) and all(0 <= o < len(prompt) for o in r.offsets)
        assert r.top_logprobs[0] == {}
        assert all(v <= 0 for t in r.top_logprobs for v in t.values())
    r = results[0]
    assert "".join(r.tokens) == SIM_PROMPT
    assert all(SIM_PROMPT.startswith(t, o) for t, o in zip(r.tokens, r.offsets))
    assert usage.prompt_tokens == sum(x.prompt_tokens for x in results) and usage.requests == 2

    # The distribution at the `unknown` token is the one the simulator reads: it predicts a value.
    at = r.offsets.index(SIM_PROMPT.index("unknown"))
    tops = r.top_logprobs[at]
    assert len(tops) >= 15
    assert max(tops, key=tops.get) in DIGITS, tops
    assert sum(math.exp(tops[d]) for d in DIGITS if d in tops) > 0.5, tops
    # llama-cpp-python shifts echo logprobs by one for models without BOS (SmolLM2); we realign.
    assert server_llm.echo_shifted


@pytest.mark.slow
def test_server_prompt_logprobs_agree_with_local_model(server_llm):
    """The same GGUF run by transformers: the realigned server logprobs predict the same tokens."""
    local = LocalLLM("smollm2", device="cpu")
    remote = server_llm.prompt_logprobs([SIM_PROMPT], top=5)[0]
    mine = local.prompt_logprobs([SIM_PROMPT], top=5)[0]
    assert mine.tokens == remote.tokens and mine.offsets == remote.offsets
    positions = range(2, len(mine.tokens))  # position 1's prediction is lost by the server
    agree = sum(max(mine.top_logprobs[p], key=mine.top_logprobs[p].get)
                == max(remote.top_logprobs[p], key=remote.top_logprobs[p].get) for p in positions)
    assert agree / len(positions) >= 0.8
    best = [max(remote.top_logprobs[p].values()) - max(mine.top_logprobs[p].values()) for p in positions]
    assert sorted(abs(b) for b in best)[len(best) // 2] < 0.5  # median gap in the top logprob


@pytest.mark.slow
def test_server_chat_returns_text_and_top_logprobs(server_llm):
    out = server_llm.chat([[{"role": "user", "content": "Reply with a number from 0 to 10."}]],
                          max_tokens=6, top_logprobs=3)
    (r,) = out
    assert r.text.strip() and r.prompt_tokens > 5 and 0 < r.completion_tokens <= 6
    assert len(r.top_logprobs) == r.completion_tokens
    for step in r.top_logprobs:
        assert len(step) == 3 and all(isinstance(t, str) and lp <= 0 for t, lp in step)
        assert [lp for _t, lp in step] == sorted((lp for _t, lp in step), reverse=True)
    plain = server_llm.chat([[{"role": "user", "content": "Hi"}]], max_tokens=3)
    assert plain[0].top_logprobs is None


@pytest.mark.slow
def test_retry_through_proxy_to_real_server(llama_server, fault_server):
    srv = fault_server(fail_with=[429, 503], upstream=llama_server.base_url)
    llm = fast(srv.base_url)
    llm.name = llama_server.model
    (r,) = llm.prompt_logprobs(["one two three"], top=3)
    assert len(srv.requests) == 3 and "".join(r.tokens) == "one two three"


# -- LocalLLM on a tiny random Llama (float32, so batching is exact) ---------------------------------

@pytest.fixture(scope="module")
def tiny_llm(tiny_llama_dir):
    from autoexplain.subject import load_subject

    return LocalLLM(subject=load_subject(tiny_llama_dir, dtype=torch.float32, device="cpu"), batch_size=4)


def test_local_generation_gives_n_samples_per_prompt(tiny_llm):
    from autoexplain.budget import set_budget

    prompts = ["Hello", "The river ran quietly past the old mill", "One two"]
    spent = set_budget(None)
    with tiny_llm.track() as usage:
        out = tiny_llm.complete(prompts, n=3, temperature=1.0, max_tokens=5)
    # the run's spending line counts a local model's tokens, at no cost
    assert spent.tokens == usage.total_tokens > 0 and spent.dollars == 0 and spent.unpriced == 0
    assert [len(s) for s in out] == [3, 3, 3]
    assert all(0 <= c.completion_tokens <= 5 for s in out for c in s)
    assert usage.requests == 3
    assert usage.prompt_tokens == sum(len(tiny_llm.tok(p)["input_ids"]) for p in prompts)
    assert sum(c.prompt_tokens for s in out for c in s) == usage.prompt_tokens, "each prompt read once for its 3 samples"
    assert len({c.text for s in out for c in s}) > 3, "sampling gives different continuations"


def test_local_left_padding_does_not_change_greedy_output(tiny_llm):
    prompts = ["Hi", "The river ran quietly past the old mill, where"]
    together = tiny_llm.complete(prompts, temperature=0.0, max_tokens=6)
    alone = [tiny_llm.complete([p], temperature=0.0, max_tokens=6)[0] for p in prompts]
    assert [s[0].text for s in together] == [s[0].text for s in alone]
    assert together[0][0].completion_tokens > 0


def test_local_prompt_logprobs_match_full_logits(tiny_llm):
    prompts = ["The cat\t7\nsat\tunknown\n", "a short one"]  # different lengths: a padded batch
    results = tiny_llm.prompt_logprobs(prompts, top=5)
    for prompt, r in zip(prompts, results):
        ids = tiny_llm.tok(prompt, add_special_tokens=False)["input_ids"]
        assert r.prompt_tokens == len(ids) == len(r.tokens) == len(r.top_logprobs)
        assert "".join(r.tokens) == prompt
        assert all(prompt.startswith(t, o) for t, o in zip(r.tokens, r.offsets))
        with torch.inference_mode():
            logp = torch.log_softmax(tiny_llm.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        assert r.top_logprobs[0] == {}
        for p in range(1, len(ids)):
            vals, tids = logp[p - 1].topk(5)
            expected = {}
            for t, v in zip(tids.tolist(), vals.tolist()):
                s = tiny_llm.tok.decode([t])
                expected[s] = math.log(math.exp(expected[s]) + math.exp(v)) if s in expected else v
            assert r.top_logprobs[p].keys() == expected.keys()
            for s, v in expected.items():
                assert r.top_logprobs[p][s] == pytest.approx(v, abs=1e-4)


def test_local_chat_and_per_block_usage(tiny_llm):
    conversations = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Name a number."}]]
    before = tiny_llm.usage.requests
    with tiny_llm.track() as first:
        out = tiny_llm.chat(conversations, max_tokens=4, top_logprobs=2)
    with tiny_llm.track() as second:
        tiny_llm.complete(["x"], max_tokens=2)
    for r in out:
        assert r.completion_tokens <= 4 and len(r.top_logprobs) == r.completion_tokens
        assert all(len(step) == 2 and step[0][1] >= step[1][1] for step in r.top_logprobs)
    assert (first.requests, second.requests) == (2, 1)
    assert first.completion_tokens == sum(r.completion_tokens for r in out)
    assert tiny_llm.usage.requests == before + 3


# -- retries, errors and limits against a fault-injecting server -------------------------------------

def test_prompt_logprobs_in_openai_alignment(fault_server):
    """A server that follows OpenAI's convention is read as is: entry i predicts token i."""
    srv = fault_server()
    llm = fast(srv.base_url)
    (r,) = llm.prompt_logprobs(["the cat\tunknown\n"], top=2)
    assert not llm.echo_shifted
    assert r.tokens == ["the", " cat", "\tunknown", "\n"] and r.offsets == [0, 3, 7, 15]
    assert r.top_logprobs[0] == {} and all(r.top_logprobs[i][t] == -0.25 for i, t in enumerate(r.tokens) if i)
    assert r.prompt_tokens == 4 and srv.requests[0]["json"]["max_tokens"] == 1


def test_retries_429_then_succeeds(fault_server):
    srv = fault_server(fail_with=[429, 429])
    llm = fast(srv.base_url)
    out = llm.complete(["hi"], max_tokens=1)
    assert out[0][0].text == " canned"
    assert len(srv.requests) == 3
    assert srv.requests[-1]["json"]["model"] == "test-model"
    assert llm.usage.as_dict() == {"prompt_tokens": 3, "completion_tokens": 1, "requests": 1, "cached": 0, "cached_tokens": 0}


def test_honours_retry_after(fault_server, clock):
    waits = clock()
    srv = fault_server(fail_with=[429], retry_after=0.4)
    llm = fast(srv.base_url, backoff_cap=2.0)  # its own backoff before the 2nd attempt: 5 to 10 ms
    llm.chat([[{"role": "user", "content": "hi"}]])
    assert len(srv.requests) == 2
    assert waits.sleeps == [pytest.approx(0.4)], "one wait, as long as Retry-After asked"


def test_server_errors_give_up_after_max_retries(fault_server):
    srv = fault_server(then_status=500)
    llm = fast(srv.base_url, max_retries=2)
    with pytest.raises(LLMError) as err:
        llm.complete(["hi"])
    assert len(srv.requests) == 3 and err.value.attempts == 3 and err.value.status == 500
    assert "HTTP 500" in str(err.value) and "3 attempts" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("status, words", [(401, "OPENAI_API_KEY"), (404, "test-model"), (400, "rejected")])
def test_permanent_errors_fail_fast(fault_server, status, words):
    srv = fault_server(then_status=status)
    with pytest.raises(UserError) as err:
        fast(srv.base_url).complete(["hi"])
    assert len(srv.requests) == 1
    assert words in str(err.value) and f"HTTP {status}" in str(err.value)


def test_missing_key_for_openai_fails_before_any_request(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(UserError, match=r"\$OPENAI_API_KEY is not set"):
        make_llm("openai:gpt-4o-mini")
    monkeypatch.delenv("MY_KEY", raising=False)
    with pytest.raises(UserError, match=r"\$MY_KEY"):
        make_llm("openai:gpt-4o-mini@https://api.openai.com/v1", api_key_env="MY_KEY")
    local = make_llm("openai:llama3:8b@http://127.0.0.1:11434/v1")  # local servers need no key
    assert (local.name, local.base_url) == ("llama3:8b", "http://127.0.0.1:11434/v1")


def test_unreachable_server_is_one_clear_line():
    url = f"http://127.0.0.1:{free_port()}/v1"
    llm = fast(url, max_retries=1)
    with pytest.raises(UserError) as err:
        llm.prompt_logprobs(["hi"])
    assert f"cannot reach {url}" in str(err.value) and "is the server running?" in str(err.value)
    assert "\n" not in str(err.value) and err.value.__cause__ is None
    with pytest.raises(UserError, match="cannot reach"):
        llm.ping()


def test_token_bucket_spaces_requests(clock):
    """The bucket's schedule on a virtual clock: a burst of 2, then one request every 50 ms."""
    now = clock()
    bucket = TokenBucket(per_minute=1200, burst=2)  # 20 per second after a burst of 2
    start, stamps = now.monotonic(), []
    for _ in range(8):
        bucket.acquire()
        stamps.append(now.monotonic() - start)
    assert stamps == pytest.approx([0, 0, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30], abs=1e-9)
    assert now.sleeps == pytest.approx([0.05] * 6)
    now.sleep(1.0)  # idle for a second: the bucket refills to its burst, not beyond
    for _ in range(3):
        bucket.acquire()
    assert now.sleeps[7:] == pytest.approx([0.05])


def test_concurrency_limit_holds_end_to_end(fault_server):
    """max_concurrency=2: the server holds every request until the test releases it, and counts
    what is in flight (arrived, not answered). With two held, a third request can only come from a
    client that broke its limit; each answer lets exactly one more in. A correct client passes
    whatever the load: every count is exact by construction. Before each release the test gives a
    broken client 0.2 s to show an extra request, so that one is caught, not only when it races."""
    srv = fault_server(hold=True)
    llm = fast(srv.base_url, max_concurrency=2)
    with ThreadPoolExecutor(1) as caller:
        done = caller.submit(llm.complete, [f"p{i}" for i in range(6)])
        try:
            for answered in range(6):
                waiting = min(2, 6 - answered)
                srv.wait_for(lambda: srv.answered == answered and len(srv.requests) >= answered + waiting)
                assert not srv.happens(lambda: len(srv.requests) > answered + waiting, 0.2), "over the limit"
                assert (srv.inflight, len(srv.requests)) == (waiting, answered + waiting)
                srv.release(1)
        finally:
            srv.release(6)  # whatever failed above, the client is not left waiting on held requests
        assert len(done.result()) == 6
    assert srv.max_inflight == 2 and len(srv.requests) == 6
    assert sorted(r["json"]["prompt"] for r in srv.requests) == [f"p{i}" for i in range(6)]


def test_rate_limit_holds_end_to_end(fault_server, clock):
    """requests_per_minute=600 with 4 workers: a burst of 4, then the bucket makes the next three
    requests wait 0.1, 0.2 and 0.3 s (read on a frozen virtual clock: nothing is refilled meanwhile)."""
    waits = clock(advancing=False)
    srv = fault_server()
    llm = fast(srv.base_url, max_concurrency=4, requests_per_minute=600)  # burst 4, then 10 per second
    assert len(llm.complete([f"p{i}" for i in range(7)])) == 7
    assert len(srv.requests) == 7
    assert sorted(waits.sleeps) == pytest.approx([0.1, 0.2, 0.3])


def test_spec_grammar():
    with pytest.raises(UserError, match="unknown LLM"):
        make_llm("anthropic:claude")
    with pytest.raises(UserError, match="names no model"):
        make_llm("openai:")


@pytest.mark.slow
def test_a_prompt_longer_than_the_servers_context_says_so_and_how_to_fix_it(llama_server):
    """llama.cpp's server at its default context (2,048 tokens) and a prompt of about 3,000: the one
    line names the context and the server option that widens it, not 'check the request options'."""
    llm = OpenAILLM(llama_server.model, llama_server.base_url, max_retries=0)
    try:
        with pytest.raises(LLMError) as caught:
            llm.complete(["one two three " * 1000], max_tokens=60)
    finally:
        llm.close()
    line = str(caught.value)
    assert line.startswith(f"the prompt is longer than the context of 'smollm2' at {llama_server.base_url} (HTTP 400)")
    assert "start the server with a larger context (llama.cpp: --n_ctx 8192" in line and "\n" not in line
    assert caught.value.status == 400 and not caught.value.transient, "the run ends: every unit's prompt is as long"
