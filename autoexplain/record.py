"""Record: one streaming pass of the corpus through the subject, keeping exemplars per unit.

Two stages, each with its own content-addressed folder:
- `build_windows`: corpus -> `windows/<key>/windows.parquet` (token ids and token strings);
- `record_sources`: windows -> per unit source, `records/<key>/layer_<L>.records.parquet` and
  `.stats.parquet`, every source and layer from one pass of the subject (`record_layers`: one source).

Every window is in its document's split (`splits`: documents are dealt to train/calib/valid/test),
so no document has windows in two splits and the documents an explainer reads (train) never score
its explanation. Per unit and polarity the records are the top windows where it fires, a quarter of
top-k from each split's documents, random windows (from calib/valid/test documents only) and
activation-quantile windows where it fires (each in its document's split).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from autoexplain import corpus as corpus_mod
from autoexplain import defaults, layout, selection, splits
from autoexplain.errors import UserError
from autoexplain.latents import SparseLatents
from autoexplain.records import QUANTILE_BINS, SPLITS
from autoexplain.output_side import OUTPUT_COLUMNS
from autoexplain.sources import MLP, UnitSource
from autoexplain.spelling import Spelling, cli_flag
from autoexplain.storage import content_key, is_complete, read_manifest
from autoexplain.store import Stage, stage_key
from autoexplain.schemas import load_schema
from autoexplain.subject import Subject
from autoexplain.weights import file_sha256

Progress = Callable[[int, int], None]  # (tokens done, tokens total)


@dataclass
class RecordConfig:
    layers: list[int]
    top_k: int = 40
    n_random: int = 30
    quantile_per_bin: int = 5
    reservoir: int = 512
    batch_size: int = 32
    seed: int = 0


@dataclass
class WindowsRef:
    path: Path
    key: str
    n_windows: int
    window_len: int
    notice: str | None = None  # one line for the user when the corpus ran out before the tokens asked


@dataclass
class RecordsRef:
    directory: Path
    key: str
    layers: list[int]
    n_windows: int
    stats: dict = field(default_factory=dict)

    def records_path(self, layer: int) -> Path:
        return layout.records_table(self.directory, layer)

    def stats_path(self, layer: int) -> Path:
        return layout.stats_table(self.directory, layer)


def corpus_identity(source: str) -> str:
    """What the corpus content depends on: file digests, or the embedded corpus version."""
    if source == defaults.CORPUS:
        return f"default:{defaults.CORPUS_VERSION}"
    path = Path(source).expanduser()
    if path.is_file():
        return f"file:{_corpus_digest(path)}"
    if path.is_dir():
        return "dir:" + content_key([_corpus_digest(p) for p in corpus_mod.folder_files(path)])
    return source  # hub dataset names: the name is all we know


def _corpus_digest(path: Path) -> str:
    try:
        return file_sha256(path)[:16]  # kept per file stat: a run's cache key asks for it too
    except OSError as e:
        raise corpus_mod.unreadable(path, e) from None


def build_windows(
    subject: Subject,
    source: str,
    out_root: str | Path,
    window_len: int = 64,
    max_tokens: int | None = None,
    seed: int = 0,
    text_field: str = "text",
    spell: Spelling = cli_flag,
) -> WindowsRef:
    """The corpus cut into windows (`corpus.cut_windows`), or the finished windows of the same corpus,
    tokenizer and parameters. `spell`: how the caller's users name a parameter, in an error's fix."""
    if window_len < 2:
        raise UserError(f"window length {window_len} is too short", "use --window-len 2 or more (64 is the reference)")
    params = {"window_len": window_len, "max_tokens": max_tokens, "seed": seed, "text_field": text_field}
    inputs = {"corpus": corpus_identity(source), "tokenizer": subject.fingerprint}
    stage = Stage.open(out_root, "windows", {"inputs": inputs, "params": params}, build_windows)
    key, path = stage.key, stage.directory / layout.WINDOWS
    if stage.done:
        n = read_manifest(stage.directory)["params"]["n_windows"]
        splits.check_documents(len(pq.read_table(path, columns=["doc_id"]).column(0).unique()))
        return WindowsRef(path, key, n, window_len, corpus_mod.shortfall(source, n, window_len, max_tokens))

    docs = corpus_mod.load_documents(source, text_field=text_field, spell=spell)
    vocab = np.array(subject.token_strings(range(len(subject.tokenizer))), dtype=object)
    n = 0
    with stage.writer(layout.WINDOWS, "windows") as writer:
        buf: list[tuple[int, int, list[int]]] = []

        def flush():
            ids = np.array([b[2] for b in buf], dtype=np.int32)
            writer.write({
                "window_id": [b[0] for b in buf],
                "doc_id": [b[1] for b in buf],
                "token_ids": list(ids),
                "tokens": [list(vocab[row]) for row in ids],
            })
            buf.clear()

        docs_seen = set()
        for item in corpus_mod.cut_windows(docs, subject.tokenize, window_len, max_tokens, seed):
            buf.append(item)
            docs_seen.add(item[1])
            n += 1
            if len(buf) == 4096:
                flush()
        if buf:
            flush()
        if n == 0:
            raise UserError(
                f"corpus '{source}' is shorter than one window of {window_len} tokens",
                "give more text, or a smaller --window-len",
            )
        splits.check_documents(len(docs_seen))  # before a pass or its progress bar, as the windows are cut
    stage.seal(inputs, {**params, "n_windows": n})
    return WindowsRef(path, key, n, window_len, corpus_mod.shortfall(source, n, window_len, max_tokens))


class _LayerRecorder:
    """The streaming state for one layer: top-k per polarity, reservoir and running stats."""

    def __init__(self, cfg: RecordConfig, window_len: int, n_units: int, reservoir_ids: np.ndarray,
                 window_split: np.ndarray, polarities: tuple[int, ...] = (1, -1), sparse: bool = False):
        self.window_split = window_split
        self.top = {p: splits.SplitTopWindows(cfg.top_k, window_len, n_units, window_split) for p in polarities}
        self.n_units, self.sparse = n_units, sparse
        kind = selection.SparseReservoir if sparse else selection.Reservoir
        self.reservoir = kind(reservoir_ids, window_len, n_units)
        self.stats = selection.RunningStats(n_units)

    def update(self, window_ids: torch.Tensor, acts: torch.Tensor | SparseLatents) -> None:
        if self.sparse:  # non-negative latents as their non-zeros: no minimum, no negative polarity
            hi = acts.window_max()
            self.stats.update_sparse(acts, hi)
            self.top[1].update(window_ids, acts, hi)
            self.reservoir.update(window_ids, acts)
            return
        hi = acts.amax(dim=1).float()
        lo = acts.amin(dim=1).float()
        self.stats.update(acts, hi, lo)
        self.top[1].update(window_ids, acts, hi)
        if -1 in self.top:
            self.top[-1].update(window_ids, acts, -lo, sign=-1)
        self.reservoir.update(window_ids, acts)


def windows_batches(ref: WindowsRef, batch_size: int):
    pf = pq.ParquetFile(ref.path)
    for batch in pf.iter_batches(batch_size=batch_size, columns=["window_id", "token_ids"]):
        ids = batch.column("token_ids").flatten().to_numpy().reshape(len(batch), ref.window_len)
        yield torch.from_numpy(batch.column("window_id").to_numpy().copy()), torch.from_numpy(ids.astype(np.int64))


def record_layers(
    subject: Subject,
    windows: WindowsRef,
    cfg: RecordConfig,
    out_root: str | Path,
    progress: Progress | None = None,
    source: UnitSource = MLP,
) -> RecordsRef:
    """One source's layers (`cfg.layers`): `record_sources` of one."""
    return record_sources(subject, windows, [(source, cfg)], out_root, progress)[0]


@dataclass
class _Pending:
    """A source's recording that is not sealed yet: its stage and its layers' streaming state."""

    source: UnitSource
    cfg: RecordConfig
    stage: Stage
    ref: RecordsRef
    recorders: dict
    reservoir_ids: np.ndarray
    inputs: dict  # what the key hashes besides the settings, as the manifest names them
    params: dict


def record_sources(
    subject: Subject,
    windows: WindowsRef,
    plans: list[tuple[UnitSource, RecordConfig]],
    out_root: str | Path,
    progress: Progress | None = None,
) -> list[RecordsRef]:
    """Each (source, its layers and settings) recorded to its own records folder, all from **one**
    streaming pass: each batch of windows goes through the subject once, the pass captures every
    point any source reads (`Subject.capture`), and each source's layers update from their own. A
    folder is the same bits as a pass of its source alone would write (a captured tensor does not
    depend on what else the pass captures), and so has the same key. Sealed ones are reused."""
    refs, pending = [], []
    for source, cfg in plans:
        ref, todo = _open(subject, windows, source, cfg, out_root)
        refs.append(ref)
        if todo is not None:
            pending.append(todo)
    if not pending:
        return refs
    if len({p.cfg.batch_size for p in pending}) > 1:
        raise ValueError("sources recorded in one pass share one batch size")

    points = sorted({point for p in pending for point in p.source.reads(p.ref.layers)})
    total, done = windows.n_windows * windows.window_len, 0
    for window_ids, input_ids in windows_batches(windows, pending[0].cfg.batch_size):
        captured = subject.capture(input_ids, points)
        for p in pending:
            read = p.source.sparse_from_captured if p.source.sparse else p.source.from_captured
            for L, acts in read(captured, p.ref.layers).items():
                p.recorders[L].update(window_ids, acts.cpu())
        done += input_ids.numel()
        if progress:
            progress(done, total)
    for p in pending:
        _seal(p, subject)
    return refs


def _open(subject: Subject, windows: WindowsRef, source: UnitSource, cfg: RecordConfig,
          out_root: str | Path) -> tuple[RecordsRef, _Pending | None]:
    """A source's records folder: (its reference, None) when it is sealed already (or a sealed
    recording of more layers covers it), else (its reference, the state its pass fills)."""
    subject.check_layers(cfg.layers)
    layers = sorted(set(cfg.layers))
    need = cfg.top_k + cfg.n_random
    if windows.n_windows < need:
        raise UserError(
            f"the corpus gives only {windows.n_windows} windows of {windows.window_len} tokens, "
            f"but {cfg.top_k} top + {cfg.n_random} random exemplars need at least {need}",
            "use a larger corpus or --tokens, or lower --top-k / --random",
        )
    source.reads(layers)  # a source that cannot read these layers says so before any pass
    params = {k: v for k, v in asdict(cfg).items() if k not in ("layers", "batch_size")}
    inputs = {"windows": windows.key, "subject": subject.fingerprint}

    def fields(of_layers: list[int]) -> dict:
        return {"inputs": inputs, "params": params, "layers": of_layers, "source": source.identity()}

    stage = Stage.open(out_root, "records", fields(layers), record_layers)
    ref = RecordsRef(stage.directory, stage.key, layers, windows.n_windows)
    if stage.done:
        return ref, None
    covering = _covering(stage.directory.parent, layers, lambda of: stage_key(fields(of), record_layers))
    if covering is not None:
        directory, theirs = covering
        return RecordsRef(directory, directory.name, theirs, windows.n_windows), None
    window_split = splits.window_splits(windows.path, windows.n_windows, cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    n_res = min(cfg.reservoir, windows.n_windows)
    reservoir_ids = rng.choice(windows.n_windows, size=n_res, replace=False)
    splits.check_random_room(window_split, reservoir_ids, cfg.top_k, cfg.n_random)
    recorders = {L: _LayerRecorder(cfg, windows.window_len, source.n_units(subject), reservoir_ids, window_split,
                                   source.polarities, source.sparse) for L in layers}
    return ref, _Pending(source, cfg, stage, ref, recorders, reservoir_ids, inputs, params)


def _seal(p: _Pending, subject: Subject) -> None:
    """Write a source's records and stats from its streaming state, and seal its folder."""
    for L in p.ref.layers:
        with p.stage.writer(p.ref.records_path(L).name, "records") as records:
            stats = _finish_layer(L, p.recorders[L], p.cfg, p.reservoir_ids, p.source.polarities, records.write_table)
        stats = _with_output_side(stats, subject, p.source, L)
        p.stage.table(stats, p.ref.stats_path(L).name, "unit_stats")
    # Readers take a source's kind from here ('mlp' where absent, as in every run before sources).
    source = p.source
    named = {} if source.kind == MLP.kind else {"source": source.kind, "source_spec": str(source.spec),
                                                 "source_id": content_key(source.identity())}
    p.stage.seal(p.inputs, {**p.params, "layers": p.ref.layers, **named})


def _covering(records_root: Path, layers: list[int], key_of: Callable[[list[int]], str]) -> tuple[Path, list[int]] | None:
    """A sealed recording of more layers that holds these ones, from the same windows, subject,
    settings, source and code: each layer's records depend on nothing but those (its own recorder
    in the shared pass), so the layer of an `explain-model` run is not recorded again for a later
    `explain-layer`, `revise` or `rescore` of it. Found by recomputing the key that a recording of
    the folder's layers would have: equal to the folder's name only when everything else is too."""
    for manifest in sorted(records_root.glob("*/manifest.json")):
        try:
            theirs = sorted(read_manifest(manifest.parent)["params"]["layers"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if set(layers) <= set(theirs) and key_of(theirs) == manifest.parent.name and is_complete(manifest.parent):
            return manifest.parent, theirs
    return None


def _finish_layer(layer: int, rec: _LayerRecorder, cfg: RecordConfig, reservoir_order: np.ndarray,
                  polarities: tuple[int, ...], write, chunk: int = 1024) -> pa.Table:
    """Turn one layer's streaming state into its records, handed to `write` a table per chunk of
    units, and its stats table (returned).

    The reservoir stays in bf16 throughout: a float32 copy of it (and a negated one per polarity)
    would be the largest allocation of the whole recording, so only the per-window maxima and one
    chunk of units' exemplar rows are ever widened (a 16k-latent SAE's records are half a
    gigabyte as float32)."""
    res = rec.reservoir
    slot_of = {int(w): i for i, w in enumerate(res.ids)}
    rng = np.random.default_rng([cfg.seed, layer])
    n_units = rec.n_units
    stats = []
    shapes = res.shape_stats(signs=polarities)
    randoms_of = splits.RandomPicker(reservoir_order, rec.window_split, cfg.n_random)
    split_names = np.array(SPLITS)
    for polarity in polarities:
        top = rec.top[polarity]
        top.rank()
        kept = torch.isfinite(top.values).numpy()  # (k, U); -inf marks an unfilled slot
        top_ids, top_vals, top_splits = top.window_ids.numpy(), top.values.numpy(), top.splits.numpy()
        # Top exemplars are windows where the unit fires (max > 0), filtered here, not per batch: the
        # pass keeps k windows per unit whatever their max, so a unit firing in fewer has non-firing
        # ones among them. Ranks are sorted, so its firing ones are its first ranks, each in its
        # document's split (none in train: it cannot be explained; none in test: not scored). A unit that never
        # fired this way (statistics: max <= 0, frac_active 0) is dead and gets no records.
        firing = kept & (top_vals > 0)
        fired = firing.any(axis=0)
        for a in range(0, n_units, chunk):
            res_max = res.window_max(a, min(a + chunk, n_units), polarity).numpy()  # (R, chunk), oriented
            top_acts = top.ranked_payload(a, a + chunk).float().permute(2, 0, 1).numpy()  # (chunk, k, T), oriented
            top_rows, extra_rows = _Rows(), _Rows()
            extra_slots, extra_units = [], []
            # Top rows, unit by unit in rank order.
            unit_of, rank = np.nonzero(firing[:, a : a + chunk].T)
            if not len(unit_of):
                continue
            top_rows.extend(unit_of + a, polarity, "top", split_names[top_splits[rank, unit_of + a]], rank, None,
                            top_ids[rank, unit_of + a], top_vals[rank, unit_of + a])
            top_acts_rows = top_acts[unit_of, rank]  # (rows, T)
            edges = selection.quantile_edges(res_max, QUANTILE_BINS)  # every unit of the chunk in one call
            for u in np.unique(unit_of + a).tolist():
                # Every window the pass kept stays out of its random and quantile draws, firing or
                # not, so those draws are the ones they always were: a unit with non-firing windows
                # among its k has every firing one among them, so the rest never fire either.
                exclude = {int(w) for w in top_ids[kept[:, u], u]}
                dealt = randoms_of(exclude)
                randoms = [w for _, w in dealt]
                exclude.update(randoms)
                quants = selection.pick_quantiles(res.ids, res_max[:, u - a], edges[:, u - a], cfg.quantile_per_bin,
                                                  exclude, rng)
                bins = [b for b, _ in quants]
                ranks = [i - bins.index(b) for i, b in enumerate(bins)]  # within its bin: bins come in order
                wids = randoms + [w for _, w in quants]
                slots = [slot_of[w] for w in wids]
                extra_rows.extend([u] * len(wids), polarity, ["random"] * len(randoms) + ["quantile"] * len(quants),
                                  [s for s, _ in dealt] + split_names[rec.window_split[wids[len(randoms):]]].tolist(),
                                  list(range(len(randoms))) + ranks, [None] * len(randoms) + bins, wids,
                                  res_max[slots, u - a])
                extra_slots += slots
                extra_units += [u] * len(wids)
            # Random and quantile rows come from the reservoir: gather their activations in one go.
            extra_acts = res.windows(torch.tensor(extra_slots, dtype=torch.int64),
                                     torch.tensor(extra_units, dtype=torch.int64), polarity).numpy()  # (rows, T)
            write(top_rows.table(layer, top_acts_rows))
            write(extra_rows.table(layer, extra_acts))
        stats.append(_stats_table(layer, polarity, rec.stats, shapes[polarity]))
    return pa.concat_tables(stats)


class _Rows:
    """Column buffers for record rows; activations are attached in the same order at the end."""

    NAMES = ("unit", "polarity", "kind", "split", "rank", "quantile_bin", "window_id", "max_activation")

    def __init__(self):
        self.cols: dict[str, list] = {k: [] for k in self.NAMES}

    def extend(self, *columns) -> None:
        """Many rows at once: each of `NAMES` as an array or a list, or one value for every row."""
        n = next(len(c) for c in columns if isinstance(c, (np.ndarray, list)))
        for name, column in zip(self.NAMES, columns):
            self.cols[name] += column.tolist() if isinstance(column, np.ndarray) else \
                column if isinstance(column, list) else [column] * n

    def table(self, layer: int, acts: np.ndarray) -> pa.Table:
        n, T = len(self.cols["unit"]), acts.shape[-1] if acts.ndim == 2 else 0
        assert acts.shape[0] == n, (acts.shape, n)
        flat = pa.array(acts.astype(np.float32).reshape(-1))
        activations = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * T), flat)
        return pa.table({"layer": pa.array(np.full(n, layer, dtype=np.int16)), **self.cols,
                         "activations": activations}).cast(load_schema("records"))


def _with_output_side(stats: pa.Table, subject: Subject, source: UnitSource, layer: int) -> pa.Table:
    """The stats rows (polarity by polarity, units in order, as `_finish_layer` makes them) with the
    tokens each unit promotes and suppresses (`output_side.output_columns`)."""
    from autoexplain.output_side import output_columns

    directions = source.directions(subject, layer)
    parts = output_columns(subject.model, directions, subject.token_strings, source.polarities)
    schema = load_schema("unit_stats")
    for name in OUTPUT_COLUMNS:
        stats = stats.append_column(schema.field(name), pa.array([v for part in parts for v in part[name]],
                                                                  schema.field(name).type))
    return stats


def _stats_table(layer: int, polarity: int, running: selection.RunningStats, shape: dict) -> pa.Table:
    """Exact moments from the full pass; shape statistics (`selection.shape_stats_per_unit`, every
    unit in order) from the reservoir's tokens."""
    exact = running.summary(polarity)
    n_units = len(exact["mean"])
    return pa.table({
        "layer": np.full(n_units, layer, dtype=np.int16),
        "unit": np.arange(n_units, dtype=np.int32),
        "polarity": np.full(n_units, polarity, dtype=np.int8),
        "n_tokens": np.full(n_units, running.n, dtype=np.int64),
        **exact,
        **shape,
    }).cast(pa.schema([f for f in load_schema("unit_stats") if f.name not in OUTPUT_COLUMNS]))
