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
of it.
"""

from __future__ import annotations

import base64
import math
import re
from pathlib import Path

import numpy as np
import polars as pl

from autoexplain import files
from autoexplain.storage import write_table
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


EXACT_UP_TO = 20_000  # units; above, neighbours are found in the explanations' principal axes first


def _top(c, k: int):
    """Each row's k largest values and their columns, best first, equal values in column order.
    Hundreds of units share one explanation: which of them a unit lists among its similar units
    must not depend on how topk happens to break ties, or every rebuild after any change would
    rewrite most unit files (`view_written`)."""
    import torch

    values, columns = torch.topk(c, min(k + 1, c.shape[1]), dim=1)
    cut = values[:, k - 1:k]
    # Rows whose k-th value recurs beyond the k: only there can topk's choice differ from ours.
    tied = torch.nonzero(values[:, k] == cut[:, 0]).flatten() if values.shape[1] > k else torch.zeros(0, dtype=torch.long)
    columns = columns[:, :k]
    for r in tied.tolist():  # keep the lowest columns among those at the cut
        row = c[r]
        above = torch.nonzero(row > cut[r]).flatten()
        at = torch.nonzero(row == cut[r]).flatten()[:k - len(above)]
        columns[r] = torch.cat([above, at])
    columns = torch.sort(columns, dim=1).values
    values = torch.gather(c, 1, columns)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    return torch.gather(values, 1, order), torch.gather(columns, 1, order)


def nearest(vectors: np.ndarray, k: int, block: int = 1024, axes: np.ndarray | None = None,
            shortlist: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """For each row, the k other rows of highest cosine (rows are unit vectors; a zero row, a unit
    without an explanation, is nobody's neighbour) and those cosines, best first; equal cosines in
    row order (`_top`).

    With `axes` (a d x m projection), each row's `shortlist` nearest are found in the projection and
    ranked by the full cosine: 92,160 x 92,160 full cosines are minutes of two cores, the
    projection a sixth of it. Blocks bound the memory; torch's topk picks in parallel."""
    import torch

    n = len(vectors)
    k = min(k, max(n - 1, 0))
    idx, sim = np.zeros((n, k), np.int64), np.zeros((n, k), np.float32)
    if k == 0:
        return idx, sim
    full = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    search = full if axes is None else torch.from_numpy(np.ascontiguousarray(vectors @ axes, dtype=np.float32))
    empty = torch.from_numpy(~vectors.any(axis=1))
    pick = k if axes is None else min(max(shortlist, k), n - 1)
    for s in range(0, n, block):
        rows = torch.arange(s, min(s + block, n))
        c = search[rows] @ search.T
        c[:, empty] = -torch.inf
        c[torch.arange(len(rows)), rows] = -torch.inf
        values, top = _top(c, pick)
        if axes is not None:  # rank the shortlist (in row order, from `_top`'s sort) by the full cosine
            top = torch.sort(top, dim=1).values
            exact = torch.einsum("rd,rkd->rk", full[rows], full[top])
            exact[torch.isinf(torch.gather(c, 1, top))] = -torch.inf
            values, at = _top(exact, k)
            top = torch.gather(top, 1, at)
        idx[s:s + len(rows)], sim[s:s + len(rows)] = top.numpy(), values.numpy()
    return idx, sim


def _int8(vectors: np.ndarray) -> bytes:
    norm = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = np.divide(vectors, norm, out=np.zeros_like(vectors), where=norm > 0)
    return np.clip(np.rint(unit * 127), -127, 127).astype(np.int8).tobytes()


def _computed(groups: list[tuple[str, list[str], list[str], list]], explainer, cache_dir: Path):
    """The search-by-meaning files ({path in the site: bytes}) and each unit's nearest units and
    their cosines (`nearest`), for the explanations of `groups` (see `write_meaning`)."""
    embed = _TextVectors(cache_dir, explainer)
    texts = [t for _, _, ts, _ in groups for t in ts]
    has = np.array([bool(t.strip()) for t in texts], dtype=bool)
    vectors = np.zeros((len(texts), 384), np.float32)
    if has.any():
        vectors[has] = embed([search_text(t) for t, h in zip(texts, has) if h])
    vocab, vocab_vectors = embed.vocabulary()
    own = sorted({w for t in texts for w in words_of(t)} - set(vocab))
    words = vocab + own
    word_vectors = np.concatenate([vocab_vectors, embed(own)]) if own else vocab_vectors
    embed.save()

    # The principal axes of the words (10,000 and more): they spread by meaning, where the axes of a
    # layer's explanations spread by how explainers phrase them.
    mean = word_vectors.mean(axis=0)
    _, _, vt = np.linalg.svd(word_vectors - mean, full_matrices=False)
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

    # Shortlists in the principal axes plus the mean's direction (which uncentred cosines also weigh).
    retrieval = np.linalg.qr(np.column_stack([mean, axes]))[0] if len(vectors) > EXACT_UP_TO else None
    idx, sim = nearest(vectors, N_SIMILAR, axes=retrieval)
    return out, idx, sim


def write_meaning(site_dir: Path, groups: list[tuple[str, list[str], list[str], list]], cache_dir: Path) -> dict[str, list]:
    """Write each source's explanation vectors and the word vectors; return each unit page's similar
    units, [[page, explanation, score, cosine], ...]. groups: (source, unit pages, explanations,
    headline scores), in the order of the source's index.

    All but the scores follows from the explanations alone, so it is kept in the cache area, keyed
    by them: a rebuild after re-simulating or re-scoring loads it (no model, no SVD, no search).
    One file per set of sources; the one of their earlier explanations is removed."""
    from autoexplain.explain_embedding import EmbeddingExplainer
    from autoexplain.identity import code_identity
    from autoexplain.storage import content_key

    explainer = EmbeddingExplainer()
    stem = f"meaning-{content_key(sorted(s for s, _, _, _ in groups), 8)}"
    key = content_key({"texts": [[s, ts] for s, _, ts, _ in groups], "embedder": explainer.embedder,
                       "code": code_identity("autoexplain.view_meaning")})
    path = Path(cache_dir) / f"{stem}-{key}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            out = {str(name): z[f"f{i}"].tobytes() for i, name in enumerate(z["paths"])}
            idx, sim = z["idx"], z["sim"]
    else:
        out, idx, sim = _computed(groups, explainer, cache_dir)
        for old in Path(cache_dir).glob(f"{stem}-*.npz"):
            old.unlink(missing_ok=True)
        with files.replacing(path, suffix=".npz") as tmp:
            np.savez(tmp, idx=idx, sim=sim, paths=np.array(list(out)),
                     **{f"f{i}": np.frombuffer(data, np.uint8) for i, data in enumerate(out.values())})
    for name, data in out.items():
        (site_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (site_dir / name).write_bytes(data)

    pages = [p for _, ps, _, _ in groups for p in ps]
    texts = [t for _, _, ts, _ in groups for t in ts]
    scores = [v for _, _, _, vs in groups for v in vs]
    return {pages[i]: [[pages[j], texts[j], None if scores[j] is None else round(float(scores[j]), 3),
                        round(float(c), 3)] for j, c in zip(idx[i].tolist(), sim[i].tolist()) if math.isfinite(c)]
            for i in range(len(pages)) if texts[i].strip()}
