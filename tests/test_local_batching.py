"""A local model batches prompts of many units in one forward pass, and the results do not depend
on how the units were grouped: simulated values are the same bits per unit whichever units share
its passes (rows are padded to a fixed bucket of widths and attend to the shared prompt prefix in
place), in float32 and in bf16, and agree with the plain reading of each whole prompt within 1e-4
(float32); sampled explanations are the same per prompt for a fixed seed, in bf16 too (prompts are
padded to a bucket of widths). The bf16 claims are checked on the embedded SmolLM2, where the old
padding broke them, in the dtype it computes in on this machine (`subject.compute_dtype`: bf16, or
float32 on a CPU with AVX2 alone, which is what a user of that machine gets); forward passes are
counted on the real (tiny) model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoexplain import pipeline
from autoexplain.explain import as_explainer, explain_many
from autoexplain.llm_local import LocalLLM
from autoexplain.records import ActivationRecord, UnitId, UnitRecords
from autoexplain.local_batch import _parts_flash, _parts_math
from autoexplain.simulate import ROW_BUCKET, AllAtOnceSimulator

TOL = 1e-4
WORDS = "the river ran past old mill where seven grey cats and a red dog slept in 1854 town".split()


@pytest.fixture(scope="module")
def subject(smollm2_tokenizer):
    """The tiny Llama of conftest with larger weights: at the default init its digit values move
    by under 1e-3 from one explanation to another, too little for a 1e-4 tolerance to mean much;
    here they move by units, and float noise between batch shapes stays near 1e-6."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from autoexplain.subject import wrap

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=48,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, initializer_range=0.4)
    return wrap(LlamaForCausalLM(cfg).eval(), smollm2_tokenizer, "tiny-llama-0.4")


class Passes:
    """Counts the forward passes of the real transformer body and the rows each one held."""

    def __init__(self, model):
        self.rows: list[int] = []
        self.widths: list[int] = []
        self.handle = model.base_model.register_forward_pre_hook(self._seen, with_kwargs=True)

    def _seen(self, _module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.rows.append(int(ids.shape[0]))
        self.widths.append(int(ids.shape[1]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _records(seed: int, n: int, lengths=(4, 9, 13)) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    return [[str(w) for w in rng.choice(WORDS, size=lengths[i % len(lengths)])] for i in range(n)]


def _jobs():
    """Three units: different explanations (prompt lengths) and records of 4 to 13 tokens."""
    return [(["numbers", "years and dates in old stories"], _records(1, 3)),
            (["animals"], _records(2, 2)),
            (["the word 'the'", "rivers", "colours such as red or grey"], _records(3, 4, (13, 5)))]


def _close(a, b):
    assert a.ok and b.ok
    np.testing.assert_allclose(a.expected, b.expected, atol=TOL, rtol=0)


def _same(a, b):
    assert a.ok and b.ok
    assert a.expected == b.expected


def test_cross_unit_simulation_equals_per_unit_and_one_pass_per_width(subject):
    assert subject.model.config._attn_implementation == "sdpa"  # the shared-prefix attention runs
    jobs = _jobs()
    rows = sum(len(e) * len(r) for e, r in jobs)
    batched = AllAtOnceSimulator(subject, batch_size=rows)
    with Passes(subject.model) as passes:
        together = batched.simulate_jobs(jobs)
    # One pass for the prefix every explanation shares, then one per padded width, holding every
    # row of that width: each row read once.
    assert passes.rows[0] == 1 and sum(passes.rows[1:]) == rows
    widths = passes.widths[1:]
    assert len(set(widths)) == len(widths) > 1 and all(w % ROW_BUCKET == 0 for w in widths)
    per_unit = AllAtOnceSimulator(subject, batch_size=4)
    with Passes(subject.model) as unit_passes:
        alone = [per_unit.simulate_many(e, r) for e, r in jobs]
    assert len(unit_passes.rows) > len(passes.rows)
    # The plainest reading: every record's whole prompt alone, no cache and no padding.
    naive = AllAtOnceSimulator(subject, batch_size=1, reuse_prefix=False)
    for (explanations, records), got, ref in zip(jobs, together, alone):
        for e, text in enumerate(explanations):
            plain = naive.simulate(text, records)
            for r in range(len(records)):
                assert len(got[e][r].expected) == len(records[r])
                _same(got[e][r], ref[e][r])
                _close(got[e][r], plain[r])


@pytest.fixture
def smollm2():
    """The embedded SmolLM2-135M-Instruct (in this machine's compute dtype) on one torch thread: on a
    shared 2-core machine two OpenMP threads made its passes 10x slower; the claims hold for any
    fixed thread count."""
    from autoexplain.subject import load_subject

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield load_subject("smollm2", device="cpu")
    finally:
        torch.set_num_threads(threads)


def test_smollm2_values_do_not_depend_on_batch_mates(smollm2):
    """bf16 rounds differently with other shapes: SmolLM2's values moved by up to 0.16 between
    groupings when rows were padded to their batch's longest and copied the prefix cache. With
    widths bucketed and the prefix attended in place, a row's bits are its own. On the embedded
    SmolLM2 itself (bf16): a small model of its head width kept its bits even the old way."""
    smol = smollm2
    # Rows of about 60 to 150 tokens: they cross the widths where the CPU kernels change their
    # blocking, which is where batch-mates used to move a row's bits.
    jobs = [(["numbers"], _records(1, 2, (13, 34))), (["rivers and old mills"], _records(2, 1, (27,)))]
    sim = AllAtOnceSimulator(smol, batch_size=16)  # the prefix cache is read once, for all three
    together = sim.simulate_jobs(jobs)
    sim.batch_size = 1
    alone = [sim.simulate_many(*job) for job in jobs]
    sim.batch_size = 2
    reordered = sim.simulate_jobs(jobs[::-1])[::-1]
    values = lambda out: [[[s.expected for s in r] for r in job] for job in out]  # noqa: E731
    assert all(s.ok for job in together for r in job for s in r)
    assert values(together) == values(alone) == values(reordered)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_parts_agree_on_every_device_path(causal):
    """The CPU flash kernel and the plain float32 path (other devices) give the same output and
    log-sum-exp, with more keys than queries (the prefix part) or a causal square (the own part)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5 if causal else 11, 8), torch.randn(2, 3, 5 if causal else 11, 8)
    out_f, lse_f = _parts_flash(q, k, v, 0.35, causal)
    out_m, lse_m = _parts_math(q, k, v, 0.35, causal)
    torch.testing.assert_close(out_f, out_m, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_f.reshape(lse_m.shape), lse_m, atol=1e-5, rtol=1e-5)


def test_prompt_tokens_are_counted_per_record_as_before(subject):
    sim = AllAtOnceSimulator(subject)
    records = _records(4, 2)
    out = sim.simulate("numbers", records)
    tok = subject.tokenizer
    from autoexplain.simulate import simulator_body, simulator_prefix

    prefix = len(tok(simulator_prefix("numbers"), add_special_tokens=False)["input_ids"])
    for s, r in zip(out, records):
        assert s.prompt_tokens == prefix + len(tok(simulator_body(r)[0], add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def llm(subject):
    return LocalLLM(subject=subject, batch_size=4)


PROMPTS = ["Neuron 4 fires on", "The river ran quietly past the old mill, where the miller kept", "1854"]


def test_sampling_is_the_same_per_prompt_whatever_the_grouping(llm):
    kw = dict(n=3, temperature=1.0, max_tokens=8)
    llm.batch_size = 9  # all three prompts (9 rows) in one generate call
    together = llm.complete(PROMPTS, **kw)
    llm.batch_size = 3  # one prompt per call
    alone = [llm.complete([p], **kw)[0] for p in PROMPTS]
    reordered = llm.complete(PROMPTS[::-1], **kw)[::-1]
    llm.batch_size = 4
    texts = [[c.text for c in s] for s in together]
    assert texts == [[c.text for c in s] for s in alone] == [[c.text for c in s] for s in reordered]
    assert all(len(set(t)) > 1 for t in texts), "a prompt's samples differ from one another"
    other_seed = LocalLLM(subject=llm.subject, batch_size=9, seed=1).complete(PROMPTS, **kw)
    assert [[c.text for c in s] for s in other_seed] != texts


def test_smollm2_samples_do_not_depend_on_batch_mates(smollm2):
    """SmolLM2 (bf16) sampled other candidates when units were grouped differently (a pad count
    moved a logit by one bf16 step, and a near tie of the noisy top two flipped): with prompts
    padded to a bucket of widths, each prompt's samples are the same alone, together, reordered."""
    from autoexplain.local_batch import prompt_width

    smol = LocalLLM(subject=smollm2, batch_size=16)
    base = PROMPTS[1] + " his old grey"
    prompts = [base, base + " horse and", base + " horse and a dog", base + " horse, a dog and"]
    lengths = [len(smol.tok(p)["input_ids"]) for p in prompts]
    # Prompts of one padded width but of different lengths: together they share a pass.
    assert len({prompt_width(n) for n in lengths}) == 1 and len(set(lengths)) == 4, lengths
    kw = dict(n=4, temperature=1.0, max_tokens=30)
    together = smol.complete(prompts, **kw)
    reordered = smol.complete(prompts[::-1], **kw)[::-1]
    smol.batch_size = 4
    alone = [smol.complete([p], **kw)[0] for p in prompts]
    texts = lambda out: [[c.text for c in s] for s in out]  # noqa: E731
    assert texts(together) == texts(alone) == texts(reordered)


def test_chat_copies_of_one_conversation_are_distinct_samples_and_reproducible(llm):
    convs = [[{"role": "user", "content": p}] for p in PROMPTS[:2]]
    kw = dict(temperature=1.0, max_tokens=6)
    llm.batch_size = 6
    together = [r.text for r in llm.chat([c for c in convs for _ in range(3)], **kw)]
    llm.batch_size = 1
    alone = [r.text for c in convs for r in llm.chat([c] * 3, **kw)]
    llm.batch_size = 4
    assert together == alone
    assert len(set(together[:3])) > 1


def _unit(index: int) -> UnitRecords:
    rng = np.random.default_rng(index)
    records, wid = [], 0
    for split, n in (("train", 3), ("valid", 4), ("calib", 2), ("test", 3)):
        for i in range(n):
            tokens = list(_records(100 * index + wid, 1, (5 + (wid * 3) % 9,))[0])
            records.append(ActivationRecord(tokens, rng.random(len(tokens)).round(2).tolist(), wid,
                                            "top" if i % 2 == 0 else "random", split))
            wid += 1
    return UnitRecords(UnitId.mlp(1, index), records)


def _explanations(units, candidates):
    rows = []
    for u, cands in zip(units, candidates):
        for method, texts in (("explainer", cands), ("token-lookup", ["the tokens \"red\""])):
            rows.append({"layer": 1, "unit": u.id.index, "polarity": 1, "method": method, "explainer": "x",
                         "prompt_hash": "", "text": texts[0], "candidates": texts, "candidate_valid_scores": [],
                         "prompt_tokens": 0, "completion_tokens": 0, "failure": None, "dollars": 0.0,
                         "selection_tokens": 0, "selection_dollars": 0.0})
    return pipeline.rows_to_table(rows, "explanations")


class OneUnitAtATime(AllAtOnceSimulator):
    """The same simulator, with the stage gathering no units: the per-unit path."""

    units_at_once = 1


UNITS = [_unit(i) for i in range(5)]
CANDIDATES = [["numbers", "animals", "old towns", "the letter r"], ["cats"], ["dates", "colours"],
              ["rivers and mills", "grey things", "nothing"], ["words after 'the'", "dogs"]]


def _expected(table):
    return {(r["unit"], r["method"], r["window_id"]): r["expected"] for r in table.to_pylist()}


def test_simulate_stage_gathers_units_into_fewer_passes_with_the_same_results(subject):
    explanations = _explanations(UNITS, CANDIDATES)
    with Passes(subject.model) as per_unit_passes:
        chosen_1, sims_1 = pipeline.simulate_stage(UNITS, explanations, OneUnitAtATime(subject, batch_size=16))
    gathering = AllAtOnceSimulator(subject, batch_size=16)
    assert gathering.units_at_once == 4
    with Passes(subject.model) as passes:
        chosen_n, sims_n = pipeline.simulate_stage(UNITS, explanations, gathering)
    assert len(passes.rows) < len(per_unit_passes.rows)
    assert max(passes.rows) <= 16
    a, b = _expected(sims_1), _expected(sims_n)
    assert a.keys() == b.keys() and len(a) == 5 * 3 * 5  # 5 units x 3 methods x 5 held-out records
    assert a == b
    pick = lambda t: [(r["unit"], r["method"], r["text"]) for r in t.to_pylist()]  # noqa: E731
    assert pick(chosen_1) == pick(chosen_n)


def test_each_unit_is_remembered_when_it_finishes_and_a_crash_resumes(subject):
    explanations = _explanations(UNITS, CANDIDATES)
    sim = AllAtOnceSimulator(subject, batch_size=16)
    stored: dict = {}

    def remember(unit, inputs, compute, fail_on=None):
        key = (unit.id.index, repr(inputs))
        if key not in stored:
            value = compute()
            if unit.id.index == fail_on:
                raise RuntimeError("crash after computing")
            stored[key] = value
        return stored[key]

    with pytest.raises(RuntimeError, match="crash"):
        pipeline.simulate_stage(UNITS, explanations, sim, remember=lambda u, i, c: remember(u, i, c, fail_on=2))
    done = {k[0] for k in stored}
    assert {0, 1} <= done and 2 not in done
    with Passes(subject.model) as passes:
        chosen, sims = pipeline.simulate_stage(UNITS, explanations, sim, remember=remember)
    assert passes.rows, "the units not stored are simulated"
    with Passes(subject.model) as again:
        pipeline.simulate_stage(UNITS, explanations, sim, remember=remember)
    assert again.rows == [], "every unit was stored"
    fresh_chosen, fresh_sims = pipeline.simulate_stage(UNITS, explanations, sim)
    a, b = _expected(sims), _expected(fresh_sims)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=TOL, rtol=0)


def test_explain_stage_puts_many_units_in_one_generate_call(subject):
    cfg = pipeline.ExplainConfig(k=2, max_tokens=6, batch_units=1)
    small, big = LocalLLM(subject=subject, batch_size=2), LocalLLM(subject=subject, batch_size=8)
    assert (pipeline.units_per_batch(as_explainer(small), cfg),
            pipeline.units_per_batch(as_explainer(big), cfg)) == (1, 4)
    with Passes(subject.model) as one:
        per_unit = pipeline.explain_stage(UNITS, small, cfg)
    with Passes(subject.model) as many:
        gathered = pipeline.explain_stage(UNITS, big, cfg)
    # The prompt pass of a call reads each prompt once; its rows are the units of the call.
    assert max(one.rows) == 2 and max(many.rows) == 8
    assert len(many.rows) < len(one.rows)
    cands = lambda t: [(r["unit"], r["method"], r["candidates"]) for r in t.to_pylist()]  # noqa: E731
    assert cands(per_unit) == cands(gathered)
    direct = explain_many(big, [pipeline.shown_records(u, cfg.n_shown) for u in UNITS[:1]], k=2, max_tokens=6)
    assert direct[0].candidates == next(r["candidates"] for r in per_unit.to_pylist() if r["unit"] == 0)
