"""Corpus sources and deterministic windowing, and the clear errors for bad corpora."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from autoexplain.corpus import cut_windows, load_documents
from autoexplain.errors import UserError


def _tokenize(texts):
    return [[len(w) for w in t.split()] for t in texts]


def test_txt_jsonl_parquet_and_folder(tmp_path, prose_file):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i} words here"}) for i in range(3)))
    pq.write_table(pa.table({"text": ["one two three", "four five"]}), tmp_path / "b.parquet")
    assert len(load_documents(str(tmp_path / "a.jsonl"))) == 3
    assert [d.text for d in load_documents(str(tmp_path / "b.parquet"))] == ["one two three", "four five"]
    assert len(load_documents(str(prose_file))) >= 1
    assert len(load_documents(str(tmp_path))) == 3 + 2 + len(load_documents(str(prose_file)))


def test_windows_are_deterministic_per_seed():
    docs = load_documents_from_list([" ".join(["w"] * (i % 7 + 1) * 10) for i in range(50)])
    a = list(cut_windows(docs, _tokenize, window_len=8, seed=1))
    b = list(cut_windows(docs, _tokenize, window_len=8, seed=1))
    c = list(cut_windows(docs, _tokenize, window_len=8, seed=2))
    assert a == b
    assert [w[1] for w in a] != [w[1] for w in c], "another seed gives another document order"
    assert all(len(w[2]) == 8 for w in a)
    assert [w[0] for w in a] == list(range(len(a)))


def test_max_tokens_bounds_windows():
    docs = load_documents_from_list(["x " * 100] * 10)
    wins = list(cut_windows(docs, _tokenize, window_len=10, max_tokens=55))
    assert len(wins) == 5


def load_documents_from_list(texts):
    from autoexplain.corpus import Document

    return [Document(i, t) for i, t in enumerate(texts)]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"   \n\n  ", "is empty"),
        (b"caf\xe9 latin-1 text", "not valid UTF-8.*0xe9 at offset 3"),
    ],
)
def test_bad_text_files(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_documents(str(path))


def test_missing_and_unreadable(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_documents(str(tmp_path / "nope.txt"))
    bad = tmp_path / "x.csv"
    bad.write_text("a,b")
    with pytest.raises(UserError, match="unsupported corpus file type"):
        load_documents(str(bad))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(UserError, match="broken.jsonl:2 is not valid JSON"):
        load_documents(str(broken))
    no_field = tmp_path / "f.parquet"
    pq.write_table(pa.table({"body": ["x"]}), no_field)
    with pytest.raises(UserError, match="no column 'text'.*--text-field"):
        load_documents(str(no_field))


@pytest.mark.slow
def test_embedded_corpus_is_real_prose():
    docs = load_documents("default")
    text = " ".join(d.text for d in docs)
    assert len(text) > 5_000_000
    assert "Anarchism" in text and "In the beginning God created" in text
    assert "[[" not in text and "{{" not in text, "wiki markup is stripped"


def test_the_head_check_reads_the_start_and_refuses_what_the_reading_would(tmp_path):
    """`check_head` (the preflight's) reads no further than the first row: a broken line further in is
    left to the reading, and a folder with one empty file beside a good one is not empty."""
    from autoexplain.corpus import check_head

    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"body": "x " * 50}) + "\n" + "{broken\n" + (json.dumps({"body": "y"}) + "\n") * 200_000)
    check_head(str(big), "body")
    with pytest.raises(UserError, match="big.jsonl:2 is not valid JSON"):
        load_documents(str(big), "body")
    with pytest.raises(UserError, match=r"big.jsonl:1 has no string field 'text' — .* with --text-field$"):
        check_head(str(big))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("")
    (folder / "b.txt").write_text("Some words.")
    check_head(str(folder))
    (folder / "b.txt").write_text("  \n")
    with pytest.raises(UserError, match="is empty"):
        check_head(str(folder))
