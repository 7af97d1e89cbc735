"""The store's one way of writing a stage output (`store.Stage`): key, reuse, a temporary folder,
check, seal, move into place, push. Small tables, no model: the order itself is what is tested.
The end-to-end boundaries (a breaking input stops the next stage, through the CLI and the flow)
are in test_gate."""

from __future__ import annotations

import gc
import shutil
import uuid

import pyarrow as pa
import pytest

from autoexplain import layout, remote
from autoexplain.identity import code_identity
from autoexplain.storage import content_key, is_complete, open_root, read_manifest
from autoexplain.store import Stage, stage_key
from autoexplain.schemas.contracts import ContractViolation


def _scores(polarity: int = 1) -> pa.Table:
    row = {"layer": 1, "unit": 0, "polarity": polarity, "method": "explainer", "simulator": "s", "split": "test",
           "metric": "top_and_random", "value": 0.5, "ci_low": 0.4, "ci_high": 0.6, "undefined_reason": None,
           "n_records": 10, "n_failed": 0, "explainer_tokens": 0, "simulator_tokens": 0, "dollars": None}
    return pa.Table.from_pylist([row])


CODE = "autoexplain.layer:run_score"  # the code a scores output is keyed by


def _write(root, polarity: int = 1, fields: dict | None = None) -> Stage:
    stage = Stage.open(root, "scores", fields or {"simulations": "s1", "layer": 1}, CODE)
    stage.table(_scores(polarity), layout.table(stage.directory, 1).name, "scores")
    return stage


def _entries(root) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def test_the_key_is_the_fields_with_the_code_identity():
    fields = {"simulations": "s1", "layer": 1}
    assert stage_key(fields, CODE) == content_key({**fields, "code": code_identity(CODE)})
    assert stage_key(fields) == content_key(fields), "without code: the fields are the content"


def test_nothing_is_at_the_path_until_the_seal_then_it_is_reused(tmp_path):
    stage = _write(tmp_path)
    assert not stage.directory.exists() and not stage.done, "a folder being written is not at its path"
    sealed = stage.seal({"simulations": "s1"}, {"layer": 1})
    assert sealed == stage.directory and is_complete(sealed)
    assert read_manifest(sealed)["contract_versions"], "the table was checked before the seal"
    assert not [p for p in sealed.parent.iterdir() if layout.in_progress(p.name)], "no temporary folder left"
    again = Stage.open(tmp_path, "scores", {"simulations": "s1", "layer": 1}, CODE)
    assert again.key == stage.key and again.done


def test_a_sealed_output_has_the_permissions_the_umask_gives(tmp_path):
    """Not tempfile's private 0700 and 0600: a colleague, or a worker running as another user, reads it."""
    import os

    old = os.umask(0o022)
    try:
        import importlib

        from autoexplain import files

        importlib.reload(files)  # the umask is read once, at import
        sealed = _write(tmp_path).seal({"simulations": "s1"}, {"layer": 1})
    finally:
        os.umask(old)
        importlib.reload(files)
    assert sealed.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in sealed.iterdir()} == {"layer_1.parquet": 0o644, "manifest.json": 0o644}


def test_a_breaking_output_is_never_sealed(tmp_path):
    stage = _write(tmp_path, polarity=2)
    with pytest.raises(ContractViolation, match=r"polarity is \+1 or -1") as info:
        stage.seal({}, {"layer": 1})
    assert info.value.path == layout.table(stage.directory, 1), "named by the output's path, not a temporary one"
    assert not stage.directory.exists() and _entries(tmp_path) == ["scores"], "nothing left, sealed or not"


def test_an_error_before_the_seal_leaves_nothing(tmp_path):
    def stage_that_fails():
        stage = _write(tmp_path)
        raise RuntimeError("the stage failed half way")

    with pytest.raises(RuntimeError):
        stage_that_fails()
    gc.collect()
    assert _entries(tmp_path) == ["scores"]


def test_an_unfinished_folder_at_the_path_is_replaced(tmp_path):
    stage = _write(tmp_path)
    stage.directory.mkdir(parents=True)
    (stage.directory / "layer_1.parquet").write_bytes(b"half a file, no manifest")
    stage.seal({}, {"layer": 1})
    assert is_complete(stage.directory) and _entries(tmp_path) == ["scores", f"scores/{stage.key}",
                                                                   f"scores/{stage.key}/layer_1.parquet",
                                                                   f"scores/{stage.key}/manifest.json"]


def test_a_folder_sealed_meanwhile_by_another_writer_stays(tmp_path):
    first, second = _write(tmp_path), _write(tmp_path)
    first.seal({"by": "first"}, {"layer": 1})
    second.seal({"by": "second"}, {"layer": 1})
    assert read_manifest(first.directory)["inputs"] == {"by": "first"}
    assert not [p for p in first.directory.parent.iterdir() if layout.in_progress(p.name)]


def test_under_a_url_root_it_is_pushed_only_once_sealed(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOEXPLAIN_CACHE", str(tmp_path / "cache"))
    url = f"memory://stage-{uuid.uuid4().hex[:8]}/run"
    root = open_root(url)
    fs, base = remote.filesystem(url)
    broken = _write(root, polarity=2, fields={"broken": True})
    with pytest.raises(ContractViolation):
        broken.seal({}, {"layer": 1})
    assert not fs.exists(f"{base}/scores/{broken.key}"), "a failing output is never pushed"
    stage = _write(root)
    stage.seal({}, {"layer": 1})
    assert fs.exists(f"{base}/scores/{stage.key}/manifest.json")
    fresh = Stage(open_root(url), "scores", stage.key)
    shutil.rmtree(fresh.directory)  # another machine: only the URL has it
    assert fresh.done and is_complete(fresh.directory), "a sealed output at the URL is pulled, not recomputed"


WRITER = """
import sys, time
from autoexplain.store import Stage
stage = Stage.open(sys.argv[1], "scores", {"writer": sys.argv[2]})
stage.path("layer_1.parquet").write_bytes(b"half a table")
print(stage.path("layer_1.parquet").parent, flush=True)
time.sleep(600)
"""


def _writer(root, name: str):
    """A real process half way through writing a stage output: (the process, its temporary folder)."""
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), name], stdout=subprocess.PIPE, text=True)
    return proc, Path(proc.stdout.readline().strip())


def test_the_next_write_sweeps_what_killed_writers_left_and_only_that(tmp_path):
    import os
    import signal
    import time

    from autoexplain import files

    killed, killed_tmp = _writer(tmp_path, "killed")
    live, live_tmp = _writer(tmp_path, "live")
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert killed_tmp.is_dir() and live_tmp.is_dir() and layout.in_progress(killed_tmp.name)
        # A writer on another host sharing the folder: its pid means nothing here, only its age counts.
        host = files.writer_tag().split("-")[1]
        other = files.writer_tag().replace(host, "000000" if host != "000000" else "111111")
        # And names from before writes carried their writer: only their age counts too.
        old, recent, old_untagged, recent_untagged = (tmp_path / "scores" / name for name in (
            f".k1.{other}.abc.tmp", f".k2.{other}.abc.tmp", ".k3.abc.tmp", ".k4.abcd1234.old"))
        for folder in (old, recent, old_untagged, recent_untagged):
            folder.mkdir()
            (folder / "layer_1.parquet").write_bytes(b"x")
        two_days_ago = time.time() - 2 * files.STALE_AFTER
        for p in (old / "layer_1.parquet", old, old_untagged / "layer_1.parquet", old_untagged):
            os.utime(p, (two_days_ago, two_days_ago))

        stage = _write(tmp_path)  # the first file of a stage write sweeps
        assert not killed_tmp.exists() and not old.exists() and not old_untagged.exists(), "a dead writer's folders go"
        assert live_tmp.is_dir() and recent.is_dir() and recent_untagged.is_dir(), \
            "a live writer's folder stays, and a recent one of another host or of an untagged name"
        stage.seal({}, {"layer": 1})
        assert is_complete(stage.directory) and live_tmp.is_dir()
    finally:
        live.kill()
        live.wait()


class _Words:
    """A word encoder for the word table (`wordvecs.word_table`): each word a unit vector, or
    `scale` times one (an embedder that forgot to normalise)."""

    embedder = "toy"

    def __init__(self, scale: float = 1.0):
        self.scale, self.encoding = scale, f"toy|{scale}"

    def encode_words(self, words):
        import numpy as np

        return np.array([[self.scale * np.cos(i), self.scale * np.sin(i)] for i in range(len(words))], np.float32)


def _windows(root):
    from autoexplain.tables import write_table

    rows = [{"window_id": w, "doc_id": 0, "token_ids": [1, 2, 3], "tokens": [" the", " river", f" mill{w}"]} for w in range(3)]
    return write_table(pa.Table.from_pylist(rows), root / "windows.parquet", "windows")


def test_the_word_table_keeps_its_contract_on_both_sides(tmp_path):
    import polars as pl

    from autoexplain import wordvecs
    from autoexplain.errors import UserError
    from autoexplain.storage import require_complete
    from tests.test_gate import _unchecked_seal

    windows = _windows(tmp_path)
    with pytest.raises(ContractViolation, match="vectors have unit length"):
        wordvecs.word_table(windows, "w1", tmp_path / "out", _Words(scale=3.0))
    assert not [p for p in (tmp_path / "out" / "word_vectors").iterdir()], "a breaking table is never sealed"

    words, vectors = wordvecs.word_table(windows, "w1", tmp_path / "out", _Words())
    folder = next((tmp_path / "out" / "word_vectors").iterdir())
    path = folder / layout.WORD_VECTORS
    assert layout.WORD_VECTORS in read_manifest(folder)["contract_versions"], "checked before its seal"
    clean = path.read_bytes()
    _unchecked_seal(path, pl.read_parquet(path).with_columns(pl.col("vector").list.eval(pl.element() * 3)))
    with pytest.raises(UserError) as info:
        require_complete(folder, "word_vectors", "")
    line = str(info.value)
    assert f"{path} breaks its data contract 'word_vectors'" in line and "vectors have unit length" in line
    assert "`autoexplain explain` or `simulate`" in line
    wordvecs._loaded.clear()  # a new process: what this one read is not remembered
    again, vectors_again = wordvecs.word_table(windows, "w1", tmp_path / "out", _Words())
    assert again == words and (vectors_again == vectors).all() and path.read_bytes() == clean, "rebuilt, not read"
