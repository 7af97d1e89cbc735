"""Corpus: documents in, fixed-length token windows out.

Sources: the embedded default corpus, local `.txt` / `.jsonl` / `.parquet` files (or a folder of
them), and Hugging Face dataset names (`hf:NAME[:CONFIG][@SPLIT]`, needs network and `datasets`).
Windows are non-overlapping runs of `window_len` tokens cut from each document; a document's tail
shorter than a window is dropped, as are windows that would straddle two documents. Document
order is shuffled with the seed, so a seed fixes exactly which windows a run sees.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from autoexplain import defaults
from autoexplain.errors import UserError
from autoexplain.spelling import Spelling, cli_flag

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
HEAD_BYTES = 1 << 16  # what `check_head` reads of a text file at a time


@dataclass
class Document:
    doc_id: int
    text: str


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path} is not valid UTF-8 (bad byte 0x{data[e.start]:02x} at offset {e.start})",
            "re-encode it as UTF-8, e.g. `iconv -f latin1 -t utf-8`",
        ) from None


def _read_bytes(path: Path, size: int = -1, offset: int = 0) -> bytes:
    """The file's bytes (`size` of them from `offset`; -1: all)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read(size)
    except FileNotFoundError:
        raise UserError(f"corpus file {path} does not exist", "check the --corpus path") from None
    except (PermissionError, IsADirectoryError, OSError) as e:
        raise unreadable(path, e) from None


def unreadable(path: Path, e: OSError) -> UserError:
    return UserError(f"cannot read corpus file {path}: {e.strerror or e}", "check its permissions")


def split_paragraph_docs(text: str, target_chars: int = 4000) -> list[str]:
    """Cut one long text (a book) into documents of whole paragraphs, about `target_chars` each."""
    docs, current, size = [], [], 0
    for para in text.split("\n\n"):
        para = " ".join(para.split())
        if not para:
            continue
        current.append(para)
        size += len(para)
        if size >= target_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        docs.append("\n\n".join(current))
    return docs


def _texts_from_file(path: Path, text_field: str, spell: Spelling) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return split_paragraph_docs(_decode(path, _read_bytes(path)))
    if suffix == ".jsonl":
        lines = enumerate(_decode(path, _read_bytes(path)).splitlines(), 1)
        return [_jsonl_text(path, n, line, text_field, spell) for n, line in lines if line.strip()]
    if suffix == ".parquet":
        with _parquet_file(path, text_field, spell) as file:
            column = _parquet(path, lambda _pq: file.read(columns=[text_field]).column(text_field))
        return [t for t in column.to_pylist() if isinstance(t, str)]
    raise unsupported(path)


def unsupported(path: Path) -> UserError:
    return UserError(f"unsupported corpus file type '{path.suffix}' for {path}", f"use one of {', '.join(TEXT_SUFFIXES)}")


def _field_fix(spell: Spelling) -> str:
    return f"name the field that holds the text with {spell('text_field')}"


def _jsonl_text(path: Path, n: int, line: str, text_field: str, spell: Spelling) -> str:
    """The text of line `n` (not blank) of a JSONL file."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{n} is not valid JSON ({e.msg})", "write one JSON object per line") from None
    if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
        raise UserError(f"{path}:{n} has no string field '{text_field}'", _field_fix(spell))
    return row[text_field]


def _parquet(path: Path, read):
    """`read(pyarrow.parquet)`, a corrupt or truncated file one line."""
    import pyarrow.parquet as pq

    try:
        return read(pq)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise UserError(f"{path} is not a readable parquet file ({e})", "check the file") from None


@contextmanager
def _parquet_file(path: Path, text_field: str, spell: Spelling):
    """A parquet file opened by its footer alone (nothing else is read yet), its schema checked."""
    _read_bytes(path, 0)  # same clear errors for missing/unreadable files
    with _parquet(path, lambda pq: pq.ParquetFile(path)) as file:
        _text_column(path, file.schema_arrow, text_field, spell)
        yield file


def _text_column(path: Path, schema, text_field: str, spell: Spelling) -> None:
    """The text column is in a parquet file's schema, as strings (dictionary-encoded or not)."""
    import pyarrow as pa

    if text_field not in schema.names:
        raise UserError(f"{path} has no column '{text_field}' (has {schema.names})", _field_fix(spell))
    kind = schema.field(text_field).type
    value = kind.value_type if pa.types.is_dictionary(kind) else kind
    if not (pa.types.is_string(value) or pa.types.is_large_string(value) or pa.types.is_string_view(value)):
        raise UserError(f"{path} column '{text_field}' holds {kind}, not text", _field_fix(spell))


def _texts_from_hf(spec: str, text_field: str, max_docs: int, spell: Spelling) -> list[str]:
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    try:
        import datasets
    except ImportError:
        raise UserError("Hugging Face corpora need the `datasets` package", "pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    except Exception as e:
        raise UserError(f"could not open dataset '{name}': {type(e).__name__}", "check the name and your network") from None
    out = []
    for row in ds:
        if text_field not in row:
            raise UserError(f"dataset '{name}' has no field '{text_field}'", _field_fix(spell))
        out.append(row[text_field])
        if len(out) >= max_docs:
            break
    return out


def load_documents(source: str, text_field: str = "text", max_docs: int = 1_000_000,
                   spell: Spelling = cli_flag) -> list[Document]:
    """Read a corpus source into documents, in file order. `spell`: how the caller's users name a
    parameter (the text field's, in the fix of an error about it)."""
    if source == defaults.CORPUS:
        texts = [d for t in defaults.corpus_texts() for d in split_paragraph_docs(t)]
    elif source.startswith("hf:"):
        texts = _texts_from_hf(source[3:], text_field, max_docs, spell)
    else:
        texts = [t for f in corpus_files(source, spell) for t in _texts_from_file(f, text_field, spell)]
    docs = [Document(i, t) for i, t in enumerate(texts) if t and t.strip()]
    if not docs:
        raise empty(source)
    return docs


def empty(source: str) -> UserError:
    return UserError(f"corpus '{source}' is empty", "give a corpus with some text in it")


def folder_files(path: Path) -> list[Path]:
    """The corpus files of a folder, at any depth, in the order they are read."""
    return sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES)


def corpus_files(source: str, spell: Spelling = cli_flag) -> list[Path]:
    """The files of a local corpus (a file, or a folder's corpus files)."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = folder_files(path)
        if not files:
            raise UserError(f"folder {path} has no {'/'.join(TEXT_SUFFIXES)} files", f"point {spell('corpus')} at text files")
        return files
    if path.exists():
        return [path]
    raise UserError(f"corpus file {path} does not exist", f"check the {spell('corpus')} path")


def check_head(source: str, text_field: str = "text", spell: Spelling = cli_flag) -> None:
    """What `load_documents` would refuse, found in milliseconds from the start of each file, with
    the same line: an empty folder or corpus, a file that cannot be read or is no UTF-8, a first
    JSONL row that is no JSON or lacks the text field, a parquet footer that cannot be read or whose
    schema lacks the text column. What lies further in a file is found by the reading itself."""
    if source == defaults.CORPUS or source.startswith("hf:"):
        return
    if not [f for f in corpus_files(source, spell) if _may_hold_text(f, text_field, spell)]:  # every file checked
        raise empty(source)


def _may_hold_text(path: Path, text_field: str, spell: Spelling) -> bool:
    """Whether a file may hold text (False: surely none), its head checked as it will be read."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        with _parquet_file(path, text_field, spell) as file:
            return file.metadata.num_rows > 0
    if suffix not in (".txt", ".jsonl"):
        raise unsupported(path)
    head, whole = _head(path)
    if suffix == ".txt":
        return bool(head.strip()) or not whole
    first = next(((n, line) for n, line in enumerate(head.splitlines(), 1) if line.strip()), None)
    if first is not None:
        _jsonl_text(path, *first, text_field, spell)
    return first is not None or not whole


def _head(path: Path) -> tuple[str, bool]:
    """The whole lines at the start of a file, decoded, read until one holds more than whitespace;
    and whether they are the whole file. A line ends with a newline byte, never inside a UTF-8
    character, so an error's offset is the whole file's."""
    head, end = bytearray(), 0  # end: where head's last whole line ends
    while True:
        data = _read_bytes(path, HEAD_BYTES, len(head))
        if b"\n" in data:
            end = len(head) + data.rindex(b"\n") + 1
        head += data
        lines = head[:end] if data else head
        if not data or lines.strip():
            return _decode(path, bytes(lines)), not data


def cut_windows(
    docs: list[Document],
    tokenize,
    window_len: int = 64,
    max_tokens: int | None = None,
    seed: int = 0,
) -> Iterator[tuple[int, int, list[int]]]:
    """Yield (window_id, doc_id, token_ids) in a seed-fixed document order, up to max_tokens.

    `tokenize(list[str]) -> list[list[int]]` is the subject tokenizer without special tokens.
    """
    order = np.random.default_rng(seed).permutation(len(docs))
    budget = max_tokens if max_tokens is not None else float("inf")
    window_id = 0
    batch = 256  # tokenise in batches: fast tokenizers parallelise within a call
    for start in range(0, len(order), batch):
        chunk = [docs[i] for i in order[start : start + batch]]
        for doc, ids in zip(chunk, tokenize([d.text for d in chunk])):
            for s in range(0, len(ids) - window_len + 1, window_len):
                if (window_id + 1) * window_len > budget:
                    return
                yield window_id, doc.doc_id, ids[s : s + window_len]
                window_id += 1


def shortfall(source: str, n_windows: int, window_len: int, max_tokens: int | None) -> str | None:
    """A notice when the corpus ran out before `max_tokens` (`cut_windows` stops short of the budget
    only then): a run asked for 20,000 tokens must not take 2,040 without a word. None otherwise."""
    held = n_windows * window_len
    if max_tokens is None or held + window_len > max_tokens:
        return None
    return (f"corpus {source} holds {held:,} tokens (in whole windows of {window_len}) of the {max_tokens:,} asked: "
            "using them all")
