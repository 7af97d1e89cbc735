"""The all-at-once simulator: prompt layout, the prefix-cached batched path against the naive one,
and the server path against a real llama.cpp server."""

import math

import pytest

from autoexplain.simulate import AllAtOnceSimulator, expected_value, simulator_body, simulator_prefix
from autoexplain.subject import load_subject

RECORDS = [[" The", " river", " ran", " in", " 18", "54", "."], [" Seven", " grey", " cats", "\n", "!"]]


def test_body_places_one_placeholder_per_subject_token():
    body, offsets = simulator_body([" a", "\n", "b\tc"])
    assert body.startswith(" a\tunknown\n\\n\tunknown\nb\\tc\tunknown\n")
    assert [body[o : o + 7] for o in offsets] == ["unknown"] * 3
    assert "years" in simulator_prefix("years")


def test_expected_value_renormalises_digits():
    assert expected_value({0: math.log(0.2), 10: math.log(0.2)}) == pytest.approx(5.0)
    assert expected_value({3: -0.1}) == pytest.approx(3.0)
    assert expected_value({}) is None, "no digit: missing, never zero"


def test_prefix_cached_batch_matches_one_pass_per_record(tiny_llama_dir):
    subject = load_subject(tiny_llama_dir)
    fast = AllAtOnceSimulator(subject, batch_size=8).simulate("numbers", RECORDS)
    slow = AllAtOnceSimulator(subject, batch_size=1, reuse_prefix=False).simulate("numbers", RECORDS)
    for f, s, tokens in zip(fast, slow, RECORDS):
        assert f.ok and len(f.expected) == len(tokens)
        assert all(0 <= v <= 10 for v in f.expected)
        assert f.expected == pytest.approx(s.expected, abs=0.25)  # bf16 rounding differs between paths


@pytest.mark.slow
def test_server_echo_logprobs(llama_server):
    from autoexplain.llm import OpenAILLM

    llm = OpenAILLM("smollm2", llama_server.base_url)
    sims = AllAtOnceSimulator(llm).simulate("numbers and years", RECORDS)
    for sim, tokens in zip(sims, RECORDS):
        if sim.ok:
            assert len(sim.expected) == len(tokens) and all(0 <= v <= 10 for v in sim.expected)
        else:
            assert "no digit" in sim.failure, "a miss is reported, not zero-filled"
        assert sim.prompt_tokens > 100
    assert any(s.ok for s in sims)
    local = AllAtOnceSimulator(load_subject()).simulate("numbers and years", RECORDS)
    # Same weights (the GGUF is quantised on the server, dequantised to bf16 locally): close predictions.
    ok = [(a, b) for a, b in zip(sims, local) if a.ok]
    for a, b in ok:
        assert max(abs(x - y) for x, y in zip(a.expected, b.expected)) < 2.5


NEIGHBOURS = ([" Seven", " grey", " cats", "\n", "!"], [" In", " 1999", " the", " war", " ended", " in", " 2003", "."])


def test_one_record_per_request_asks_for_a_record_what_it_would_ask_alone(fault_server):
    """The same record, second of its unit's two, beside two different first records. One record
    per request (the default, the paper's format): the request that carries it is the one it gets
    alone, whoever its neighbour, so a deterministic server gives it the same values (as a local
    model does, one record per forward). Packed two to a request (opt-in), it is read after its
    neighbour: the request differs with the neighbour (a tester saw shifts up to 0.53 of 10)."""
    from autoexplain.llm import OpenAILLM

    srv = fault_server()
    llm = OpenAILLM("canned", srv.base_url, backoff_base=0.01)
    target, text = RECORDS[0], "numbers and years"

    def prompts(records, per_request=None):
        before = len(srv.requests)
        sim = AllAtOnceSimulator(llm) if per_request is None else AllAtOnceSimulator(llm, records_per_request=per_request)
        assert len(sim.simulate(text, records)) == len(records)  # (the canned logprobs hold no digits: misses)
        return [r["json"]["prompt"] for r in srv.requests[before:] if r["path"].endswith("/completions")]

    (alone,) = prompts([target])
    for neighbour in NEIGHBOURS:
        sent = prompts([neighbour, target])
        # (the two requests go out together: the server may see either first)
        assert len(sent) == 2 and alone in sent, "a neighbour changed the request that carries the record"
    packed = [prompts([n, target], per_request=2) for n in NEIGHBOURS]
    assert [len(p) for p in packed] == [1, 1] and packed[0] != packed[1] and alone not in packed[0] + packed[1]


# -- the JSON chat simulator ------------------------------------------------------------------

import json  # noqa: E402

from autoexplain.simulate_chat import ChatJsonSimulator, ParseFailure, align, parse_replies, parse_reply  # noqa: E402


def test_parse_reply_reads_values_and_their_offsets():
    text = 'Here: [{"token": "The", "activation": 0}, {"token": " river", "activation": 8}] done'
    items = parse_reply(text)
    assert [(t, v) for t, v, _ in items] == [("The", 0.0), (" river", 8.0)]
    assert text[items[1][2]] == "8"
    for bad, why in [("no list here", "no JSON list"), ('[{"token": "a"}]', "no numeric activation"),
                     ('[{"token": "a", "activation": 1},]', "invalid JSON")]:
        with pytest.raises(ParseFailure, match=why):
            parse_reply(bad)


def test_align_maps_subject_tokens_through_a_different_tokenisation():
    reply = [("The", 0, 0), ("river", 7, 0), ("18", 5, 0), ("54", 5, 0)]
    assert align([" The", " river", " 18", "54"], reply) == [0, 1, 2, 3]
    assert align([" The", " big", " river"], [("The", 0, 0), ("river", 9, 0)]) == [0, None, 1]


def _records_of(messages) -> list[list[str]]:
    return json.loads(messages[-1]["content"].split("each a list of tokens: ", 1)[1])


def test_chat_json_never_zero_fills(fault_server):
    """Replies chosen per record by a real HTTP server (one record per request here): one that
    answers every token, one that skips a token, one that is not JSON. Only the first gives values,
    and exactly the ones in the reply; a simulator that fills what is missing with zeros fails here."""
    from autoexplain.llm import OpenAILLM

    def reply(messages) -> str:
        (tokens,) = _records_of(messages)
        if tokens[0] == "a":
            values = [3, 0, 7]
        elif tokens[0] == "d":  # never the middle token
            return json.dumps([{"token": "d", "activation": 5}, {"token": "f", "activation": 6}])
        else:
            return "I would rather not say."
        return "Sure: " + json.dumps([{"token": t, "activation": v} for t, v in zip(tokens, values)])

    srv = fault_server(chat=reply)
    llm = OpenAILLM("canned", srv.base_url, api_key="test", backoff_base=0.01)
    records = [["a", " b", " c"], ["d", " e", " f"], ["g", " h"]]
    sim = ChatJsonSimulator(llm, retries=1)
    assert sim.records_per_request == 1, "one record per request unless packing is asked for"
    full, partial, prose = sim.simulate("letters", records)
    assert full.ok and full.failure is None and full.expected == [3.0, 0.0, 7.0]
    assert partial.expected is None and partial.failure == "reply covers 2 of 3 tokens (after 2 attempts)"
    assert prose.expected is None and prose.failure.startswith("unparseable reply: no JSON list")
    assert len(srv.requests) == 5, "the two failures are retried once each, the success is not"
    assert (partial.completion_tokens, full.completion_tokens) == (2, 1), "tokens of both attempts counted"


def test_chat_json_packs_records_and_retries_only_the_failed_ones(fault_server):
    """Three records in one request; the reply answers the first fully, skips a token of the second
    and has no list for the third. Only the second and third are asked again, together, and the
    retry's answer is read from its own offsets (its digits' logprobs are not there: values as written)."""
    from autoexplain.llm import OpenAILLM

    def reply(messages) -> str:
        records = _records_of(messages)
        if len(records) == 3:
            return json.dumps([[{"token": t, "activation": v} for t, v in zip(records[0], [3, 0, 7])],
                               [{"token": "d", "activation": 5}, {"token": "f", "activation": 6}]])
        return "Here: " + json.dumps([[{"token": t, "activation": 2} for t in r] for r in records])

    srv = fault_server(chat=reply)
    llm = OpenAILLM("canned", srv.base_url, api_key="test", backoff_base=0.01)
    records = [["a", " b", " c"], ["d", " e", " f"], ["g", " h"]]
    sims = ChatJsonSimulator(llm, retries=1, records_per_request=4).simulate("letters", records)
    assert [s.expected for s in sims] == [[3.0, 0.0, 7.0], [2.0, 2.0, 2.0], [2.0, 2.0]]
    sent = [_records_of(r["json"]["messages"]) for r in srv.requests if r["path"].endswith("/chat/completions")]
    assert sent == [records, records[1:]]
    assert all(s.prompt_tokens > 0 for s in sims)


def test_parse_replies_reports_each_record():
    text = 'x [[{"token": "a", "activation": 1}], [{"token": "b"}]] y'
    first, second, third = parse_replies(text, 3)
    assert first == [("a", 1.0, text.index("1"))]
    assert isinstance(second, ParseFailure) and "no numeric activation" in str(second)
    assert isinstance(third, ParseFailure) and "2 lists for 3 records" in str(third)
    assert parse_replies('[{"token": "a", "activation": 4}]', 1)[0][0][1] == 4.0, "a flat list answers one record"


@pytest.mark.slow
def test_chat_json_against_the_server(llama_server):
    """The live path: whatever SmolLM2 answers, a record either has one value in 0..10 per token or
    is marked failed with a reason (the reply-by-reply rules are checked above)."""
    from autoexplain.llm import OpenAILLM

    llm = OpenAILLM("smollm2", llama_server.base_url, backoff_base=0.05)
    # 160 tokens a record: the 7-token record answered in the asked format is 88 of SmolLM2's
    sims = ChatJsonSimulator(llm, retries=1, max_tokens=160).simulate("numbers and years", RECORDS)
    for sim, tokens in zip(sims, RECORDS):
        assert sim.completion_tokens > 0
        if sim.ok:
            assert len(sim.expected) == len(tokens) and all(0 <= v <= 10 for v in sim.expected)
        else:
            assert sim.expected is None and "after 2 attempts" in sim.failure


@pytest.mark.slow
def test_explanations_from_the_server(llama_server):
    from autoexplain.explain import explain
    from autoexplain.llm import OpenAILLM
    from autoexplain.records import ActivationRecord

    llm = OpenAILLM("smollm2", llama_server.base_url, backoff_base=0.05)
    records = [ActivationRecord([" In", " 18", "54", " the", " bridge"], [0.0, 3.0, 4.0, 0.0, 0.1])]
    with llm.track() as usage:
        result = explain(llm, records, k=2, max_tokens=20)
    assert result.candidates and all(isinstance(c, str) and c for c in result.candidates)
    assert usage.prompt_tokens > 200 and usage.completion_tokens > 0


def test_the_llama_launchers_ranking_is_llama_cpps_own():
    """tests/llama_server.py ranks echoed logprobs with numpy; it must give what the Python sort it
    replaces gives, ties included (llama.cpp's logprobs tie often in float32)."""
    import numpy as np

    from tests.llama_server import TOP_KEPT, top_first

    rng = np.random.default_rng(0)
    for n in (3, TOP_KEPT, 5000):
        row = np.round(rng.normal(size=n), 1).astype(np.float32)  # many ties, some across the cut
        row[rng.integers(n)] = -np.inf
        want = sorted(zip(row, range(n)), reverse=True)[:TOP_KEPT]
        assert top_first(zip(row, range(n)), reverse=True) == want
    assert top_first(zip([2, 1], range(2)), reverse=True) == [(2, 0), (1, 1)]  # not an array: the builtin
