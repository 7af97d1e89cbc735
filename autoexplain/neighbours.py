"""Each unit's nearest units by the cosine of their explanations' vectors (the viewer's "similar
units"), and the same search redone after a few explanations changed.

Rows are unit vectors; a zero row (a unit without an explanation) is nobody's neighbour. Order is
(cosine descending, row ascending) everywhere: hundreds of units share one explanation, and which of
them a unit lists must not depend on how `topk` breaks ties, or every rebuild would rewrite most
unit files (`view_written`).

Above a few tens of thousands of rows, the full cosines of every pair are minutes of two cores. Each
row's `SHORTLIST` nearest are then found in a projection (`axes`) and ranked by the full cosine. The
projected search keeps each row's best `KEPT` (`Shortlists`), so that a rebuild after some rows
changed compares every row with the changed rows only (`update`): a row whose kept candidates lost
so many to the change that fewer than `SHORTLIST` are known to be its best is searched again in full.
The result is the one a search from scratch gives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHORTLIST = 64
KEPT = 96


@dataclass
class Shortlists:
    """Each row's best `KEPT` rows in the projection, best first, and how many of them (`known`)
    are certainly its best: candidates after those may have been passed by rows not kept."""
    values: np.ndarray  # (n, KEPT) float32, projected cosines; -inf for an empty row or itself
    columns: np.ndarray  # (n, KEPT) int64
    known: np.ndarray  # (n,) int64
    searched: int = 0  # rows searched in full to get here


def ranked_top(c, k: int):
    """Each row's k largest values and their columns, best first, equal values in column order."""
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
    return _ordered(torch.gather(c, 1, columns), columns)


def _ordered(values, columns, *more):
    """Each row's entries in (value descending, column ascending) order; `more`: other (rows x m)
    tensors, reordered alike."""
    import torch

    by_column = torch.sort(columns, dim=1, stable=True).indices
    order = torch.gather(by_column, 1, torch.sort(torch.gather(values, 1, by_column), dim=1, descending=True,
                                                  stable=True).indices)
    return tuple(torch.gather(x, 1, order) for x in (values, columns, *more))


def nearest(vectors: np.ndarray, k: int, block: int = 1024, axes: np.ndarray | None = None,
            shortlist: int = SHORTLIST) -> tuple[np.ndarray, np.ndarray]:
    """For each row, the k other rows of highest cosine and those cosines, best first. With `axes`
    (a d x m projection), among each row's `shortlist` nearest in the projection."""
    if axes is None:  # each row's k best by the full cosine
        exact = search(vectors, None, k, block)
        return exact.columns, exact.values
    shortlist = max(shortlist, k)
    return ranked(vectors, search(vectors, axes, shortlist, block), k, shortlist, block)


def search(vectors: np.ndarray, axes: np.ndarray | None, keep: int = KEPT, block: int = 1024,
           rows: np.ndarray | None = None) -> Shortlists:
    """Each row's (or each of `rows`') best `keep` rows in the projection (without `axes`, by the
    full cosine), all of them known."""
    import torch

    projected, empty = _projected(vectors, axes)
    rows = np.arange(len(vectors)) if rows is None else rows
    keep = min(keep, max(len(vectors) - 1, 0))
    values, columns = np.zeros((len(rows), keep), np.float32), np.zeros((len(rows), keep), np.int64)
    for s in range(0, len(rows) if keep else 0, block):
        at = torch.from_numpy(rows[s:s + block])
        c = _cosines(projected, empty, at, torch.arange(len(vectors)))
        values[s:s + len(at)], columns[s:s + len(at)] = (x.numpy() for x in ranked_top(c, keep))
    return Shortlists(values, columns, np.full(len(rows), keep, np.int64), len(rows))


def update(kept: Shortlists, vectors: np.ndarray, axes: np.ndarray, changed: np.ndarray,
           shortlist: int = SHORTLIST, block: int = 4096) -> Shortlists:
    """`kept` (of the same rows, same axes) after the rows `changed` (a boolean mask) took the
    vectors they have in `vectors`: the first `shortlist` of each row are those of `search` of
    `vectors` from scratch, at the cost of comparing every row with the changed ones."""
    import torch

    n, keep = kept.columns.shape
    moved = np.flatnonzero(changed)
    if not len(moved):
        return Shortlists(kept.values, kept.columns, kept.known)
    if len(moved) > n // 4:  # comparing every row with them costs most of a search
        return search(vectors, axes, keep)
    block = max(64, min(block, (1 << 24) // len(moved)))  # a block's cosines within 64 MB
    projected, empty = _projected(vectors, axes)
    values, columns, known = kept.values.copy(), kept.columns.copy(), kept.known.copy()
    against = torch.from_numpy(moved)
    is_moved = torch.from_numpy(np.asarray(changed, bool))
    for s in range(0, n, block):
        at = torch.arange(s, min(s + block, n))
        old_v, old_c = torch.from_numpy(kept.values[s:s + block]), torch.from_numpy(kept.columns[s:s + block])
        held = torch.from_numpy(kept.known[s:s + block])
        valid = (torch.arange(keep)[None, :] < held[:, None]) & ~is_moved[old_c]
        last = (held - 1).clamp(min=0)[:, None]
        cut_v, cut_c = torch.gather(old_v, 1, last), torch.gather(old_c, 1, last)
        # the changed rows, as the rows they now are: their best `keep` for each row
        new_v, new_c = ranked_top(_cosines(projected, empty, at, against), min(keep, len(moved)))
        new_c = against[new_c]
        # A changed row that comes after the old cut may come after rows never kept: not known.
        sure = (new_v > cut_v) | ((new_v == cut_v) & (new_c < cut_c))
        v = torch.cat([torch.where(valid, old_v, -torch.inf), new_v], dim=1)
        c = torch.cat([torch.where(valid, old_c, n), new_c], dim=1)  # n: after every real row
        ok = torch.cat([valid, sure], dim=1)
        v, c, ok = _ordered(v, c, ok)  # the known ones come first: all rank before the old cut
        values[s:s + len(at)], columns[s:s + len(at)] = v[:, :keep].numpy(), c[:, :keep].numpy()
        known[s:s + len(at)] = np.where(held.numpy() > 0, np.minimum(ok.sum(dim=1).numpy(), keep), 0)
    redo = np.flatnonzero(np.asarray(changed, bool) | (known < min(shortlist, keep)))
    if len(redo):
        again = search(vectors, axes, keep, rows=redo)
        values[redo], columns[redo], known[redo] = again.values, again.columns, again.known
    return Shortlists(values, columns, known, len(redo))


def ranked(vectors: np.ndarray, kept: Shortlists, k: int, shortlist: int = SHORTLIST, block: int = 1024,
           rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's (or each of `rows`') k nearest by the full cosine among its first `shortlist` kept
    candidates. A row's answer depends on its own vector and its candidates' alone (`stale`)."""
    import torch

    n = len(vectors)
    rows = np.arange(n) if rows is None else rows
    k = min(k, max(n - 1, 0))
    idx, sim = np.zeros((len(rows), k), np.int64), np.zeros((len(rows), k), np.float32)
    if k == 0:
        return idx, sim
    full = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    for s in range(0, len(rows), block):
        at = rows[s:s + block]
        top = torch.from_numpy(kept.columns[at, :shortlist])
        projected = torch.from_numpy(kept.values[at, :shortlist])
        by_row = torch.sort(top, dim=1).indices  # candidates in row order, for ties in row order
        top, projected = torch.gather(top, 1, by_row), torch.gather(projected, 1, by_row)
        exact = torch.einsum("rd,rkd->rk", full[torch.from_numpy(at)], full[top])
        exact[torch.isinf(projected)] = -torch.inf
        values, pos = ranked_top(exact, k)
        idx[s:s + len(at)], sim[s:s + len(at)] = torch.gather(top, 1, pos).numpy(), values.numpy()
    return idx, sim


def stale(before: Shortlists, after: Shortlists, changed: np.ndarray, shortlist: int = SHORTLIST) -> np.ndarray:
    """The rows whose `ranked` answer may differ between two searches: those changed, those with
    another set of first `shortlist` candidates, and those with a changed row among them."""
    changed = np.asarray(changed, bool)
    old, new = np.sort(before.columns[:, :shortlist], axis=1), np.sort(after.columns[:, :shortlist], axis=1)
    return changed | (old != new).any(axis=1) | changed[new].any(axis=1)


def _projected(vectors: np.ndarray, axes: np.ndarray | None):
    import torch

    projected = vectors if axes is None else vectors @ axes
    return (torch.from_numpy(np.ascontiguousarray(projected, dtype=np.float32)),
            torch.from_numpy(~vectors.any(axis=1)))


def _cosines(projected, empty, rows, columns):
    """rows x columns cosines, -inf where the column is empty or the row itself."""
    import torch

    c = projected[rows] @ projected[columns].T
    c[:, empty[columns]] = -torch.inf
    where = torch.full((len(projected),), -1, dtype=torch.long)
    where[columns] = torch.arange(len(columns))
    own = where[rows]
    mine = torch.nonzero(own >= 0).flatten()
    c[mine, own[mine]] = -torch.inf
    return c
