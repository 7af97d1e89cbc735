"""The explainer prompt format, the baselines, and candidate sampling on a real tiny local model."""

import pytest

from autoexplain.explain import (
    ENDING,
    build_prompt,
    clean_explanation,
    explain,
    explainer_prompt_hash,
    format_records,
    normalise,
    shuffled_explanations,
    token_lookup_explanation,
)
from autoexplain.records import ActivationRecord


def rec(tokens, acts, **kw):
    return ActivationRecord(list(tokens), list(acts), **kw)


def test_normalise_is_relu_floor_by_shown_max():
    assert normalise([[0.0, 1.0, 2.0], [-3.0, 0.5, 4.0]]) == [[0, 2, 5], [0, 1, 10]]
    assert normalise([[0.0, -1.0]]) == [[0, 0]], "nothing fires: all zeros, no division by zero"


def test_sparse_records_repeat_nonzero_lines():
    text = format_records([(["a", "b", "c", "d", "e", "f"], [0, 0, 7, 0, 0, 0])])
    assert text.count("<start>") == 2 and "zeros left out:\n<start>\nc\t7\n<end>" in text
    dense = format_records([(["a", "b"], [3, 4])])
    assert dense.count("<start>") == 1


def test_prompt_format_and_ending():
    records = [rec([" river", "\n", " \tx"], [2.0, 0.0, 1.0]), rec([" sea"], [4.0])]
    prompt = build_prompt(records)
    text = prompt.text()
    assert text.endswith(f"Explanation of neuron 4 behavior: {ENDING}")
    assert " river\t5" in text and " sea\t10" in text
    assert "\\n\t0" in text and " \\tx\t2" in text, "tabs and newlines inside tokens are escaped"
    assert text.count("Explanation of neuron") == 4, "three few-shot neurons precede the target"
    msgs = prompt.messages()
    assert msgs[0]["role"] == "system" and msgs[-1]["content"].endswith(f"{ENDING}...")
    assert len(explainer_prompt_hash()) == 16


def test_clean_explanation():
    assert clean_explanation(" years written in digits. Also other stuff\nmore") == "years written in digits"
    assert clean_explanation(f"Sure: {ENDING} animals.") == "animals"


def test_token_lookup_and_shuffle_baselines():
    records = [rec([" God", " said", " God"], [9.0, 0.0, 7.0]), rec([" Lord", " the"], [5.0, 0.1])]
    assert token_lookup_explanation(records, n=2) == 'the tokens "God", "Lord"'
    shuffled = shuffled_explanations(["a", "b", "c", "d"], seed=1)
    assert sorted(shuffled) == ["a", "b", "c", "d"]
    assert all(s != o for s, o in zip(shuffled, ["a", "b", "c", "d"])), "no unit keeps its own explanation"


def test_explain_samples_k_candidates_on_a_local_model(tiny_llama_dir):
    from autoexplain.llm_local import LocalLLM

    llm = LocalLLM(tiny_llama_dir)
    with llm.track() as usage:
        result = explain(llm, [rec([" a", " b"], [1.0, 3.0])], k=3, max_tokens=8)
    assert 1 <= len(result.candidates) <= 3, "random weights still produce some text"
    assert result.prompt_hash == explainer_prompt_hash()
    assert usage.completion_tokens > 0 and result.prompt_tokens > 0


def test_the_with_outputs_explainer_reads_what_the_unit_writes(tiny_llama_dir):
    """'with-outputs:LLM' adds one line on the unit's output side to the target neuron (never to the
    few-shot ones), under its own prompt hash; the output-side baseline names what it promotes."""
    from autoexplain.explain import output_line, output_lookup_explanation
    from autoexplain.records import UnitStats
    from autoexplain.registry import explainer_prompt, make_explainer, parse_explainer

    stats = UnitStats(0.0, 1.0, 3.0, 0.1, promotes=[" Paris", " London"], suppresses=[" the"])
    line = output_line(stats)
    assert '" Paris", " London"' in line and '" the"' in line
    assert output_line(UnitStats(0.0, 1.0, 3.0, 0.1)) is None
    assert output_lookup_explanation([" Paris", " ", "London"]) == 'promotes the tokens "Paris", "London"'
    records = [rec([" a", " b"], [1.0, 3.0])]
    prompt = build_prompt(records, outputs=line)
    assert line in prompt.target and all(line not in block for block, _ in prompt.shots)
    assert build_prompt(records).target + f"{line}\n" == prompt.target

    spec = f"with-outputs:local:{tiny_llama_dir}"
    assert parse_explainer(spec).llm == f"local:{tiny_llama_dir}"
    assert explainer_prompt(spec) not in ("", explainer_prompt(f"local:{tiny_llama_dir}"))
    assert explainer_prompt("embedding") != explainer_prompt(f"local:{tiny_llama_dir}")
    explainer = make_explainer(spec)
    assert explainer.uses_outputs and explainer.name.startswith("with-outputs:")
    told, = explainer.explain_records([records], k=1, max_tokens=4, outputs=[line])
    plain, = make_explainer(f"local:{tiny_llama_dir}").explain_records([records], k=1, max_tokens=4)
    assert told.prompt_tokens > plain.prompt_tokens and told.prompt_hash != plain.prompt_hash
