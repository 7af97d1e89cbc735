"""A local model's identity covers every byte of its files (`weights`), and is paid once per file
version through the digest cache."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from autoexplain import registry, weights


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "digests"))
    # The files here were all written just now (their ctime cannot be set back): without this, none
    # would leave the racy window within a test.
    monkeypatch.setattr(weights, "RACY_SECONDS", -1.0)
    return tmp_path / "digests"


def _model(folder, weight=b"w" * 1000):
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 8}')
    (folder / "model.safetensors").write_bytes(weight)
    (folder / ".cache").mkdir()
    (folder / ".cache" / "download.lock").write_text("metadata, not the model")
    return folder


def test_a_weight_edit_with_the_same_config_size_and_mtime_moves_the_digest(tmp_path, cache):
    folder = _model(tmp_path / "m")
    before = weights.model_digest(folder)
    st = (folder / "model.safetensors").stat()
    time.sleep(0.05)  # past the clock tick of the first write, as the racy window ensures outside tests
    (folder / "model.safetensors").write_bytes(b"v" + b"w" * 999)  # a fine-tune: same size, same config
    os.utime(folder / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime
    assert weights.model_digest(folder) != before
    after = weights.model_digest(folder)
    (folder / ".cache" / "download.lock").write_text("other metadata")
    assert weights.model_digest(folder) == after, "hidden files are not the model"


def test_the_full_sha256_is_computed_once_per_file_version(tmp_path, cache, monkeypatch):
    folder = _model(tmp_path / "m")
    calls = []
    real = weights.sha256_file
    monkeypatch.setattr(weights, "sha256_file", lambda p: calls.append(p) or real(p))
    first = weights.model_digest(folder)
    assert len(calls) == 2  # config.json and model.safetensors
    assert weights.model_digest(folder) == first and len(calls) == 2, "the second call reads the cache"
    expected = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert weights.file_sha256(folder / "model.safetensors") == expected


def test_a_file_written_just_now_is_not_cached(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(weights, "RACY_SECONDS", 2.0)
    f = tmp_path / "fresh.bin"
    f.write_bytes(b"x" * 10)
    weights.file_sha256(f)
    assert not cache.exists() or not any(p.is_file() for p in cache.rglob("*"))


def test_the_cache_can_be_off(tmp_path, monkeypatch):
    monkeypatch.setenv(weights.CACHE_ENV, "off")
    folder = _model(tmp_path / "m")
    assert weights.cache_dir() is None and len(weights.model_digest(folder)) == 16


def test_a_local_llm_spec_names_its_weights(tmp_path, cache):
    folder = _model(tmp_path / "m")
    ident = registry.llm_weights(f"local:{folder}")
    assert ident == weights.model_digest(folder)  # its content, not its folder's name
    assert registry.simulator_identity(f"all-at-once:local:{folder}").endswith("|" + ident)
    assert registry.explainer_weights(f"local:{folder}") == ident
    assert registry.llm_weights("openai:gpt-4o-mini") == "" and registry.explainer_weights("embedding") == ""
