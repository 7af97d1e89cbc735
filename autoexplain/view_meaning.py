"""Search by meaning for the viewer, precomputed when the site is built (a static site runs no model).

Every explanation is embedded with the packaged all-MiniLM-L6-v2. From those vectors:
- each unit's "similar units": the units whose explanations are nearest by cosine (full 384 dims;
  above EXACT_UP_TO units, among a shortlist found in the principal axes), on its unit page;
- the overview's search box: a query has no vector until someone types it, so the site carries
  vectors for words (MiniLM's own whole-word vocabulary, which the embedding explainer names units
  with, plus every word the explanations use), and the page embeds a query as the normalised mean
  of its words' vectors. Explanations and words are projected onto the words' first `DIMS`
  principal axes and stored as int8 (64 bytes an explanation), so a page can rank a whole model's
  explanations in the browser.

Explanations are embedded without the explainers' frames (`search_text`): 'the word "who"' as
'"who"', 'words related to gods and deity' as 'gods and deity'.

The vectors of texts are kept under the output root's cache area (`view.cache_root`), so that a
rebuild embeds only new explanations; so is what follows from a site's explanations alone (its
search files and its units' neighbours), so that a rebuild with the same explanations computes none
of it, and one after some explanations changed searches again only around them
(`neighbours.update`).
"""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import numpy as np
import polars as pl

from autoexplain import files
from autoexplain.tables import write_table
from autoexplain.view_data import js_bytes

DIMS = 64
N_SIMILAR = 8
_WORD = re.compile(r"[a-z][a-z0-9']+")


_FRAME = re.compile(r"\b(the words?|and other words related to|words related to|other)\b", re.I)


def search_text(explanation: str) -> str:
    """What an explanation is embedded as: without the explainers' frames ('the word ...', 'words
    related to ...'), which otherwise make every 'the word "X"' near every other one, whatever X is."""
    from autoexplain.surface import content_of

    stripped = content_of(_FRAME.sub(" ", explanation))
    return stripped if re.search(r"\w", stripped) else explanation


def words_of(text: str) -> list[str]:
    """The words a query or an explanation is made of (the page splits queries the same way)."""
    return _WORD.findall(text.lower())


class _TextVectors:
    """MiniLM vectors of texts, kept as float16 in one parquet file per output root."""

    def __init__(self, cache_dir: Path, explainer):
        self.explainer = explainer
        self.path = Path(cache_dir) / f"text-vectors-{self.explainer.embedder}.parquet"
        self.known: dict[str, np.ndarray] = {}
        if self.path.is_file():
            t = pl.read_parquet(self.path)
            flat = np.frombuffer(b"".join(t["vector"].to_list()), dtype=np.float16).reshape(t.height, -1)
            self.known = dict(zip(t["text"].to_list(), flat))
        self.changed = False

    def vocabulary(self) -> tuple[list[str], np.ndarray]:
        """The embedding explainer's naming vocabulary and its vectors (cached on the machine)."""
        self.explainer._setup()
        return list(self.explainer._vocab), np.asarray(self.explainer._vocab_vectors, dtype=np.float32)

    def __call__(self, texts: list[str]) -> np.ndarray:
        new = sorted({t for t in texts if t not in self.known})
        if new:
            # Fixed batches (`wordvecs.encode_fixed`) of the explainer's size, 256; it loads the
            # model, which a warm-up text would do at the cost of encode_each's batching probes.
            vectors = self.explainer._encode(new, fixed=True).astype(np.float16)
            self.known.update(zip(new, vectors))
            self.changed = True
        if not texts:
            return np.zeros((0, 384), np.float32)
        return np.stack([self.known[t] for t in texts]).astype(np.float32)

    def save(self) -> None:
        if self.changed:
            table = pl.DataFrame({"text": list(self.known), "vector": [v.tobytes() for v in self.known.values()]})
            write_table(table.to_arrow(), self.path)


EXACT_UP_TO = 20_000  # units; above, neighbours are found in the principal axes first (`neighbours`)


def _int8(vectors: np.ndarray) -> bytes:
    norm = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = np.divide(vectors, norm, out=np.zeros_like(vectors), where=norm > 0)
    return np.clip(np.rint(unit * 127), -127, 127).astype(np.int8).tobytes()


def _computed(groups: list[tuple[str, list[str], list[str], list]], pages: list[str], texts: list[str], explainer,
              cache_dir: Path, before: dict | None):
    """The search-by-meaning files ({path in the site: bytes}), each unit's nearest units and their
    cosines, and above EXACT_UP_TO units the search's `Shortlists` (kept for the next build), for the
    explanations of `groups` (see `write_meaning`; `pages` and `texts` are theirs, flattened in order).
    `before`: the previous build's texts and shortlists, updated where its pages are these."""
    from autoexplain.neighbours import Shortlists, nearest, ranked, search, stale, update

    embed = _TextVectors(cache_dir, explainer)
    has = np.array([bool(t.strip()) for t in texts], dtype=bool)
    vectors = np.zeros((len(texts), 384), np.float32)
    if has.any():
        vectors[has] = embed([search_text(t) for t, h in zip(texts, has) if h])
    vocab, vocab_vectors = embed.vocabulary()
    own = sorted({w for t in texts for w in words_of(t)} - set(vocab))
    words = vocab + own
    word_vectors = np.concatenate([vocab_vectors, embed(own)]) if own else vocab_vectors
    embed.save()

    # The principal axes of the vocabulary's words (over 10,000): they spread by meaning, where the
    # axes of a layer's explanations spread by how explainers phrase them. Of the vocabulary alone,
    # not of the explanations' own words too, so that they do not move when an explanation changes
    # and a rebuild can update the last build's search.
    mean = vocab_vectors.mean(axis=0)
    _, _, vt = np.linalg.svd(vocab_vectors - mean, full_matrices=False)
    axes = vt[:DIMS].T
    out, start = {}, 0
    for source, ps, _, _ in groups:
        part = vectors[start:start + len(ps)]
        projected = np.where(has[start:start + len(ps), None], (part - mean) @ axes, 0.0)
        out[f"data/{source}/meaning.js"] = js_bytes(f"{source}/meaning", {
            "dims": DIMS, "v": base64.b64encode(_int8(projected)).decode("ascii")})
        start += len(ps)
    out["data/words.js"] = js_bytes("words", {
        "dims": DIMS, "words": words, "v": base64.b64encode(_int8((word_vectors - mean) @ axes)).decode("ascii")})

    if len(vectors) <= EXACT_UP_TO:
        return (out, *nearest(vectors, N_SIMILAR), None)
    # Shortlists in the principal axes plus the mean's direction (which uncentred cosines also weigh).
    retrieval = np.linalg.qr(np.column_stack([mean, axes]))[0]
    if before is None or before["pages"] != pages:
        kept = search(vectors, retrieval)
        return (out, *ranked(vectors, kept, N_SIMILAR), kept)
    changed = np.array(before["texts"], dtype=object) != np.array(texts, dtype=object)
    old = Shortlists(before["values"], before["columns"], before["known"])
    kept = update(old, vectors, retrieval, changed)
    redo = np.flatnonzero(stale(old, kept, changed))
    idx, sim = before["idx"].copy(), before["sim"].copy()
    idx[redo], sim[redo] = ranked(vectors, kept, N_SIMILAR, rows=redo)
    return out, idx, sim, kept


def _previous(stem: Path, basis: str) -> dict | None:
    """The pages, texts, shortlists and neighbours of the last build of these sources, if made the
    same way."""
    for old in stem.parent.glob(f"{stem.name}-*.npz"):
        try:
            with np.load(old, allow_pickle=False) as z:
                if "basis" in z.files and str(z["basis"]) == basis:
                    pages, texts = json.loads(z["units"].tobytes())
                    return {"pages": pages, "texts": texts, "values": z["values"], "columns": z["columns"].astype(np.int64),
                            "known": z["known"].astype(np.int64), "idx": z["idx"].astype(np.int64), "sim": z["sim"]}
        except (OSError, ValueError, KeyError):
            pass  # unreadable: searched from scratch
    return None


def write_meaning(site_dir: Path, groups: list[tuple[str, list[str], list[str], list]], cache_dir: Path) -> dict[str, list]:
    """Write each source's explanation vectors and the word vectors; return each unit page's similar
    units, [[page, explanation, score, cosine], ...]. groups: (source, unit pages, explanations,
    headline scores), in the order of the source's index.

    All but the scores follows from the explanations alone, so it is kept in the cache area, keyed
    by them: a rebuild after re-simulating or re-scoring loads it (no model, no SVD, no search).
    One file per set of sources; the one of their earlier explanations is removed, after its
    search was updated to the new explanations (`neighbours.update`)."""
    from autoexplain.explain_embedding import EmbeddingExplainer
    from autoexplain.identity import code_identity
    from autoexplain.storage import content_key

    explainer = EmbeddingExplainer()
    pages = [p for _, ps, _, _ in groups for p in ps]
    texts = [t for _, _, ts, _ in groups for t in ts]
    stem = Path(cache_dir) / f"meaning-{content_key(sorted(s for s, _, _, _ in groups), 8)}"
    basis = content_key({"embedder": explainer.embedder, "code": code_identity("autoexplain.view_meaning")})
    path = stem.parent / f"{stem.name}-{content_key({'texts': [[s, ts] for s, _, ts, _ in groups], 'basis': basis})}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            out = {str(name): z[f"f{i}"].tobytes() for i, name in enumerate(z["paths"])}
            idx, sim = z["idx"], z["sim"]
    else:
        out, idx, sim, kept = _computed(groups, pages, texts, explainer, cache_dir, _previous(stem, basis))
        # int32 rows and the texts as one JSON string: a whole model's file is half the size
        search = {} if kept is None else {"basis": np.array(basis), "values": kept.values, "known": kept.known.astype(np.int32),
                                          "columns": kept.columns.astype(np.int32),
                                          "units": np.frombuffer(json.dumps([pages, texts]).encode(), np.uint8)}
        for old in stem.parent.glob(f"{stem.name}-*.npz"):
            old.unlink(missing_ok=True)
        with files.replacing(path, suffix=".npz") as tmp:
            np.savez(tmp, idx=idx.astype(np.int32), sim=sim, paths=np.array(list(out)), **search,
                     **{f"f{i}": np.frombuffer(data, np.uint8) for i, data in enumerate(out.values())})
    for name, data in out.items():
        (site_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (site_dir / name).write_bytes(data)

    scores = [v for _, _, _, vs in groups for v in vs]
    return {pages[i]: [[pages[j], texts[j], None if scores[j] is None else round(float(scores[j]), 3),
                        round(float(c), 3)] for j, c in zip(idx[i].tolist(), sim[i].tolist()) if math.isfinite(c)]
            for i in range(len(pages)) if texts[i].strip()}
