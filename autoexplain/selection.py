"""Streaming exemplar selection for every unit of a layer at once.

The recording pass never holds the tokens x units matrix. Per layer it keeps, with memory that does
not grow with the corpus:
- `TopWindows`: for each unit, the k windows with the highest max activation, with their per-token
  activations (a running top-k over [kept; new batch]);
- `Reservoir`: the activations of a fixed, seeded uniform sample of windows shared by all units,
  from which random and quantile exemplars and the shape statistics are drawn at the end;
- `RunningStats`: exact per-unit mean, std, max and fraction active over every token.

Everything works on polarity-oriented activations: the caller passes `acts` for polarity +1 and
`-acts` for polarity -1.
"""

from __future__ import annotations

import numpy as np
import torch

from autoexplain.latents import SparseLatents


class TopWindows:
    """Per unit, the k windows ranked by their maximum activation.

    Values and window ids are kept sorted by rank; each rank's per-token activations sit in a
    payload slot (`slots`) that stays put while the ranks move, so a batch writes only the windows
    that enter some unit's top-k, into the slots of the ones they push out."""

    def __init__(self, k: int, window_len: int, n_units: int, dtype=torch.bfloat16):
        self.k = k
        self.values = torch.full((k, n_units), float("-inf"))
        self.window_ids = torch.full((k, n_units), -1, dtype=torch.int64)
        self.slots = torch.arange(k)[:, None].repeat(1, n_units)  # rank -> payload slot, per unit
        self.payload = torch.zeros((k, window_len, n_units), dtype=dtype)

    def update(self, window_ids: torch.Tensor, acts: torch.Tensor | SparseLatents, window_max: torch.Tensor,
               sign: int = 1, batch_rows: torch.Tensor | None = None) -> None:
        """acts: (B, T, U) raw activations, dense or as their non-zeros; window_max: (B, U) float32
        max of sign*acts over T. Only the units with a window above their current k-th are read.
        `batch_rows`: when these windows are some rows of the batch `acts` holds, which ones (the
        activations are read in place, not copied out for each subset)."""
        k = self.k
        threshold = self.values[-1]  # current k-th best per unit (values are kept sorted)
        cols = (window_max > threshold).any(dim=0).nonzero().squeeze(1)
        if cols.numel() == 0:
            return  # nothing in this batch enters any unit's top-k
        vals = torch.cat([self.values[:, cols], window_max[:, cols]])
        best, idx = vals.topk(k, dim=0)  # sorted, descending; idx >= k is a window of this batch
        ids = torch.cat([self.window_ids[:, cols], window_ids[:, None].expand(-1, len(cols))])
        from_old = idx < k
        old_slots = self.slots[:, cols]
        slots = old_slots.gather(0, torch.where(from_old, idx, 0))
        # Per column, the slots of the ranks that fell out and the ranks that came in are equally
        # many; listed column by column (nonzero's order), they pair up one to one.
        kept = torch.zeros((k + 1, len(cols)), dtype=torch.bool).scatter_(0, torch.where(from_old, idx, k),
                                                                        True)[:k]
        free_c, free_r = (~kept).T.nonzero().unbind(1)
        new_c, new_r = (~from_old).T.nonzero().unbind(1)
        freed = old_slots[free_r, free_c]
        slots[new_r, new_c] = freed
        units, rows = cols[new_c], idx[new_r, new_c] - k
        if batch_rows is not None:
            rows = batch_rows[rows]
        if isinstance(acts, SparseLatents):
            # Non-negative latents: a slot whose window's max was 0 (or that was never filled) is
            # all zeros already, and a window entering with max 0 writes nothing. So only the
            # slots that held a firing window are cleared, and only entries are written: while
            # rarely firing latents fill their top-k, most of a batch's windows enter, and writing
            # each one's every token was most of the recording's cost beyond the encoder.
            held = (vals[free_r, free_c] > 0).nonzero().squeeze(1)
            self.payload[freed[held], :, units[held]] = 0
            acts.write(self.payload, freed, rows, units)
        else:
            entering = acts[rows, :, units]  # (entries, T)
            self.payload[freed, :, units] = (entering if sign > 0 else -entering).to(self.payload.dtype)
        self.window_ids[:, cols] = ids.gather(0, idx)
        self.values[:, cols] = best
        self.slots[:, cols] = slots

    def ranked_payload(self, a: int = 0, b: int | None = None) -> torch.Tensor:
        """The payload of units a..b-1 in rank order: (k, T, b - a), row r holding each unit's r-th
        best window."""
        slots = self.slots[:, None, a:b]
        return self.payload[:, :, a:b].gather(0, slots.expand(-1, self.payload.shape[1], -1))


class Reservoir:
    """Activations of a fixed uniform sample of windows, chosen up front from a seed.

    Knowing the corpus size in advance (windows are tokenised before recording) makes the sample
    deterministic and the pass a simple membership test.
    """

    def __init__(self, sample_ids: np.ndarray, window_len: int, n_units: int, dtype=torch.bfloat16):
        self.ids = np.sort(np.asarray(sample_ids, dtype=np.int64))
        self.acts = torch.zeros((len(self.ids), window_len, n_units), dtype=dtype)
        self.filled = np.zeros(len(self.ids), dtype=bool)

    def update(self, window_ids: torch.Tensor, acts: torch.Tensor) -> None:
        wid = window_ids.numpy()
        slots = np.searchsorted(self.ids, wid)
        slots = np.minimum(slots, len(self.ids) - 1)
        hit = self.ids[slots] == wid if len(self.ids) else np.zeros(len(wid), bool)
        if hit.any():
            rows = torch.from_numpy(np.nonzero(hit)[0])
            self.acts[torch.from_numpy(slots[hit])] = acts[rows].to(self.acts.dtype)
            self.filled[slots[hit]] = True

    def chunk(self, a: int, b: int) -> torch.Tensor:
        """Units a..b-1 of every window: (windows, tokens, b - a), a view."""
        return self.acts[:, :, a:b]

    def window_max(self, a: int, b: int, sign: int = 1) -> torch.Tensor:
        """(windows, b - a) float32: each window's maximum of sign * activation, units a..b-1."""
        acts = self.chunk(a, b)
        return (acts.amax(dim=1) if sign > 0 else -acts.amin(dim=1)).float()

    def windows(self, slots: torch.Tensor, units: torch.Tensor, sign: int = 1) -> torch.Tensor:
        """(pairs, tokens) float32: sign * the activations of unit `units[e]` in window slot `slots[e]`."""
        return self.acts[slots, :, units].float() * sign

    def shape_stats(self, bins: int = 32, signs: tuple[int, ...] = (1,)) -> dict[int, dict[str, object]]:
        """`shape_stats_per_unit` of every unit's samples (each window and token of the sample)."""
        return shape_stats_per_unit(self.acts.reshape(-1, self.acts.shape[-1]), bins, signs=signs)


class SparseReservoir:
    """A `Reservoir` of activations that are mostly zero (a sparse coder's latents, non-negative):
    only the non-zero entries are kept, as (slot, token, unit) and a bf16 value. A 16,384-latent
    TopK SAE's 512 windows take a few megabytes instead of a gigabyte; `chunk` gives a dense view
    of some units when the end of the pass reads them."""

    def __init__(self, sample_ids: np.ndarray, window_len: int, n_units: int):
        self.ids = np.sort(np.asarray(sample_ids, dtype=np.int64))
        self.filled = np.zeros(len(self.ids), dtype=bool)
        self.window_len, self.n_units = window_len, n_units
        self._index: list[torch.Tensor] = []  # (n, 3) int32: slot, token, unit
        self._value: list[torch.Tensor] = []
        self._by_unit: tuple[torch.Tensor, ...] | None = None  # the entries by unit, once the pass has ended

    def update(self, window_ids: torch.Tensor, acts: SparseLatents) -> None:
        wid = window_ids.numpy()
        slots = np.minimum(np.searchsorted(self.ids, wid), max(len(self.ids) - 1, 0))
        hit = self.ids[slots] == wid if len(self.ids) else np.zeros(len(wid), bool)
        if not hit.any():
            return
        slot_of_row = torch.full((len(wid),), -1, dtype=torch.int64)
        slot_of_row[torch.from_numpy(np.nonzero(hit)[0])] = torch.from_numpy(slots[hit])
        slot = slot_of_row[acts.window]
        keep = (slot >= 0).nonzero().squeeze(1)
        self._index.append(torch.stack([slot[keep], acts.token[keep], acts.latent[keep]], 1).to(torch.int32))
        self._value.append(acts.value[keep].to(torch.bfloat16))
        self._by_unit = None
        self.filled[slots[hit]] = True

    def chunk(self, a: int, b: int) -> torch.Tensor:
        """Units a..b-1 of every window, dense: (windows, tokens, b - a) bf16."""
        dense = torch.zeros((len(self.ids), self.window_len, b - a), dtype=torch.bfloat16)
        if self._index:
            self._index, self._value = [torch.cat(self._index)], [torch.cat(self._value)]
            index, value = self._index[0], self._value[0]
            keep = (index[:, 2] >= a) & (index[:, 2] < b)
            i = index[keep].long()
            dense[i[:, 0], i[:, 1], i[:, 2] - a] = value[keep]
        return dense

    def window_max(self, a: int, b: int, sign: int = 1) -> torch.Tensor:
        """`Reservoir.window_max` from the entries of units a..b-1."""
        if sign < 0:  # no negative entries: 0 unless a unit fired at every token of a window
            return -self.chunk(a, b).amin(dim=1).float()
        slot, token, unit, value = self._units(a, b)
        out = torch.zeros(len(self.ids) * (b - a))
        return out.scatter_reduce_(0, slot * (b - a) + unit - a, value, "amax").view(len(self.ids), b - a)

    def windows(self, slots: torch.Tensor, units: torch.Tensor, sign: int = 1) -> torch.Tensor:
        """`Reservoir.windows` from the entries of the units asked for (distinct pairs)."""
        out = torch.zeros((len(slots), self.window_len))
        if not len(slots):
            return out
        slot, token, unit, value = self._units(int(units.min()), int(units.max()) + 1)
        keys, order = (slots * self.n_units + units).sort()
        key = slot * self.n_units + unit
        at = torch.searchsorted(keys, key).clamp_(max=len(keys) - 1)
        i = (keys[at] == key).nonzero().squeeze(1)
        out[order[at[i]], token[i]] = value[i]
        return out * sign

    def _units(self, a: int, b: int) -> tuple[torch.Tensor, ...]:
        """(slot, token, unit, float32 value) of the entries of units a..b-1. The first call joins the
        batches' entries and sorts them by unit, so that a range of units is a slice."""
        if self._by_unit is None:
            index = torch.cat(self._index) if self._index else torch.zeros((0, 3), dtype=torch.int32)
            value = torch.cat(self._value) if self._value else torch.zeros(0, dtype=torch.bfloat16)
            order = index[:, 2].argsort(stable=True)
            self._by_unit = (*(c.contiguous() for c in index[order].long().unbind(1)), value[order].float())
        slot, token, unit, value = self._by_unit
        lo, hi = torch.searchsorted(unit, torch.tensor([a, b]))
        return slot[lo:hi], token[lo:hi], unit[lo:hi], value[lo:hi]

    def shape_stats(self, bins: int = 32, signs: tuple[int, ...] = (1,)) -> dict[int, dict[str, object]]:
        """`Reservoir.shape_stats` from the entries (`_signed_shape_stats`)."""
        return {sign: self._signed_shape_stats(bins, sign) for sign in signs}

    def _signed_shape_stats(self, bins: int, sign: int) -> dict[str, object]:
        """`shape_stats_per_unit` of every unit's samples (each window and token of the sample),
        from the entries alone: a unit's samples are its entries plus as many zeros as it has
        positions without one, so nothing of windows x tokens x units is ever built. Histograms
        (edges and counts) are bit for bit the dense ones (the same float32 arithmetic per sample);
        skewness and kurtosis sum in float64 where the dense path sums in float32, so they agree
        to float32 rounding."""
        U, N = self.n_units, len(self.ids) * self.window_len
        _, _, unit, value = self._units(0, U)
        if sign < 0:
            value = -value
        n_entries = torch.bincount(unit, minlength=U)
        has_zero = n_entries < N
        lo = torch.full((U,), float("inf")).scatter_reduce_(0, unit, value, "amin")
        hi = torch.full((U,), float("-inf")).scatter_reduce_(0, unit, value, "amax")
        lo = torch.where(has_zero, torch.minimum(lo, torch.zeros(())), lo)
        hi = torch.where(has_zero, torch.maximum(hi, torch.zeros(())), hi)
        width = torch.where(hi > lo, hi - lo, torch.ones_like(hi))

        def bin_of(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:  # as `_shape_stats` bins
            return (x - lo[u]).div_(width[u]).mul_(bins).floor_().clamp_(0, bins - 1).long()

        counts = torch.bincount(unit * bins + bin_of(value, unit), minlength=U * bins)
        every = torch.arange(U)
        counts.index_add_(0, every * bins + bin_of(torch.zeros(U), every), N - n_entries)
        v = value.double()
        mean = torch.zeros(U, dtype=torch.float64).index_add_(0, unit, v) / N
        c = v - mean[unit]
        zeros, m0 = (N - n_entries).double(), -mean

        def moment(p: int) -> torch.Tensor:
            return (torch.zeros(U, dtype=torch.float64).index_add_(0, unit, c**p) + zeros * m0**p) / N

        m2, m3, m4 = moment(2), moment(3), moment(4)
        defined = m2 > 0
        safe = torch.where(defined, m2, torch.ones_like(m2))
        nan = torch.full_like(safe, float("nan"))
        edges = lo.double()[:, None] + width.double()[:, None] * torch.linspace(0, 1, bins + 1, dtype=torch.float64)[None, :]
        return {"skewness": torch.where(defined, m3 / safe**1.5, nan).numpy(),
                "kurtosis": torch.where(defined, m4 / safe**2 - 3.0, nan).numpy(),
                "hist_edges": list(edges.float().numpy()), "hist_counts": list(counts.view(U, bins).numpy())}


class RunningStats:
    """Exact per-unit moments and extremes of the raw (signed) activation over every token."""

    def __init__(self, n_units: int):
        self.n = 0
        self.sum = torch.zeros(n_units, dtype=torch.float64)
        self.sumsq = torch.zeros(n_units, dtype=torch.float64)
        self.n_pos = torch.zeros(n_units, dtype=torch.int64)
        self.n_neg = torch.zeros(n_units, dtype=torch.int64)
        self.max = torch.full((n_units,), float("-inf"))
        self.min = torch.full((n_units,), float("inf"))
        self._scratch: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, acts: torch.Tensor, window_max: torch.Tensor | None = None,
               window_min: torch.Tensor | None = None) -> None:
        """acts: (B, T, U); window_max/min: (B, U) per-window extremes, when the caller has them.

        The float32 work happens in two scratch buffers kept from batch to batch: batch-sized
        temporaries are fresh blocks from the C allocator, and with four of them per batch the
        forward pass faulted its own buffers back in (15k page faults per batch, about 5 % of it)."""
        x = acts.reshape(-1, acts.shape[-1])
        self.n += x.shape[0]
        if self._scratch is None or self._scratch[0].shape != x.shape:
            self._scratch = (torch.empty(x.shape), torch.empty(x.shape))
        xf, tmp = self._scratch
        xf.copy_(x)
        self.sum += xf.sum(0).double()
        self.sumsq += torch.mul(xf, xf, out=tmp).sum(0).double()
        # Counting signs through sums is several times faster than summing boolean masks; the
        # float sums are exact integers for any batch under 2**24 tokens.
        sign = torch.sign(xf, out=tmp)
        net = sign.sum(0)
        nonzero = sign.abs_().sum(0)
        self.n_pos += ((nonzero + net) / 2).round().long()
        self.n_neg += ((nonzero - net) / 2).round().long()
        hi = x.amax(0) if window_max is None else window_max.amax(0)
        lo = x.amin(0) if window_min is None else window_min.amin(0)
        self.max = torch.maximum(self.max, hi.float())
        self.min = torch.minimum(self.min, lo.float())

    def update_sparse(self, acts: SparseLatents, window_max: torch.Tensor) -> None:
        """`update` for a sparse coder's latents, from their non-zero entries: never negative, so no
        signs to count and no minimum below 0 to keep; only the latents that fired are touched.
        Sums accumulate in float64 (the dense path sums each batch in float32 first), so mean and
        std agree with it to float32 rounding, not bit for bit."""
        B, T, U = acts.shape
        self.n += B * T
        v = acts.value.double()
        self.sum.index_add_(0, acts.latent, v)
        self.sumsq.index_add_(0, acts.latent, v * v)
        self.n_pos += torch.bincount(acts.latent, minlength=U)
        self.max = torch.maximum(self.max, window_max.amax(0).float())
        self.min = torch.minimum(self.min, torch.zeros_like(self.min))

    def summary(self, polarity: int) -> dict[str, np.ndarray]:
        """Statistics of the polarity-oriented activation (negated for polarity -1)."""
        n = max(self.n, 1)
        mean = (self.sum / n).numpy()
        var = np.maximum((self.sumsq / n).numpy() - mean**2, 0.0)
        if polarity > 0:
            return {"mean": mean, "std": np.sqrt(var), "max": self.max.double().numpy(),
                    "frac_active": (self.n_pos.double() / n).numpy()}
        return {"mean": -mean, "std": np.sqrt(var), "max": (-self.min).double().numpy(),
                "frac_active": (self.n_neg.double() / n).numpy()}


def shape_stats_per_unit(samples: torch.Tensor, bins: int = 32, chunk: int = 256,
                         signs: tuple[int, ...] = (1,)) -> dict[int, dict[str, object]]:
    """Per sign, the skewness, excess kurtosis and a histogram per unit of samples (N, U) times it.

    Units are processed `chunk` at a time, in float32: a float64 copy of a 512-window reservoir
    would take gigabytes, and float64 passes over it were most of the end-of-pass time."""
    parts = [_shape_stats(samples[:, a : a + chunk], bins, signs) for a in range(0, samples.shape[1], chunk)]
    return {sign: {
        "skewness": np.concatenate([p[sign]["skewness"] for p in parts]),
        "kurtosis": np.concatenate([p[sign]["kurtosis"] for p in parts]),
        "hist_edges": [e for p in parts for e in p[sign]["hist_edges"]],
        "hist_counts": [c for p in parts for c in p[sign]["hist_counts"]],
    } for sign in signs}


def _shape_stats(samples: torch.Tensor, bins: int, signs: tuple[int, ...]) -> dict[int, dict[str, object]]:
    """Both signs from one float32 copy, bit for bit what each computes from its own negated copy:
    negation is exact and every rounding is symmetric in sign, so -x's minimum is -hi, its offset
    from it is (-x) - (-hi) == hi - x, its centred samples are -c, its odd moment is -m3 and its
    even moments are unchanged. Half the end-of-pass statistics time for a layer of neurons."""
    x = samples.float()  # a copy: the centring below works in place
    n_units = x.shape[1]
    lo, hi = x.amin(0), x.amax(0)
    width = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    offset = torch.arange(n_units, dtype=x.dtype) * bins
    counts, edges = {}, {}
    steps = torch.linspace(0, 1, bins + 1, dtype=torch.float64)[None, :]
    for sign in signs:
        # Bin of each sample, offset by its unit's row, so one bincount counts every unit's
        # histogram; the max lands in the last bin.
        idx = (x - lo) if sign > 0 else (hi - x)
        idx.div_(width).mul_(bins).floor_().clamp_(0, bins - 1).add_(offset)
        counts[sign] = torch.bincount(idx.view(-1).long(), minlength=n_units * bins).view(n_units, bins)
        start = lo if sign > 0 else -hi
        edges[sign] = start.double()[:, None] + width.double()[:, None] * steps
        del idx
    # Central moments from the centred samples (float32 sums are pairwise: accurate to ~1e-6 here).
    c = x.sub_(x.mean(0))
    c2 = c * c
    m2 = c2.mean(0)
    m3 = c2.mul(c).mean(0)
    m4 = c2.mul_(c2).mean(0)
    defined = m2 > 0
    safe = torch.where(defined, m2, torch.ones_like(m2)).double()
    nan = torch.full_like(safe, float("nan"))
    kurt = torch.where(defined, m4.double() / safe**2 - 3.0, nan)
    return {sign: {"skewness": torch.where(defined, (m3 * sign).double() / safe**1.5, nan).numpy(),
                   "kurtosis": kurt.numpy(), "hist_edges": list(edges[sign].float().numpy()),
                   "hist_counts": list(counts[sign].numpy())} for sign in signs}


def pick_random(reservoir_order: np.ndarray, exclude: set[int], n: int) -> list[int]:
    """The first n reservoir windows (in the seeded order shared by all units) not excluded."""
    out = []
    for wid in reservoir_order:
        if int(wid) not in exclude:
            out.append(int(wid))
            if len(out) == n:
                break
    return out


def quantile_edges(window_max: np.ndarray, bins: tuple[tuple[float, float], ...]) -> np.ndarray:
    """The quantiles of `window_max` (windows along axis 0; one unit, or a column per unit) at each
    bin's two bounds: (2 * len(bins), ...), `pick_quantiles`' edges."""
    return np.quantile(window_max, [q for pair in bins for q in pair], axis=0)


def pick_quantiles(
    window_ids: np.ndarray,
    window_max: np.ndarray,
    edges: np.ndarray,
    per_bin: int,
    exclude: set[int],
    rng: np.random.Generator,
) -> list[tuple[int, int]]:
    """Sample windows by the quantile of their max activation: [(bin index, window id), ...], bin by
    bin, between each bin's two `edges` (`quantile_edges`), keeping only windows where the unit fires
    (max > 0). `window_ids` hold no repeats; the windows kept are added to `exclude`."""
    taken = np.isin(window_ids, np.fromiter(exclude, dtype=np.int64, count=len(exclude)))
    out = []
    for b in range(len(edges) // 2):
        lo, hi = edges[2 * b], edges[2 * b + 1]
        # Adjacent bins share an edge; `taken` keeps a window from being taken twice.
        at = np.flatnonzero((window_max >= lo) & (window_max <= hi) & ~taken)
        if not len(at):
            continue
        take = at[np.sort(rng.choice(len(at), size=min(per_bin, len(at)), replace=False))]
        taken[take] = True
        # Drawn windows that never fire are dropped (an explainer is shown these as the unit at
        # work), after a draw over all the bin's windows: the layer's one generator then advances as
        # it always did, and every other unit's draws stay what they were.
        for w in window_ids[take[window_max[take] > 0]].tolist():
            out.append((b, w))
            exclude.add(w)
    return out
