"""Shared fixtures: tiny random GPT-2 and Llama models built from configs, and small corpora.

Nothing is downloaded: the tiny models borrow the embedded SmolLM2 tokenizer.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# SQLite under several task threads on a busy machine: wait for the lock rather than fail.
os.environ.setdefault("PREFECT_SERVER_DATABASE_TIMEOUT", "60")
os.environ.setdefault("PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT", "60")

import pytest
import torch

# The real llama.cpp server and the fault-injecting server, as fixtures for every test module.
pytest_plugins = ("tests.llama_server",)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from autoexplain.subject import load_tokenizer

    return load_tokenizer("smollm2")


def _save_tiny(path, model, tokenizer):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=48,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256)
    return _save_tiny(tmp_path_factory.mktemp("tiny_llama"), LlamaForCausalLM(cfg), smollm2_tokenizer)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, smollm2_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(smollm2_tokenizer), n_embd=32, n_inner=40, n_layer=2, n_head=4,
                     n_positions=256)
    return _save_tiny(tmp_path_factory.mktemp("tiny_gpt2"), GPT2LMHeadModel(cfg), smollm2_tokenizer)


PROSE = (
    "The river ran quietly past the old mill, where the miller kept seven grey cats and a red dog. "
    "In 1854 the town council voted to rebuild the bridge; the work took three years and cost 2,400 pounds. "
    "Children walked to school along the bank, counting herons, and the teacher wrote their names in a blue book. "
    "When winter came the water froze, and skaters drew long white lines across the ice until March."
)


_WORDS = {"seven": ("two", "three", "four", "five", "six", "seven", "eight", "nine"),
          "grey": ("grey", "black", "white", "brown", "ginger"), "red": ("red", "old", "lame", "loud", "spotted"),
          "blue": ("blue", "green", "thin", "leather"), "March": ("March", "April", "February")}
_LEAD = "Long ago in a quiet valley town far to the north".split()


def prose_document(i: int) -> str:
    """The i-th document: PROSE with its own numbers and words, after i % 8 words of its own (so
    windows start at different places in the text): no two documents share a window."""
    text = PROSE.replace("1854", str(1800 + 7 * i)).replace("2,400", f"{1000 + 137 * i:,}")
    for word, choices in _WORDS.items():
        text = text.replace(word, choices[i % len(choices)])
    return " ".join([*_LEAD[: i % 8], text, f"Paragraph {i}."])


def write_prose(path):
    """20 documents of one paragraph of English each (JSON lines): a few hundred windows of 8
    tokens, and enough documents for the four splits (a .txt file of it would be 2 documents)."""
    path.write_text("".join(json.dumps({"text": prose_document(i)}) + "\n" for i in range(20)), encoding="utf-8")
    return path


@pytest.fixture
def prose_file(tmp_path):
    return write_prose(tmp_path / "prose.jsonl")


@pytest.fixture(scope="session")
def prose_corpus(tmp_path_factory):
    return write_prose(tmp_path_factory.mktemp("corpus") / "prose.jsonl")


@pytest.fixture(scope="session")
def tiny_records(tiny_llama_dir, prose_corpus, tmp_path_factory):
    """Layer 1 of the tiny Llama recorded over the prose corpus, 8-token windows."""
    from autoexplain.record import RecordConfig, build_windows, record_layers
    from autoexplain.subject import load_subject

    out = tmp_path_factory.mktemp("out")
    subject = load_subject(tiny_llama_dir)
    windows = build_windows(subject, str(prose_corpus), out, window_len=8, seed=0)
    ref = record_layers(subject, windows, RecordConfig([1], top_k=12, n_random=9, quantile_per_bin=1, reservoir=48), out)
    return ref.directory, out


@pytest.fixture(scope="module")
def prefect_results(tmp_path_factory):
    """Prefect's test harness with its own result storage for a test module: the harness alone
    does not isolate results. Yields the results folder."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    results = tmp_path_factory.mktemp("prefect-results")
    # Its server's default 30 s to start was missed on 2 busy cores (the fixture errored, in CI too).
    with prefect_test_harness(server_startup_timeout=180), temporary_settings({PREFECT_LOCAL_STORAGE_PATH: results}):
        yield results
