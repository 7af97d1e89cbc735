"""The embedding scorer (delphi's): the embedded MiniLM embeds the explanation and each window's
text; the cosine similarity should rank activating windows above non-activating ones (ROC AUC).

It asks no LLM, so it costs no tokens; it reuses the embedding simulator's MiniLM loader.
"""

from __future__ import annotations

import random
from functools import lru_cache

import numpy as np

from autoexplain.classify import ClassifierScorer, Trial


@lru_cache(maxsize=1)
def minilm():
    """The embedded all-MiniLM-L6-v2, loaded the way the embedding simulator loads it."""
    from autoexplain.embedding import EmbeddingSimulator

    return EmbeddingSimulator().model


def embed(texts: list[str]) -> np.ndarray:
    """Each text embedded alone, unit-normalised (a vector depends on its text only)."""
    from autoexplain.wordvecs import encode_each

    return encode_each(minilm(), texts)


def window_text(tokens) -> str:
    return "".join(tokens).strip()


class EmbeddingScorer(ClassifierScorer):
    kind, takes_llm, metric = "embedding", "none", "similarity"
    settings = {"embedder": "all-MiniLM-L6-v2", "split": "test"}

    def __init__(self, spec: str | None = None):
        super().__init__(None, spec or self.kind)
        self._vectors: dict[str, np.ndarray] = {}  # window text -> vector: a unit's 3 methods share windows

    def vectors(self, texts: list[str]) -> np.ndarray:
        """Each text's embedding (`embed`), computed once per text and scorer (a vector depends on its
        text alone, so a remembered one has the bits a fresh one would)."""
        new = [t for t in dict.fromkeys(texts) if t not in self._vectors]
        if len(self._vectors) > 50_000:
            self._vectors.clear()
        self._vectors.update(zip(new, embed(new)) if new else ())
        return np.stack([self._vectors[t] for t in texts]) if texts else np.zeros((0, 384), np.float32)

    @property
    def thread_safe(self) -> bool:
        return False

    def prompts(self, text, positives, negatives, rng: random.Random):
        return []

    def trials(self, text, records, negatives=None, seed: int = 0) -> list[Trial]:
        from autoexplain.classify import activating, random_negatives

        positives = activating(records)
        negatives = negatives if negatives is not None else {"random": random_negatives(records)}
        out = []
        query = embed([text or ""])[0]
        for kind in self.kinds_for(negatives):
            shown = [(r, 1) for r in positives] + [(r, 0) for r in negatives[kind]]
            vectors = self.vectors([window_text(r.tokens) for r, _ in shown])
            for i, ((r, label), v) in enumerate(zip(shown, vectors)):
                out.append(Trial(kind, i, r.window_id, label, None, float(np.dot(v, query))))
        return out
