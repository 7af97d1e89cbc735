"""Which split each window is in: its document's.

The paper explains a unit on some documents and simulates it on others. Dealing windows instead
would let two windows of one article, with its topic, names and style, fall in train and test, and
an explanation written from one be scored on the other. So documents are dealt: every window of a
document is in that document's split, for every unit and layer of a recording, and each split's
top windows are the strongest of its own documents.
"""

from __future__ import annotations

import heapq
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from autoexplain.errors import UserError
from autoexplain.latents import SparseLatents
from autoexplain.records import RANDOM_DEAL, SPLITS, TOP_DEAL
from autoexplain.selection import TopWindows, pick_random

_STREAM = 0xD0C5  # the dealing's own random stream, apart from the reservoir's and the quantile draws'


def document_splits(doc_ids: np.ndarray, seed: int) -> np.ndarray:
    """Each window's split, as an index into `SPLITS`, from its document (`doc_ids`, one per window).

    Documents are taken in a seed-fixed order and each goes to the split that holds the fewest
    windows so far (the first in `SPLITS` order on a tie), so the splits hold about equally many
    windows, as the stride-4 dealing of top windows expects, however long the documents are."""
    docs, of_window, sizes = np.unique(np.asarray(doc_ids, dtype=np.int64), return_inverse=True, return_counts=True)
    order = np.random.default_rng([seed, _STREAM]).permutation(len(docs))
    held = [(0, s) for s in range(len(SPLITS))]  # (windows so far, split): a heap, least first
    split_of_doc = np.empty(len(docs), dtype=np.int8)
    for d in order.tolist():
        n, s = heapq.heappop(held)
        split_of_doc[d] = s
        heapq.heappush(held, (n + int(sizes[d]), s))
    return split_of_doc[of_window]


def window_splits(windows: Path, n_windows: int, seed: int) -> np.ndarray:
    """`document_splits` of a windows table's windows (by window id)."""
    table = pq.read_table(windows, columns=["window_id", "doc_id"])
    doc_ids = np.empty(n_windows, dtype=np.int64)
    doc_ids[table.column("window_id").to_numpy()] = table.column("doc_id").to_numpy()
    return document_splits(doc_ids, seed)  # `build_windows` refused windows of too few documents


def check_documents(n_docs: int) -> None:
    """Refuse windows of too few documents to give every split one (the splits are of documents)."""
    if n_docs < len(SPLITS):
        raise UserError(f"the corpus gives windows from only {n_docs} document(s), and explanation and scoring read "
                        f"distinct documents: the {len(SPLITS)} splits need at least {len(SPLITS)}",
                        "give a corpus of more documents (a .txt file is cut into documents of about 4,000 characters)")


def quotas(n: int, order: tuple[str, ...]) -> dict[str, int]:
    """How many of `n` items dealt round and round into `order` each split gets."""
    return {s: n // len(order) + (i < n % len(order)) for i, s in enumerate(order)}


def _scoring(window_split: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Of `ids` (window ids, order kept), those in the splits random windows go to."""
    return ids[np.isin(window_split[ids], [SPLITS.index(s) for s in RANDOM_DEAL])]


def check_random_room(window_split: np.ndarray, reservoir_ids: np.ndarray, top_k: int, n_random: int) -> None:
    """Refuse, before the pass, a reservoir whose scoring-split windows could run short of a unit's
    random ones: random windows come from there, less the unit's top windows of those splits (at
    most their quotas of top_k), so a quarter of the reservoir (the train split's) is no use to them."""
    held = len(_scoring(window_split, np.asarray(reservoir_ids)))
    if held - sum(n for s, n in quotas(top_k, TOP_DEAL).items() if s in RANDOM_DEAL) < n_random:
        raise UserError(f"the reservoir sample holds {held} windows of calib/valid/test documents, too few for "
                        f"{n_random} random exemplars besides a unit's top windows there",
                        "pass more --tokens or a larger --reservoir, or fewer --random")


class RandomPicker:
    """A unit's random windows: `quotas(n, RANDOM_DEAL)` from each scoring split's reservoir windows,
    in the reservoir's seeded order, a split that runs short made up from the others (so a unit has
    n whenever `check_random_room` passed); as (split, window id) pairs dealt in turn."""

    def __init__(self, reservoir_order: np.ndarray, window_split: np.ndarray, n: int):
        self.window_split, self.n, self.quota = window_split, n, quotas(n, RANDOM_DEAL)
        self.pool = _scoring(window_split, np.asarray(reservoir_order))
        self.of_split = {s: self.pool[window_split[self.pool] == SPLITS.index(s)] for s in RANDOM_DEAL}

    def __call__(self, exclude: set[int]) -> list[tuple[str, int]]:
        picks = {s: pick_random(self.of_split[s], exclude, q) for s, q in self.quota.items()}
        short = self.n - sum(map(len, picks.values()))
        if short > 0:
            taken = exclude.union(*picks.values())
            for w in pick_random(self.pool, taken, short):
                picks[SPLITS[self.window_split[w]]].append(w)
        return interleave(picks, RANDOM_DEAL)


def interleave(picks: dict[str, list[int]], order: tuple[str, ...]) -> list[tuple[str, int]]:
    """Per-split picks as one list dealt in `order` round and round ((split, item), ...), so that
    ranks mix the splits as a stride dealing does; a split that ran out is skipped."""
    out, depth = [], max((len(v) for v in picks.values()), default=0)
    for r in range(depth):
        out += [(s, picks[s][r]) for s in order if r < len(picks.get(s, ()))]
    return out


class SplitTopWindows:
    """Per unit, the strongest windows of each split's documents (`quotas(k, TOP_DEAL)` of each, a
    `TopWindows` per split), read as one ranking: `values`, `window_ids` and `splits` (an index
    into `SPLITS`) are (k, units), strongest first, after `rank()`; unfilled places hold -inf."""

    def __init__(self, k: int, window_len: int, n_units: int, window_split: np.ndarray, dtype=torch.bfloat16):
        self.window_split = torch.from_numpy(np.asarray(window_split, dtype=np.int8))
        self.parts = [(SPLITS.index(s), TopWindows(n, window_len, n_units, dtype))
                      for s, n in quotas(k, TOP_DEAL).items() if n]

    def update(self, window_ids: torch.Tensor, acts: torch.Tensor | SparseLatents, window_max: torch.Tensor,
               sign: int = 1) -> None:
        """`TopWindows.update`, each window offered only to its own split's ranking."""
        split = self.window_split[window_ids]
        for s, top in self.parts:
            rows = (split == s).nonzero().squeeze(1)
            if len(rows) == len(window_ids):
                top.update(window_ids, acts, window_max, sign)
            elif len(rows):
                top.update(window_ids[rows], acts, window_max[rows], sign, batch_rows=rows)

    def rank(self) -> None:
        """Merge the splits' rankings into one, per unit by max activation (ties: `SPLITS` order)."""
        values = torch.cat([t.values for _, t in self.parts])
        self._order = values.argsort(dim=0, descending=True, stable=True)
        self.values = values.gather(0, self._order)
        self.window_ids = torch.cat([t.window_ids for _, t in self.parts]).gather(0, self._order)
        splits = torch.cat([torch.full(t.values.shape, s, dtype=torch.int8) for s, t in self.parts])
        self.splits = splits.gather(0, self._order)

    def ranked_payload(self, a: int = 0, b: int | None = None) -> torch.Tensor:
        """`TopWindows.ranked_payload` of the merged ranking (after `rank()`)."""
        payload = torch.cat([t.ranked_payload(a, b) for _, t in self.parts])
        order = self._order[:, None, a:b]
        return payload.gather(0, order.expand(-1, payload.shape[1], -1))
