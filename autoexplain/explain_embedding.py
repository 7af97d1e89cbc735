"""The embedding explainer: an offline explainer that names what a unit's top tokens share.

Measured on this project's planted and real units, the embedded 135M LLM writes fluent sentences
that rarely describe the unit (bench/RESULTS.md), and it reads about a thousand prompt tokens per
unit: hours for a layer on two CPU cores. This explainer reads the same train records and writes
its candidates from statistics and all-MiniLM-L6-v2 in milliseconds per unit:

- literal: the whole words with the highest mean normalised activation, quoted (`the words "God",
  "Lord"`); one word and three words are two candidates;
- orthographic: when most of the activation mass sits on one surface class (digits, punctuation,
  capitalised or all-caps words, whitespace), that class's plain description;
- semantic: the activation-weighted centroid of the top words' embeddings, named by the nearest
  words of a 10,000-word vocabulary (`words related to colour, red`), alone and after the quoted
  top words.

Best-of-k then picks among the candidates on the valid split, as for any explainer, and the test
split reports. Because the default simulator embeds with the same MiniLM, the candidates are
phrased in the words the simulator reads best; the shuffled control and the token-lookup baseline
are scored beside them, so any bias this gives shows up as a smaller margin over those baselines.

A unit's candidates are the same bits whatever other units are explained with it, in which process
and on how many threads: its words are embedded alone or come from the corpus's word table (see
`wordvecs`), and the centroid and its cosines with the vocabulary are computed in a fixed order (`fixed_matmul`,
`cosines`).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Sequence

import numpy as np

from autoexplain.components import Explainer
from autoexplain.exact import fixed_matmul, fixed_sum, quantise, quantised_cosines
from autoexplain.records import ActivationRecord, Explanation
from autoexplain.surface import ortho_class
from autoexplain.words import word_of_each_token

N_VOCAB = 10_000  # naming vocabulary: MiniLM's whole words, roughly by frequency
N_STOP = 150  # the most frequent of them are function words, which name no category
DOMINANT = 0.6  # share of activation mass on one surface class to call the unit orthographic
TOP_WORDS = 8  # words whose embeddings make the semantic centroid
# How the explainer names a unit whose activation sits on one surface class of token.
CLASS_PHRASES = {
    "space": "whitespace and line breaks",
    "digit": "numbers written in digits",
    "punct": "punctuation marks and symbols",
    "allcaps": "words written in all capital letters",
    "capital": "capitalized words starting with an uppercase letter",
}
VERSION = "1"  # bump when the candidate rules change: it is part of the explainer's identity


class EmbeddingExplainer(Explainer):
    """Writes explanation candidates from a unit's train records; see the module docstring."""

    kind, uses_word_table = "embedding", True
    settings = {"version": VERSION, "dominant": DOMINANT, "top_words": TOP_WORDS, "n_vocab": N_VOCAB}

    def __init__(self, model_path=None, batch_size: int = 256):
        from autoexplain import defaults

        self.model_path = str(model_path or defaults.embedder_path())
        self.embedder = "all-MiniLM-L6-v2" if model_path is None else self.model_path
        self.name = f"embedding-explainer:v{VERSION}:{self.embedder}"
        self.batch_size = batch_size
        self._model = None
        self._vocab: list[str] | None = None
        self._vocab_vectors: np.ndarray | None = None
        self._words: dict[str, np.ndarray] = {}

    @property
    def prompt_hash(self) -> str:
        return hashlib.sha256(f"{self.name}|{DOMINANT}|{TOP_WORDS}|{N_VOCAB}".encode()).hexdigest()[:16]

    def _encode(self, texts: list[str], fixed: bool = False) -> np.ndarray:
        """fixed: `texts` is a list always embedded whole (fixed batches); else each text alone."""
        from autoexplain.wordvecs import encode_each, encode_fixed

        if self._model is None:
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(self.model_path, device="cpu")
        return encode_fixed(self._model, texts, self.batch_size) if fixed else encode_each(self._model, texts)

    @property
    def encoding(self) -> str:
        from autoexplain.wordvecs import encoding

        return encoding(self.embedder, self.batch_size)

    def encode_words(self, words) -> np.ndarray:
        """A whole word list (a corpus's sorted words) in fixed batches of that list."""
        return self._encode(list(words), fixed=True) if len(words) else np.zeros((0, 384), np.float32)

    def add_words(self, words, vectors: np.ndarray) -> None:
        """Take precomputed word embeddings (the corpus's word table): no word is embedded twice. The
        table's vector wins over one embedded alone before, so the order of calls does not matter."""
        self._words.update(zip(words, np.asarray(vectors, dtype=np.float32)))

    def _setup(self) -> None:
        if self._vocab is None:
            with open(f"{self.model_path}/vocab.txt", encoding="utf-8") as f:
                vocab = [line.strip() for line in f]
            # From entry 1996 on, MiniLM's vocabulary holds whole words roughly by frequency.
            words = [w for w in vocab[1996:] if w.isalpha() and len(w) > 2][:N_VOCAB]
            self._vocab = words[N_STOP:]
            self._vocab_vectors = self._cached_vectors(self._vocab)
            self._vocab_grid = quantise(self._vocab_vectors, axis=1)  # for `cosines`, once

    def _cached_vectors(self, words: list[str]) -> np.ndarray:
        """The naming vocabulary's embeddings: they take a minute to compute on two cores."""
        from autoexplain.wordvecs import machine_cached

        return machine_cached("naming-vocabulary", [self.encoding, self.model_path, *words],
                              lambda: self._encode(words, fixed=True))

    def _embed_words(self, words: list[str]) -> np.ndarray:
        new = list(dict.fromkeys(w for w in words if w not in self._words))
        if new:
            self._words.update(zip(new, self._encode(new)))
        return np.stack([self._words[w] for w in words]) if words else np.zeros((0, 384), np.float32)

    def explain_records(self, units: Sequence[Sequence[ActivationRecord]], k: int = 4, temperature: float = 1.0,
                        max_tokens: int = 60, chat: bool = False) -> list[Explanation]:
        """The sampling settings are ignored: the candidates are computed, not sampled."""
        self._setup()
        profiles = [_profile(records) for records in units]
        # One batch for every word any unit needs, so a shard's cost is one encode call.
        self._embed_words([w for p in profiles for w, _ in p.top_words])
        return [Explanation(text=(c := self._candidates(p)[:k])[0], candidates=c, prompt_hash=self.prompt_hash,
                            explainer=self.name) for p in profiles]

    def _candidates(self, p: "_Profile") -> list[str]:
        out: list[str] = []
        if p.dominant_class is not None:
            out.append(CLASS_PHRASES[p.dominant_class])
        quoted = [f'"{w}"' for w, _ in p.top_words[:3]]
        if quoted:
            out.append(f"the words {_join(quoted)}" if len(quoted) > 1 else f"the word {quoted[0]}")
        names = self._names(p)
        if names:
            out.append(f"words related to {_join(names)}")
            if quoted:
                out.append(f"{_join(quoted[:2])} and other words related to {names[0]}")
        if len(quoted) > 1:
            out.append(f"the word {quoted[0]}")
        if not out:
            out.append("nothing in particular")
        return list(dict.fromkeys(out))

    def _names(self, p: "_Profile", n: int = 2) -> list[str]:
        words = [w for w, _ in p.top_words[:TOP_WORDS] if w.isalpha()]
        if not words:
            return []
        weights = np.array([dict(p.top_words)[w] for w in words], dtype=np.float32)
        centroid = fixed_matmul(weights[None, :], self._embed_words(words))[0]  # (384,)
        centroid /= np.sqrt(fixed_sum(centroid * centroid)) + 1e-9
        scores = quantised_cosines(self._vocab_grid, quantise(centroid[:, None], axis=0))[:, 0]
        order = np.argsort(-scores, kind="stable")[:n]
        return [self._vocab[i] for i in order]


class _Profile:
    """What the records say about a unit: its top whole words and where its activation mass sits."""

    def __init__(self, top_words: list[tuple[str, float]], dominant_class: str | None):
        self.top_words = top_words
        self.dominant_class = dominant_class


def _profile(records: Sequence[ActivationRecord], n_words: int = TOP_WORDS) -> _Profile:
    peak = max((max(r.activations, default=0.0) for r in records), default=0.0)
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    mass: dict[str | None, float] = defaultdict(float)
    if peak <= 0:
        return _Profile([], None)
    for r in records:
        words = word_of_each_token(r.tokens)
        for token, word, a in zip(r.tokens, words, r.activations):
            a = max(a, 0.0) / peak
            mass[ortho_class(token)] += a
            if word:
                sums[word] += a
                counts[word] += 1
    total = sum(mass.values())
    cls = max((c for c in mass if c is not None), key=lambda c: mass[c], default=None)
    dominant = cls if cls is not None and total > 0 and mass[cls] / total >= DOMINANT else None
    ranked = sorted(((s / counts[w], w) for w, s in sums.items()), reverse=True)
    return _Profile([(w, m) for m, w in ranked[:n_words] if m > 0], dominant)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
