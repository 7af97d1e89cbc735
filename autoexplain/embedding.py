"""The embedding simulator: the offline default, built on the embedded all-MiniLM-L6-v2.

A 135M LM cannot simulate a neuron from its explanation, but a sentence embedder can say how well
an explanation describes a token. Every subject token gets a z-score from three channels:

- lexical: cosine(explanation, the whole word the token belongs to), e.g. ' sm|it|ten' -> "smitten".
  The explanation is embedded without leading/trailing meta-words ("color words" -> "color") and
  pulled 30% toward the mean of its 5 nearest background words (query expansion). The cosine is a
  z-score against the explanation's cosines with a fixed background of 2,000 common English words
  (from MiniLM's own vocabulary), so every explanation is judged on one scale: a token scores by
  how unusually well the explanation fits it;
- orthographic: MiniLM is uncased and embeds "," or "7" poorly, so each token also has a surface
  class (digit, punctuation, capitalised, all caps, whitespace) with a description ("a number
  written in digits", ...) read from the simulator's prompt file, `prompts/embedding_simulator.json`. The explanation's z-score against a class's description counts only
  when that class is within `gates.ORTHO_MARGIN` of the explanation's best-matching description, competitor
  descriptions included ("numbers written out as words" is closer to "a number written out in
  words" than to "a number written in digits", so digits stay quiet);
- literal: a token whose word equals a word the explanation quotes ("the word 'God'") gets Z_HIGH;
  when the explanation is nothing but quoted words, the lexical channel is off for it.

- examples: the single words an explanation gives as examples ("metals such as gold, silver and
  iron", "family (father, mother, son)") get Z_HIGH like quoted words, and the rest of the
  category is left to the lexical channel;
- relation (`relations.py`): an explanation that says where the unit fires ("the word right after
  'son of'", "words inside quotation marks", "the second item of a list", "the object of 'took'",
  "the first word of a sentence") picks its tokens by that relation alone, at Z_HIGH, and nothing
  else; one that names a word length or suffix ("words ending in -eth") adds those words at Z_HIGH.
  Without it a context rule and its tokens anywhere score the same. `relations=False` turns both
  this channel and the examples off (the simulator as it was before the suite of `suite.py`).

The token's z is the maximum over channels, and its prediction is
`10 * clip((z - Z_LOW) / (Z_HIGH - Z_LOW), 0, 1)`: Z_LOW or fewer standard deviations above the
background mean gives 0, Z_HIGH or more gives 10, linear between. Whitespace tokens have no lexical
embedding and score 0 unless the explanation is about whitespace.

An optional context channel (`context_weight > 0`) mixes in cosine(explanation, the token with
`context` tokens either side). On the planted suite it adds nothing and costs one embedding per
token (about 4x the time), so it is off by default.

Nothing is embedded twice: each distinct word (or context) has one row in a table, and each
window's row ids are cached under its token tuple, so a second unit on the same windows embeds
nothing but its explanation. `simulate_many` scores every row the records use against all of its
explanations at once.

Determinism: a unit's predictions are the same bits whatever else is simulated with it, before it,
in which process and on how many threads. Texts are embedded as `wordvecs` describes (fixed lists
in fixed batches, any other text alone, on one torch thread), so a vector depends on its text only.
BLAS picks kernels, and so summation orders, by matrix shape and thread count (a unit alone is a
different shape from a unit in its shard), so no float product is left to it: every cosine and sum
goes through `autoexplain.exact`. An entry depends only on its own row and column.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from autoexplain.exact import cosines, fixed_mean_std, fixed_sum, quantise, quantised_cosines
from autoexplain.gates import PROMPT_FILE, background_stats, gates, load_prompt
from autoexplain.relations import marks as relation_marks, parse as parse_relation
from autoexplain.simulate import Simulation, Simulator
from autoexplain.surface import content_of, literal_hits, literal_only, named_examples, quoted_literals, window_surface

Z_LOW, Z_HIGH = 1.5, 6.0
N_BACKGROUND = 2000
MAX_TEXTS = 200_000  # cached word/context embeddings (1.5 KB each) before the tables are reset


# The corpus word table a fresh twin last put on its grid (words, vectors, rows, grid, norm, pinned): each
# shard's twin takes it (rounding 50k vectors cost ~1 s a shard); read-only, copied before rows are added.
_TABLE: list[tuple] = []


@dataclass
class _Window:
    tokens: tuple[str, ...]  # the cache key itself
    literal_keys: tuple[np.ndarray, np.ndarray]  # literal_keys() as string arrays
    words: np.ndarray  # (T,) row of each token's whole word in the simulator's table, -1 if blank
    contexts: np.ndarray | None  # (T,) rows of local contexts, when the context channel is on
    ortho: np.ndarray  # (T,) index into ORTHO_CLASSES, -1 for none


@dataclass
class _Explanations:
    E: np.ndarray  # (D, U) content embeddings
    mu: np.ndarray  # (U,) background mean
    sd: np.ndarray  # (U,) background sd
    z_ortho: np.ndarray  # (classes + 1, U), gated; last row (no class) is -inf
    literals: list[tuple[set[str], bool]]
    relations: list  # relations.Relation or None per explanation


class EmbeddingSimulator(Simulator):
    """Predicts activations from explanation-token similarity; see the module docstring."""

    kind, prompt_files = "embedding", (PROMPT_FILE,)
    uses_word_table = uses_text_vectors = True

    def __init__(
        self,
        model_path=None,
        z_low: float = Z_LOW,
        z_high: float = Z_HIGH,
        expand: int = 5,
        expand_weight: float = 0.3,
        context_weight: float = 0.0,
        context: int = 1,
        relations: bool = True,
        max_windows: int = 20_000,
        batch_size: int = 256,
        device: str = "cpu",
    ):
        from autoexplain import defaults

        self.model_path = str(model_path or defaults.embedder_path())
        self.embedder = "all-MiniLM-L6-v2" if model_path is None else self.model_path
        self.name = f"embedding:{self.embedder}"
        settings = {"z": (z_low, z_high), "expand": (expand, expand_weight), "context": (context_weight, context)}
        if settings != {"z": (Z_LOW, Z_HIGH), "expand": (5, 0.3), "context": (0.0, 1)}:
            self.name += ":" + ",".join(f"{k}={v[0]}/{v[1]}" for k, v in settings.items())
        if not relations:
            self.name += ":relations=off"
        self.relations = relations
        self.z_low, self.z_high = z_low, z_high
        self.expand, self.expand_weight = expand, expand_weight
        self.context_weight, self.context = context_weight, context
        self.max_windows, self.batch_size, self.device = max_windows, batch_size, device
        self._model = None
        self._background: np.ndarray | None = None
        self._descriptions: np.ndarray | None = None
        self._prompt = load_prompt()
        self._explained: dict[str, np.ndarray] = {}  # explanation text -> embedding
        self._scaled: dict[str, tuple] = {}  # explanation -> its column of _Explanations
        self._stats: dict[str, tuple[float, float]] = {}  # explanation -> its background mean, sd (`_gates`)
        self._clear_tables()
        self.encode_calls = 0  # model.encode invocations
        self.encoded_texts = 0  # texts sent to the model
        self.window_hits = self.window_misses = 0

    @property
    def prompt_hash(self) -> str:
        """The hash of the prompt file this simulator read (its descriptions), stored with its output."""
        return hashlib.sha256(json.dumps(self._prompt).encode()).hexdigest()[:16]

    def fresh(self) -> "EmbeddingSimulator":
        """A twin with these settings, this loaded model and background, and empty caches.

        The caches hold values that are functions of their texts alone (see the module docstring),
        so a twin gives the bits the shared simulator would; it bounds memory per shard."""
        self._setup()
        twin = copy.copy(self)
        twin._explained, twin._scaled, twin._stats = {}, {}, {}
        twin._clear_tables()
        twin.encode_calls = twin.encoded_texts = twin.window_hits = twin.window_misses = 0
        return twin

    @property
    def encoding(self) -> str:
        from autoexplain.wordvecs import encoding

        return encoding(self.embedder, self.batch_size, self.device)

    def encode_words(self, words: Sequence[str]) -> np.ndarray:
        """Embed a whole word list (a corpus's sorted words) in fixed batches of that list: the same
        list gives the same vectors in any process."""
        return self._encode(list(words), fixed=True) if len(words) else np.zeros((0, 384), np.float32)

    def add_words(self, words: Sequence[str], vectors: np.ndarray) -> None:
        """Take precomputed word embeddings (a corpus's word table), so `prepare` embeds none of them.
        A word embedded on its own before keeps its row but takes the table's vector: what a word
        scores never depends on whether it was met before the table came."""
        fresh = not self._rows and self._grid_norm == 0.0  # nothing on the grid yet: a twin's first table
        if fresh and _TABLE and _TABLE[0][0] is words and _TABLE[0][1] is vectors:
            rows, self._grid, self._grid_norm, self._pinned = _TABLE[0][2:]
            self._rows = dict(rows)
            return
        given, vectors = vectors, np.asarray(vectors, dtype=np.float32)
        known = [(self._rows[w], i) for i, w in enumerate(words) if w and w in self._rows]
        if known:
            self._write_rows(np.array([r for r, _ in known]), vectors[[i for _, i in known]])
            self._pinned = max(self._pinned, max(r for r, _ in known) + 1)
        new = [i for i, w in enumerate(words) if w and w not in self._rows]
        if not new:
            return
        base = len(self._rows)
        self._write_rows(np.arange(base, base + len(new)), vectors[new])
        self._rows.update((words[i], base + j) for j, i in enumerate(new))
        self._pinned = max(self._pinned, len(self._rows))
        if fresh:
            grid = self._grid[: base + len(new)].copy()
            grid.flags.writeable = False
            _TABLE[:] = [(words, given, dict(self._rows), grid, self._grid_norm, self._pinned)]

    def warm(self, explanations: Sequence[str]) -> dict:
        """Embed these explanations now, in one batch, so later calls find them cached. Returns
        every text embedded for them (content and full forms) with its vector, and each
        explanation's background mean and sd, for `add_texts`."""
        ordered = sorted(set(explanations))
        self.explanations(ordered)
        forms = list(dict.fromkeys([content_of(e) for e in ordered] + ordered))
        return {"forms": forms, "vectors": np.stack([self._explained[t] for t in forms]) if forms else np.zeros((0, 384), np.float32),
                "stated": ordered, "stats": np.array([self._stats[t] for t in ordered]).reshape(-1, 2), "background": self._digest}

    def add_texts(self, forms, vectors: np.ndarray, stated=(), stats=None, background="") -> bool:
        """Take what `warm` returned (in this or another process). False when its statistics are
        missing or were taken against another background: `warm` again to have them."""
        forms = [str(f) for f in forms]
        self._explained.update(zip(forms, np.asarray(vectors, dtype=np.float32)))
        self._scaled.clear()  # scales computed from the vectors these may replace
        for f in forms:
            self._stats.pop(f, None)
        self._setup()
        if stats is None or str(background) != self._digest:
            return False
        self._stats.update(zip(map(str, stated), map(tuple, np.asarray(stats, dtype=np.float64).tolist())))
        return True

    def _clear_tables(self) -> None:
        self._rows: dict[str, int] = {}  # word or context text -> row of self._grid
        # Each row's vector on the grid of `exact.cosines`, kept as int32 (|v| <= 1, so below 2**24
        # in magnitude): every simulate call takes its rows from here instead of rounding them
        # again. Capacity doubles; rows past len(_rows) unused.
        self._grid = np.zeros((0, 0), dtype=np.int32)
        self._grid_norm = 0.0  # the largest norm of a row on the grid (for `quantised_cosines`)
        self._windows: OrderedDict[tuple[str, ...], _Window] = OrderedDict()
        self._pinned = 0  # rows that came from a word table (add_words); eviction keeps them

    def _write_rows(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Store vectors at these rows of the table (grown to fit), on the cosine grid."""
        if len(rows) == 0:
            return
        need = int(rows.max()) + 1
        if need > len(self._grid) or not self._grid.flags.writeable:  # read-only: a shared word table
            grown = np.zeros((max(2 * len(self._grid), need, 4096), vectors.shape[1]), np.int32)
            if len(self._grid):
                grown[: len(self._grid)] = self._grid
            self._grid = grown
        q, norm = quantise(vectors, axis=1)
        self._grid[rows] = q.astype(np.int32)
        self._grid_norm = max(self._grid_norm, norm)

    @property
    def model(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(self.model_path, device=self.device)
        return self._model

    def _encode(self, texts: list[str], fixed: bool = False) -> np.ndarray:
        """fixed: `texts` is a list always embedded whole (fixed batches); else each text alone."""
        from autoexplain.wordvecs import encode_each, encode_fixed

        self.encode_calls += 1
        self.encoded_texts += len(texts)
        if fixed:
            return encode_fixed(self.model, texts, self.batch_size)
        return encode_each(self.model, texts, (self.model_path, self.device))

    def _setup(self) -> None:
        if self._background is None:
            with open(f"{self.model_path}/vocab.txt", encoding="utf-8") as f:
                vocab = [line.strip() for line in f]
            # Entries from 1996 on are whole words, roughly by frequency ("the", "of", "and", ...).
            words = [w for w in vocab[1996:] if w.isalpha() and len(w) > 1][:N_BACKGROUND]
            from autoexplain.wordvecs import machine_cached

            self._background = machine_cached("simulator-background", [self.encoding, self.model_path, *words],
                                              lambda: self._encode(words, fixed=True))
            self._digest = hashlib.sha256(np.ascontiguousarray(self._background).tobytes()).hexdigest()[:16]
            classes, competitors = self._prompt
            self._descriptions = self._encode(classes + competitors, fixed=True)

    def prompt_dependence(self, texts: Sequence[str]) -> list[str]:
        """The prompt (class descriptions, competitors) reaches a text's simulations only through its
        gated class z-scores, its column of `z_ortho`: an edit of one description changes the digest
        of just the texts whose gate it moves."""
        # Only the gates: a rerun asks this of every text of a shard, and simulates few of them.
        self._setup()
        known = {e: c[3] for e, c in self._scaled.items()}
        new = list(dict.fromkeys(t for t in texts if t not in known))
        if new:
            self._embed(new)
            z = self._gates(new)
            known.update((t, z[:, i]) for i, t in enumerate(new))
        return [hashlib.sha256(np.ascontiguousarray(known[t]).tobytes()).hexdigest()[:16] for t in texts]

    # -- windows -----------------------------------------------------------------------------
    def prepare(self, records: Sequence[Sequence[str]]) -> list[_Window]:
        """Each record's window, from the cache or built now; the words and contexts of all new
        windows that are not in the table yet are embedded in one batch."""
        keys = [tuple(r) for r in records]
        missing = list(dict.fromkeys(k for k in keys if k not in self._windows))
        self.window_hits += len(keys) - len(missing)
        self.window_misses += len(missing)
        if len(self._rows) > MAX_TEXTS + self._pinned or len(self._windows) + len(missing) > self.max_windows:
            self._evict()  # generational eviction: start afresh rather than grow without bound
            missing = list(dict.fromkeys(keys))
        if missing:
            words = {k: window_surface(k)[0] for k in missing}
            contexts = {k: self._contexts(k) for k in missing} if self.context_weight else {}
            new = [t for v in (*words.values(), *contexts.values()) for t in v if t and t not in self._rows]
            new = list(dict.fromkeys(new))
            if new:
                base = len(self._rows)
                self._write_rows(np.arange(base, base + len(new)), self._encode(new))
                self._rows.update((t, base + i) for i, t in enumerate(new))
            for k in missing:
                self._windows[k] = _Window(
                    tokens=k,
                    literal_keys=window_surface(k)[1],
                    words=self._row_ids(words[k]),
                    contexts=self._row_ids(contexts[k]) if self.context_weight else None,
                    ortho=window_surface(k)[2],
                )
        for k in keys:
            self._windows.move_to_end(k)
        return [self._windows[k] for k in keys]

    def _evict(self) -> None:
        """Drop the cached windows and every row embedded on the fly; keep the pinned word table."""
        keep = {t: r for t, r in self._rows.items() if r < self._pinned}
        self._windows = OrderedDict()
        self._rows = keep

    def _contexts(self, tokens: Sequence[str]) -> list[str]:
        k = self.context
        return ["".join(tokens[max(0, i - k) : i + k + 1]).strip() if t.strip() else "" for i, t in enumerate(tokens)]

    def _row_ids(self, texts: list[str]) -> np.ndarray:
        return np.array([self._rows[t] if t else -1 for t in texts], dtype=np.int32)

    # -- scoring -----------------------------------------------------------------------------
    def explanations(self, explanations: Sequence[str]) -> _Explanations:
        """Each explanation's content embedding and scale against the background, computed once per
        text (in one batch for the texts new to this call) and then assembled per call."""
        self._setup()
        if len(self._scaled) > MAX_TEXTS:
            self._scaled.clear()
        new = list(dict.fromkeys(e for e in explanations if e not in self._scaled))
        if new:
            ex = self._scale(new)
            for i, e in enumerate(new):
                self._scaled[e] = (ex.E[:, i], ex.mu[i], ex.sd[i], ex.z_ortho[:, i], ex.literals[i], ex.relations[i])
        cols = [self._scaled[e] for e in explanations]
        return _Explanations(np.stack([c[0] for c in cols], axis=1), np.array([c[1] for c in cols]),
                             np.array([c[2] for c in cols]), np.stack([c[3] for c in cols], axis=1),
                             [c[4] for c in cols], [c[5] for c in cols])

    def _scale(self, explanations: Sequence[str]) -> _Explanations:
        """Embed explanations in one batch and fix each one's scale against the background."""
        n = len(explanations)
        texts = [content_of(e) for e in explanations] + list(explanations)
        self._embed(texts)
        both = np.stack([self._explained[t] for t in texts])
        E, F = both[:n].T, both[n:].T  # content (lexical channel), full text (surface channel)
        if self.expand:  # pull each explanation toward its nearest background words
            # The k nearest, unordered (their mean is taken): a partition, not a sort of all 2,000;
            # then in index order, so that the mean is summed in one order.
            # Partitioned along rows of the transpose: the same columns, each partitioned as it
            # was, without numpy's slow strided walk down axis 0.
            nearest = np.argpartition(-cosines(self._background, E).T, self.expand - 1, axis=1)[:, : self.expand].T
            nearest = np.sort(nearest, axis=0)  # (k, U)
            E = (1 - self.expand_weight) * E + self.expand_weight * (fixed_sum(self._background[nearest]) / self.expand).T
            E = E / np.sqrt(fixed_sum(E * E))
        mu, sd = fixed_mean_std(cosines(self._background, E))
        sd = sd + 1e-6
        z_ortho = self._gates(list(explanations))
        # Quoted words, and the single words an explanation gives as examples, fire as written.
        literals = [(quoted_literals(e) | (named_examples(e) if self.relations else set()), literal_only(e))
                    for e in explanations]
        relations = [parse_relation(e) if self.relations else None for e in explanations]
        return _Explanations(E, mu, sd, z_ortho, literals, relations)

    def _embed(self, texts: Sequence[str]) -> None:
        new = list(dict.fromkeys(t for t in texts if t not in self._explained))
        if new:
            if len(self._explained) > MAX_TEXTS:
                self._explained.clear()
            self._explained.update(zip(new, self._encode(new)))

    def _gates(self, texts: list[str]) -> np.ndarray:
        """`gates.gates` of these texts; each one's background statistics computed once (`warm`)."""
        new = [t for t in dict.fromkeys(texts) if t not in self._stats]
        if new:
            self._stats.update(zip(new, background_stats(self._background, np.stack([self._explained[t] for t in new]).T)))
        F = np.stack([self._explained[t] for t in texts]).T
        return gates(self._descriptions, F, np.array([self._stats[t] for t in texts]).reshape(-1, 2))

    def simulate(self, explanation: str, records: Sequence[Sequence[str]]) -> list[Simulation]:
        return self.simulate_many([explanation], records)[0]

    def simulate_many(self, explanations: Sequence[str], records: Sequence[Sequence[str]]) -> list[list[Simulation]]:
        """For each explanation, one Simulation per record. Every row of the table the records
        use is scored against every explanation in one matrix product."""
        if not explanations:
            return []
        ex = self.explanations(explanations)
        windows = self.prepare(records)
        used = [w.words for w in windows] + [w.contexts for w in windows if w.contexts is not None]
        rows = np.unique(np.concatenate(used + [np.zeros(0, np.int32)]))
        rows = rows[rows >= 0]
        if rows.size:
            grid = (self._grid[rows].astype(np.float64), self._grid_norm)
            z_rows = (quantised_cosines(grid, quantise(ex.E, axis=0)) - ex.mu) / ex.sd
        else:
            z_rows = np.zeros((0, len(explanations)))
        z_rows = np.concatenate([z_rows, np.full((1, len(explanations)), -np.inf)])  # last row: blank
        # Every token of every window at once: one lookup, one literal pass per explanation that quotes.
        pred = self._predict(windows, ex, z_rows, rows)
        ends = np.cumsum([len(w.tokens) for w in windows]).tolist()
        per_unit = pred.T.tolist()
        return [[Simulation(expected=col[s:e]) for s, e in zip([0, *ends[:-1]], ends)] for col in per_unit]

    def _predict(self, windows: list[_Window], ex: _Explanations, z_rows: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """(tokens of all windows, U) predictions on the 0-10 scale."""

        def lookup(ids: np.ndarray) -> np.ndarray:
            pos = np.where(ids >= 0, np.searchsorted(rows, ids), len(rows))
            return z_rows[pos]

        if not windows:
            return np.zeros((0, len(ex.literals)))
        words = np.concatenate([w.words for w in windows])
        z = lookup(words)
        if self.context_weight:
            mixed = (1 - self.context_weight) * z + self.context_weight * lookup(np.concatenate([w.contexts for w in windows]))
            z = np.where((words < 0)[:, None], z, mixed)
        if any(lits for lits, _ in ex.literals):
            keys = [np.concatenate([w.literal_keys[i] for w in windows]) for i in (0, 1)]
            for u, (lits, only) in enumerate(ex.literals):
                if lits:
                    hit = literal_hits((), lits, keys)
                    z[:, u] = np.where(hit, self.z_high, -np.inf if only else z[:, u])
        z = np.maximum(z, ex.z_ortho[np.concatenate([w.ortho for w in windows])])
        for u, relation in enumerate(ex.relations):
            if relation is not None:  # a stated context decides alone; a surface property adds
                picked = np.concatenate([relation_marks(relation, w.tokens) for w in windows])
                z[:, u] = np.where(picked, self.z_high, -np.inf if relation.alone else z[:, u])
        return 10.0 * np.clip((z - self.z_low) / (self.z_high - self.z_low), 0.0, 1.0)
