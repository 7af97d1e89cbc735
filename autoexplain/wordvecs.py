"""The word table: one embedding per distinct whole word of a corpus, computed once.

The embedding simulator and explainer score whole words ("smitten", not " sm|it|ten"). Embedding
the words a shard needs while it simulates costs one MiniLM pass per new word in every shard, and
the same word would get slightly different vectors in different shards (a float32 embedding moves
in its last bits with the batch it is encoded in). Embedding every distinct word of the windows
output once, sorted and in fixed batches, removes both: the table is a content-addressed output
like any other stage's, and every shard reads the same vectors.

How a text's vector is computed decides its bits (measured on an Intel CPU with AMX, torch 2.13):
MiniLM's float32 vector of a text changes in its last bits with the other texts of its batch (the
padded length and the GEMM shapes: even texts of equal token length, batched without padding,
differ from the same texts embedded alone) and with the number of torch threads (MKL's sgemm on
`(1, 5, 384) x (384, 384)` differs between 1 and 2 threads). So every embedding here runs on one
torch thread, and in one of two ways (`encode_fixed`, `encode_each`):
- a list fixed by its identity (a corpus's sorted words, the background words, the prompt's
  descriptions, the naming vocabulary) in fixed batches of that list: the batches are the same
  wherever the list is embedded;
- any other text (explanations, words met outside a word table) as if alone: padded to the next
  multiple of PAD_TO tokens, its vector is a function of the text only. Embedded one by one, that
  costs a forward pass per text (about 60 % of a layer's work after recording, for the ~27k
  explanation texts of a layer). Rows padded to a multiple of 8 fill whole GEMM row tiles, and then
  (measured on the AMD EPYC kind, torch 2.13) a text's vector is the same bits alone, in a batch
  of any size and at any position of it: `encode_each` checks that once per process on probe texts
  (`_batch_safe`) and batches EACH_BATCH texts per pass when it holds (about 2-3x fewer seconds
  per text), one by one when it does not. Either way the bits are those of the text alone.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from autoexplain import files, layout
from autoexplain.store import Stage
from autoexplain.words import word_of_each_token

_loaded: dict[Path, tuple[list[str], np.ndarray]] = {}
_lock = threading.Lock()
# Texts this process embedded, per loaded model: a vector is a function of its text alone, and about
# a fifth of a whole model's explanation texts recur in other shards, whose simulators start empty.
_seen: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
SEEN_MAX = 200_000  # 1.5 KB a vector
_seen_lock = threading.Lock()


ENCODE_THREADS = 1  # torch threads while embedding: the bits of MKL's sgemm depend on the count


def encoding(embedder: str, batch_size: int, device: str = "cpu") -> str:
    """What a vector of a fixed list depends on besides the list: the model, how `encode_fixed` runs
    it, and the kernels (torch build, CPU instruction set). Change it with those calls."""
    import torch

    cpu = torch.backends.cpu.get_cpu_capability()
    return (f"{embedder}|batch={batch_size}|each=padded-to-{PAD_TO}|normalized|float32|threads={ENCODE_THREADS}|device={device}"
            f"|torch={torch.__version__}|cpu={cpu}")


@contextmanager
def pinned_threads(n: int = ENCODE_THREADS):
    """Run torch on `n` intra-op threads in this thread, then restore the caller's setting."""
    import torch

    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _normalised(model, texts: list[str], batch_size: int) -> np.ndarray:
    with pinned_threads():
        out = model.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                           show_progress_bar=False)
    return np.asarray(out, dtype=np.float32).reshape(len(texts), -1)


def encode_fixed(model, texts: list[str], batch_size: int) -> np.ndarray:
    """Vectors of a list whose content is its identity, in fixed batches of that list: the same list
    gives the same bits in any process. Only for lists that are always embedded whole."""
    return _normalised(model, list(texts), batch_size)


PAD_TO = 8  # a text's tokens are padded to a multiple of this (whole GEMM row tiles)
EACH_BATCH = 16  # texts per forward pass in `encode_each`, where batching keeps each text's bits
_WORDS = ["apple", "river", "green", "house", "music", "seven", "light", "stone"]
_PROBES = [f'the word "{w}"' for w in _WORDS] + [
    f'the words "{a}", "{b}" and "{c}", and other words related to {d}'
    for a, b, c, d in zip(_WORDS, _WORDS[1:], _WORDS[2:], _WORDS[3:])]
_safe: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> `_batch_safe`


def _features(model, text: str) -> dict:
    """A text's features as the model's own preprocessing makes them, alone (no padding)."""
    return model.preprocess([text])


def _width(features: dict) -> int:
    return -(-features["input_ids"].shape[1] // PAD_TO) * PAD_TO


def _forward(model, one: list[dict]) -> np.ndarray:
    """Vectors of texts (their `_features`) of one padded width, in one pass."""
    import torch

    batch, width = dict(one[0]), _width(one[0])
    pad = {"input_ids": model.tokenizer.pad_token_id or 0}
    for k, v in one[0].items():
        if isinstance(v, torch.Tensor):
            batch[k] = torch.cat([torch.nn.functional.pad(f[k], (0, width - f[k].shape[1]), value=pad.get(k, 0))
                                  for f in one])
    with pinned_threads(), torch.inference_mode():
        out = torch.nn.functional.normalize(model(batch)["sentence_embedding"], p=2, dim=1)
    return out.float().numpy().reshape(len(one), -1)


def _batch_safe(model) -> bool:
    """Whether, on this CPU and torch, a padded text's vector is the same bits in a batch of texts
    of its padded width (of any size, at any position) as alone; checked once per process."""
    if model not in _safe:
        probes = {t: _features(model, t) for t in _PROBES}
        alone = {t: _forward(model, [f])[0] for t, f in probes.items()}
        same = True
        for width in {_width(f) for f in probes.values()}:
            group = [t for t, f in probes.items() if _width(f) == width]
            for batch in (group, group[::-1], (group * EACH_BATCH)[:EACH_BATCH]):
                vectors = _forward(model, [probes[t] for t in batch])
                same &= all(np.array_equal(v, alone[t]) for t, v in zip(batch, vectors))
        _safe[model] = same
    return _safe[model]


def forget_texts() -> None:
    """Drop the texts this process embedded (`encode_each` embeds them anew): for tests that compare
    two ways of embedding the same texts."""
    with _seen_lock:
        _seen.clear()


def encode_each(model, texts: list[str], helper: tuple[str, str] | None = None) -> np.ndarray:
    """Each text embedded as if alone (padded to a multiple of PAD_TO tokens): a vector depends on
    its text only. Texts of one padded width share a pass where that keeps their bits; a text
    embedded before in this process is not embedded again. `helper`: (model path, device) of
    `model`, to share a long list with a helper process (`encode_helper`)."""
    from autoexplain import encode_helper

    texts = list(texts)
    if not texts:
        return np.zeros((0, 384), np.float32)
    with _seen_lock:
        seen = _seen.setdefault(model, {})
        known = {t: seen[t] for t in texts if t in seen}
    size = EACH_BATCH if _batch_safe(model) else 1
    features = {t: _features(model, t) for t in dict.fromkeys(texts) if t not in known}
    groups: dict[int, list[str]] = {}
    for t, f in features.items():
        groups.setdefault(_width(f), []).append(t)
    chunks = [group[s : s + size] for group in groups.values() for s in range(0, len(group), size)]
    vectors: dict[str, np.ndarray] = {}

    def store(chunk: list[str], rows: np.ndarray) -> None:
        vectors.update(zip(chunk, rows))

    def here(chunk: list[str]) -> None:
        store(chunk, _forward(model, [features[t] for t in chunk]))

    pool = encode_helper.pool(*helper) if helper and len(features) >= encode_helper.HELP_FROM else None
    if pool is None:
        for chunk in chunks:
            here(chunk)
    else:
        encode_helper.shared(chunks, here, store, pool, encode_in_helper)
    with _seen_lock:
        if len(seen) + len(vectors) > SEEN_MAX:
            seen.clear()  # generational, as the simulators' own tables
        seen.update(vectors)
    vectors.update(known)
    return np.stack([vectors[t] for t in texts]).astype(np.float32, copy=False)


def encode_in_helper(texts: list[str]) -> np.ndarray:
    """`encode_each` in the helper process, on its own copy of the embedder."""
    from autoexplain import encode_helper

    return encode_each(encode_helper.loaded(), texts)


def corpus_words(windows_path: str | Path) -> list[str]:
    """Every distinct whole word of the windows, sorted."""
    words: set[str] = set()
    for batch in pq.ParquetFile(windows_path).iter_batches(batch_size=4096, columns=["tokens"]):
        for tokens in batch.column("tokens").to_pylist():
            words.update(word_of_each_token(tokens))
    words.discard("")
    return sorted(words)


def word_table(windows_path: str | Path, windows_key: str, out: str | Path, encoder) -> tuple[list[str], np.ndarray]:
    """(words, vectors) for the windows output, built on first use. `encoder` has `encode_words`
    and `encoding` (the embedding model and how it is run, part of the key)."""
    stage = Stage.open(out, "word_vectors", {"windows": windows_key, "embedder": encoder.encoding}, word_table)
    path = stage.directory / layout.WORD_VECTORS
    with _lock:
        if path in _loaded:
            return _loaded[path]
        if not stage.done:
            words = corpus_words(windows_path)
            vectors = encoder.encode_words(words).astype(np.float32)
            flat = pa.array(vectors.reshape(-1))
            column = pa.ListArray.from_arrays(pa.array(np.arange(len(words) + 1, dtype=np.int32) * vectors.shape[1]), flat)
            stage.table(pa.table({"word": words, "vector": column}), layout.WORD_VECTORS, "word_vectors")
            stage.seal({"windows": windows_key}, {"embedder": encoder.embedder})
        table = pq.read_table(path)
        words = table.column("word").to_pylist()
        vectors = table.column("vector").combine_chunks().flatten().to_numpy().reshape(len(words), -1)
        _loaded[path] = (words, vectors)
        return _loaded[path]


def machine_cached(kind: str, identity: list[str], compute: Callable[[], np.ndarray]) -> np.ndarray:
    """Vectors that depend only on `identity` (the embedder, how it is run, the texts), kept in the
    machine's cache: fixed word lists such as a background or a naming vocabulary would otherwise
    be embedded again by every process that starts."""
    from autoexplain import defaults

    digest = hashlib.sha256("\n".join(identity).encode()).hexdigest()[:16]
    path = defaults.cache_root() / kind / f"{digest}.npy"
    if path.is_file():
        return np.load(path)
    vectors = compute()
    with files.replacing(path, ".npy") as tmp:
        np.save(tmp, vectors)
    return vectors
