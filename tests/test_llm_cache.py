"""The response cache and the tokens-per-minute limit of the server LLMs (issue 13, items 4 and 1),
against real loopback servers: tests/llama_server.py's FaultServer, which counts every request it
answers (and, apart, the preflight's probes), proxying to bench/llm_server.py's BenchServer where
the answers must carry digits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from autoexplain import llm_cache
from autoexplain.llm import OpenAILLM
from autoexplain.llm_cache import CACHE_ENV, ResponseCache, for_root, set_cache
from tests.llama_server import fault_server  # noqa: F401  (fixture)
from tests.test_llm import clock  # noqa: F401  (fixture: a virtual clock for the limiter's waits)
from tests.prefect_homes import command_env


@pytest.fixture(autouse=True)
def cache_on(monkeypatch):
    """The cache as shipped (on, under the output root), whatever an earlier test set; restored after."""
    monkeypatch.delenv(CACHE_ENV, raising=False)


def fast(url: str, cache=None, **kw) -> OpenAILLM:
    kw = {"max_retries": 1, "backoff_base": 0.01, "backoff_cap": 0.05, "api_key": "test", **kw}
    llm = OpenAILLM("test-model", url, **kw)
    llm.cache = cache
    return llm


def texts(results) -> list[list[str]]:
    return [[c.text for c in samples] for samples in results]


def test_sampled_candidates_come_back_the_same_and_cost_nothing(fault_server, tmp_path):
    srv = fault_server(varied=True)  # every completion it samples is new
    first = fast(srv.base_url, ResponseCache(tmp_path / "c"))
    got = first.complete(["p1", "p2"], n=3, temperature=1.0)
    sent = len(srv.requests)
    assert sent == 6 and len({t for s in texts(got) for t in s}) == 6, "six different samples"
    assert first.usage.requests == 6 and first.usage.cached == 0

    again = fast(srv.base_url, ResponseCache(tmp_path / "c"))  # a new process would open the same folder
    assert texts(again.complete(["p1", "p2"], n=3, temperature=1.0)) == texts(got)
    assert len(srv.requests) == sent, "no request on the rerun"
    assert again.usage.requests == 0 and again.usage.cached == 6 and again.usage.total_tokens == 0

    more = again.complete(["p1"], n=5, temperature=1.0)[0]  # samples 0-2 known, 3 and 4 asked for
    assert [c.text for c in more[:3]] == texts(got)[0] and len(srv.requests) == sent + 2
    assert len({c.text for c in more}) == 5

    off = fast(srv.base_url)  # no cache: every request again, and new samples
    assert texts(off.complete(["p1", "p2"], n=3, temperature=1.0)) != texts(got)
    assert len(srv.requests) == sent + 2 + 6


def test_key_holds_every_parameter(fault_server, tmp_path):
    srv = fault_server(varied=True)
    llm = fast(srv.base_url, ResponseCache(tmp_path / "c"))
    base = llm.complete(["p"], temperature=1.0, max_tokens=5)
    for kw in (dict(temperature=0.5, max_tokens=5), dict(temperature=1.0, max_tokens=6),
               dict(temperature=1.0, max_tokens=5, stop=["\n"])):
        assert texts(llm.complete(["p"], **kw)) != texts(base), kw
    assert texts(llm.complete(["p"], temperature=1.0, max_tokens=5)) == texts(base)
    assert len(srv.requests) == 4
    other = OpenAILLM("other-model", srv.base_url, api_key="test", max_retries=1)
    other.cache = llm.cache
    other.complete(["p"], temperature=1.0, max_tokens=5)
    assert len(srv.requests) == 5, "another model is another key"


def test_chat_and_prompt_logprobs_are_cached(fault_server, tmp_path):
    srv = fault_server()
    llm = fast(srv.base_url, ResponseCache(tmp_path / "c"))
    msgs = [[{"role": "user", "content": "hi"}]]
    first = llm.chat(msgs)
    assert llm.chat(msgs) == first and len(srv.requests) == 1
    llm.chat(msgs, sample=1)  # the chat simulator's retry asks for a new answer
    assert len(srv.requests) == 2
    llm.chat(msgs * 3, temperature=1.0)  # k samples of one explanation (the chat explainer): three answers
    llm.chat(msgs * 3, temperature=1.0)
    assert len(srv.requests) == 5
    echo = llm.prompt_logprobs(["the cat\tunknown\n"], top=2)
    assert llm.prompt_logprobs(["the cat\tunknown\n"], top=2) == echo and len(srv.requests) == 6
    assert llm.usage.requests == 6 and llm.usage.cached == 5


def test_identical_requests_in_flight_together_are_sent_once(fault_server, tmp_path):
    """The server holds every request until released: the copies of one prompt wait for the one
    request in flight instead of sending their own."""
    srv = fault_server(hold=True)
    llm = fast(srv.base_url, ResponseCache(tmp_path / "c"), max_concurrency=8)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        later = pool.submit(llm.prompt_logprobs, ["the cat\tunknown\n"] * 5 + ["a dog\tunknown\n"], 2)
        srv.wait_for(lambda: len(srv.requests) == 2)
        srv.release(6)  # enough for every copy, should a copy send its own
        got = later.result()
    assert len(srv.requests) == 2 and all(r == got[0] for r in got[:5]) and got[5] != got[0]
    assert llm.usage.requests == 2 and llm.usage.cached == 4


def test_failed_requests_are_not_kept(fault_server, tmp_path):
    srv = fault_server(fail_with=[500, 500])
    llm = fast(srv.base_url, ResponseCache(tmp_path / "c"), max_retries=1)
    (failed,) = llm.complete(["p"], return_errors=True)
    assert failed.transient and len(srv.requests) == 2
    assert texts(llm.complete(["p"])) == [[" canned"]] and len(srv.requests) == 3, "asked again, then kept"
    llm.complete(["p"])
    assert len(srv.requests) == 3


def test_the_bound_evicts_least_recently_used(tmp_path):
    cache = ResponseCache(tmp_path / "c", max_mb=1)
    blob = os.urandom(60_000).hex()  # 120 kB of JSON, about 60 kB once compressed
    for i in range(40):  # 2.4 MB packed into a 1 MB cache
        cache.put(f"k{i}", {"text": blob + str(i)})
        if i == 2:
            cache.get("k0")  # read: now more recent than k1
    assert cache.get("k39") == {"text": blob + "39"}
    assert "k1" not in cache and sum(f"k{i}" in cache for i in range(40)) < 20
    assert cache.volume() < 2 * 2**20


def test_off_switch_and_folder(tmp_path, monkeypatch):
    class Component:
        llm = fast("http://127.0.0.1:9/v1")

    llm_cache.attach(Component, tmp_path / "out")
    assert Component.llm.cache.directory == (tmp_path / "out" / "llm_cache").resolve()
    set_cache(False)
    assert os.environ[CACHE_ENV] == "off" and for_root(tmp_path / "out") is None
    llm_cache.attach(Component, tmp_path / "out")
    assert Component.llm.cache is None
    set_cache(True)
    assert CACHE_ENV not in os.environ, "back as it was"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "shared"))
    assert for_root(tmp_path / "out").directory == (tmp_path / "shared").resolve()
    set_cache(False)
    set_cache(True)
    assert os.environ[CACHE_ENV] == str(tmp_path / "shared"), "the user's folder stands"
    monkeypatch.setenv(CACHE_ENV, "off")
    set_cache(True)  # a command's default (--cache) does not override the user's 'off'
    assert for_root(tmp_path / "out") is None


def test_cache_is_shared_through_a_url_root(fault_server, tmp_path, monkeypatch):
    """Two machines (two local cache roots) with one output URL: the second pays for nothing."""
    srv = fault_server(varied=True)
    url = (tmp_path / "bucket").as_uri()
    monkeypatch.setenv("AUTOEXPLAIN_CACHE", str(tmp_path / "machine-a"))
    a = fast(srv.base_url, for_root(url))
    got = texts(a.complete(["p1", "p2"], n=2))
    assert list((tmp_path / "bucket" / "llm_cache").rglob("*.json.z")), "entries written to the URL"
    monkeypatch.setenv("AUTOEXPLAIN_CACHE", str(tmp_path / "machine-b"))
    b = fast(srv.base_url, for_root(url))
    assert b.cache.directory != a.cache.directory
    assert texts(b.complete(["p1", "p2"], n=2)) == got and len(srv.requests) == 4


def test_tokens_per_minute_budget(fault_server, clock):
    """The limiter's books on a virtual clock (waits are read, not measured): a request takes its
    estimate before it is sent, and the server's count replaces it once answered."""
    now = clock()
    srv = fault_server()  # usage: 3 prompt + 1 completion tokens a request
    llm = fast(srv.base_url, tokens_per_minute=6)
    for _ in range(5):
        llm.complete(["x" * 40], max_tokens=1)  # estimate: 40 characters / 4 + max_tokens 1 = 11 tokens
    # An estimate above the limit goes alone in its minute: the first at once, each other a minute
    # after the one before (4 counted + 6 taken would pass 6).
    assert now.sleeps == pytest.approx([60.0] * 4)
    assert llm.usage.total_tokens == 20 and llm._tpm.spent == pytest.approx(20), "the server's count, not the estimate"
    assert [r["json"]["prompt"] for r in srv.requests] == ["x" * 40] * 5
    unlimited = fast(srv.base_url)
    unlimited.complete(["x" * 40] * 5, max_tokens=1)
    assert len(now.sleeps) == 4 and unlimited._tpm is None


# ---- the whole path: explain-layer on the command line, rerun -------------------------------------

def _cli(home, *args, **env):
    full = {k: v for k, v in command_env(home, **env).items() if k != CACHE_ENV or k in env}
    return subprocess.run([sys.executable, "-m", "autoexplain.flows.cli", *args], capture_output=True, text=True, env=full)  # the console script


def _forget_outputs(out):
    """Everything the rerun could reuse except the recording and the response cache: the stage
    folders and the per-unit memos, as after a crash that lost them."""
    for child in out.iterdir():
        if child.name not in ("llm_cache", "records", "windows"):
            shutil.rmtree(child) if child.is_dir() else child.unlink()


@pytest.mark.slow
def test_explain_layer_rerun_sends_no_request(fault_server, bench_server, tiny_llama_dir, prose_corpus, tmp_path):
    srv = fault_server(upstream=bench_server.base_url)
    llm = f"openai:bench@{srv.base_url}"
    out = tmp_path / "out"
    args = ["explain-layer", "--model", tiny_llama_dir, "--corpus", str(prose_corpus), "--layer", "1",
            "--units", "0-1", "--tokens", "20000", "--k", "2", "--bootstrap", "20", "--window-len", "8",
            "--top-k", "8", "--random", "6", "--explainer", llm, "--simulator", f"all-at-once:{llm}", "--out", str(out),
            "--site", "none"]  # what this test checks is not in the site, so none is built
    first = _cli(tmp_path / "home", *args)
    assert first.returncode == 0, first.stderr[-4000:]
    assert not (out / "site").exists() and "viewer:" not in first.stderr
    paid = len(srv.requests)
    assert paid > 0 and (out / "llm_cache").is_dir()
    scores = sorted(p.read_bytes() for p in out.glob("scores/*/*.parquet"))

    _forget_outputs(out)
    again = _cli(tmp_path / "home", *args)
    assert again.returncode == 0, again.stderr[-4000:]
    assert len(srv.requests) == paid, "every stage recomputed, every answer from the cache"
    from tests.test_llm_costs import answered

    assert answered(first.stderr) == paid and "LLM: 0 requests sent, " in again.stderr
    assert "this run spent $0.0000 and 0 tokens" in again.stderr, "answers from the cache are not paid again"
    assert sorted(p.read_bytes() for p in out.glob("scores/*/*.parquet")) == scores, "the same scores"

    reused = _cli(tmp_path / "home", *args)  # every stage's output is still there: the LLM is not asked at all
    assert reused.returncode == 0 and len(srv.requests) == paid, reused.stderr[-4000:]
    assert "LLM: nothing asked" in reused.stderr and "this run spent $0" in reused.stderr
    assert "cost of these scores: " in reused.stderr, "what the scores shown cost to make, whoever paid"

    _forget_outputs(out)
    off = _cli(tmp_path / "home", *args, "--no-cache")
    assert off.returncode == 0, off.stderr[-4000:]
    bodies = [json.dumps(r["json"], sort_keys=True) for r in srv.requests]
    paid_for, resent = bodies[:paid], bodies[paid:]
    assert len(set(paid_for)) == paid, "no request sent twice, even those asked twice in the first run"
    assert set(resent) == set(paid_for) and len(resent) >= paid, "--no-cache sends them all again (and repeats)"
