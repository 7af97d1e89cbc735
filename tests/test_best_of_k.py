"""Best-of-k on the valid split (issue 13, item 6): successive halving picks from candidates
simulated on growing prefixes of a kind-balanced order and spends fewer simulations than full
evaluation; the all-at-once simulator packs several records into one server request and reads
each record's values back from the right offsets."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from autoexplain import best_of_k
from autoexplain.best_of_k import choose, interleaved, prefix_sizes
from autoexplain.simulate import AllAtOnceSimulator, Simulation


@dataclass
class Rec:
    kind: str
    activations: list[float]
    tokens: list[str]


def records(n_top=10, n_random=10, seed=0):
    rng = random.Random(seed)
    out = [Rec("top", [rng.uniform(0, 10) for _ in range(8)], [f"t{i}_{j}" for j in range(8)]) for i in range(n_top)]
    out += [Rec("random", [rng.uniform(0, 1) for _ in range(8)], [f"r{i}_{j}" for j in range(8)]) for i in range(n_random)]
    return out


def noisy_simulator(noise: dict[str, float], calls: list):
    """Candidate text -> predictions: the truth plus that candidate's noise (fixed per record and
    token), so candidates differ in quality by a known amount."""
    def simulate_many(texts, recs):
        calls.append((list(texts), len(recs)))
        out = []
        for t in texts:
            sims = []
            for r in recs:
                rng = random.Random(f"{t}|{r.tokens[0]}")
                sims.append(Simulation([a + rng.gauss(0, noise[t]) for a in r.activations]))
            out.append(sims)
        return out
    return simulate_many


def test_interleaved_prefixes_mix_kinds_in_proportion():
    order = interleaved(records(10, 10))
    assert [r.kind for r in order[:4]] == ["random", "top", "random", "top"]
    recs = records(12, 4)
    order = interleaved(recs)
    for n in (4, 8, 12, 16):
        assert sum(r.kind == "random" for r in order[:n]) == n // 4, "a quarter random in every prefix"
    assert sorted(map(id, order)) == sorted(map(id, recs)), "a permutation of the records"
    tops = [r for r in order if r.kind == "top"]
    assert tops == [r for r in recs if r.kind == "top"], "each kind keeps its own order"


def test_prefix_sizes_end_at_all_records():
    assert prefix_sizes(4, 20) == [10, 20]
    assert prefix_sizes(8, 20) == [5, 10, 20]
    assert prefix_sizes(2, 20) == [20]
    assert prefix_sizes(3, 7) == [4, 7]


@pytest.mark.parametrize("k, spent_full, spent_halving", [(1, 20, 0), (2, 40, 40), (4, 80, 60), (8, 160, 80)])
def test_halving_spends_fewer_simulations_and_picks_the_best(k, spent_full, spent_halving):
    texts = [f"c{i}" for i in range(k)]
    noise = {t: 0.5 + 2.0 * ((i * 5) % k) for i, t in enumerate(texts)}  # the best is not always first
    recs = records()
    spent = {}
    for selection in ("full", "halving"):
        calls = []
        choice = choose(texts, recs, noisy_simulator(noise, calls), selection)
        spent[selection] = sum(len(t) * n for t, n in calls)
        assert texts[choice.index] == min(noise, key=noise.get), selection
        assert len(choice.valid_scores) == k
    assert (spent["full"], spent["halving"]) == (spent_full, spent_halving)


def test_halving_never_picks_a_candidate_dropped_earlier():
    """A candidate dropped after the first round keeps its prefix score, even a high one; the pick is
    among the last two, scored on all records."""
    recs = records(10, 10)
    order = interleaved(recs)
    first = {id(r) for r in order[:10]}

    def simulate_many(texts, rs):
        out = []
        for t in texts:
            sims = []
            for r in rs:
                good = {"a": True, "b": id(r) in first, "c": True, "d": True}[t]
                noise = {"a": 0.8, "b": 0.0, "c": 3.0, "d": 3.0}[t]
                rng = random.Random(f"{t}|{r.tokens[0]}")
                pred = [x + rng.gauss(0, noise) for x in r.activations] if good else [10 - x for x in r.activations]
                sims.append(Simulation(pred))
            out.append(sims)
        return out

    choice = choose(["a", "b", "c", "d"], recs, simulate_many, "halving")
    assert choice.simulated == [20, 20, 10, 10]
    # b is perfect on the first half and anti-correlated on the second: it reaches the final round and loses.
    assert choice.index == 0


def test_failed_simulations_rank_last():
    recs = records()

    def simulate_many(texts, rs):
        return [[Simulation(None, "failed") if t == "broken" else Simulation(list(r.activations)) for r in rs] for t in texts]

    choice = choose(["broken", "fine"], recs, simulate_many, "halving")
    assert choice.index == 1 and choice.valid_scores[0] != choice.valid_scores[0], "undefined: NaN, not picked"


def test_unknown_selection_is_refused():
    with pytest.raises(ValueError, match="selection"):
        choose(["a"], records(), lambda t, r: [], "sometimes")
    assert best_of_k.SELECTIONS == ("full", "halving")


# -- packing records into server requests ------------------------------------------------------

def test_packed_requests_read_each_record_from_its_own_offsets(fault_server, bench_server):
    """bench/llm_server.py's digits at a placeholder depend only on the explanation and the line's
    token, not on what else the prompt holds, so packed and one-record requests must agree exactly."""
    from autoexplain.llm import OpenAILLM

    srv = fault_server(upstream=bench_server.base_url)
    llm = OpenAILLM("test-model", srv.base_url, api_key="test", max_retries=1)
    recs = [[f" w{i}", " the", "\n", f" {i}"] for i in range(7)]
    packed = AllAtOnceSimulator(llm, records_per_request=5)
    got = packed.simulate_many(["numbers", "rivers"], recs)
    assert len(srv.requests) == 2 * 2, "7 records: 2 requests per explanation"
    single = AllAtOnceSimulator(llm)
    assert single.records_per_request == 1, "the paper's format unless packing is asked for"
    want = single.simulate_many(["numbers", "rivers"], recs)
    assert len(srv.requests) == 4 + 2 * 7
    for g, w in zip(got, want):
        assert [s.expected for s in g] == [s.expected for s in w]
        assert all(s.ok and len(s.expected) == 4 for s in g)
    # The prefix is paid once per request: packed prompts are fewer tokens in all.
    assert sum(s.prompt_tokens for s in got[0]) < sum(s.prompt_tokens for s in want[0])
