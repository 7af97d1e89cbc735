"""Corpus: documents in, fixed-length token windows out.

Sources: the embedded default corpus, local `.txt` / `.jsonl` / `.parquet` files (or a folder of
them), and Hugging Face dataset names (`hf:NAME[:CONFIG][@SPLIT]`, needs network and `datasets`).
Windows are non-overlapping runs of `window_len` tokens cut from each document; a document's tail
shorter than a window is dropped, as are windows that would straddle two documents. Document
order is shuffled with the seed, so a seed fixes exactly which windows a run sees.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from autoexplain import defaults
from autoexplain.errors import UserError

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


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


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
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


def _texts_from_file(path: Path, text_field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return split_paragraph_docs(_decode(path, _read_bytes(path)))
    if suffix == ".jsonl":
        out = []
        for n, line in enumerate(_decode(path, _read_bytes(path)).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n} is not valid JSON ({e.msg})", "write one JSON object per line") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise UserError(f"{path}:{n} has no string field '{text_field}'", "pass --text-field NAME")
            out.append(row[text_field])
        return out
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        _read_bytes(path)  # same clear errors for missing/unreadable files
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise UserError(f"{path} is not a readable parquet file ({e})", "check the file") from None
        if text_field not in table.column_names:
            raise UserError(f"{path} has no column '{text_field}' (has {table.column_names})", "pass --text-field NAME")
        return [t for t in table.column(text_field).to_pylist() if isinstance(t, str)]
    raise UserError(f"unsupported corpus file type '{path.suffix}' for {path}", f"use one of {', '.join(TEXT_SUFFIXES)}")


def _texts_from_hf(spec: str, text_field: str, max_docs: int) -> list[str]:
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
            raise UserError(f"dataset '{name}' has no field '{text_field}'", "pass --text-field NAME")
        out.append(row[text_field])
        if len(out) >= max_docs:
            break
    return out


def load_documents(source: str, text_field: str = "text", max_docs: int = 1_000_000) -> list[Document]:
    """Read a corpus source into documents, in file order."""
    if source == defaults.CORPUS:
        texts = [d for t in defaults.corpus_texts() for d in split_paragraph_docs(t)]
    elif source.startswith("hf:"):
        texts = _texts_from_hf(source[3:], text_field, max_docs)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES)
            if not files:
                raise UserError(f"folder {path} has no {'/'.join(TEXT_SUFFIXES)} files", "point --corpus at text files")
        elif path.exists():
            files = [path]
        else:
            raise UserError(f"corpus file {path} does not exist", "check the --corpus path")
        texts = [t for f in files for t in _texts_from_file(f, text_field)]
    docs = [Document(i, t) for i, t in enumerate(texts) if t and t.strip()]
    if not docs:
        raise UserError(f"corpus '{source}' is empty", "give a corpus with some text in it")
    return docs


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
