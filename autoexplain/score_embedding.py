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
    """The texts embedded in fixed batches of this list, unit-normalised: the same list gives the
    same bits in any process (`wordvecs.encode_fixed`), and a batch is ten times faster than one
    text at a time on CPU. A vector may differ in its last bits with the list it came in."""
    from autoexplain.wordvecs import encode_fixed

    return encode_fixed(minilm(), list(texts), 64) if len(texts) else np.zeros((0, 384), np.float32)


def window_text(tokens) -> str:
    return "".join(tokens).strip()


class EmbeddingScorer(ClassifierScorer):
    kind, takes_llm, metric = "embedding", "none", "similarity"
    settings = {"embedder": "all-MiniLM-L6-v2", "split": "test"}

    def __init__(self, spec: str | None = None):
        super().__init__(None, spec or self.kind)
        self._vectors: dict[tuple, np.ndarray] = {}  # a unit's window texts -> vectors (its 3 methods share them)

    def vectors(self, texts: list[str]) -> np.ndarray:
        """The embeddings of one unit's windows (`embed`, in one list, so that they depend on the
        unit's own windows only), remembered for its other methods."""
        key = tuple(texts)
        if key not in self._vectors:
            self._vectors = {key: embed(texts)}  # only the last unit's: its methods come together
        return self._vectors[key]

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
        kinds = self.kinds_for(negatives)
        texts = [window_text(r.tokens) for r in positives + [r for k in kinds for r in negatives[k]]]
        vector_of = dict(zip(texts, self.vectors(texts)))
        for kind in kinds:
            shown = [(r, 1) for r in positives] + [(r, 0) for r in negatives[kind]]
            for i, (r, label) in enumerate(shown):
                out.append(Trial(kind, i, r.window_id, label, None, float(np.dot(vector_of[window_text(r.tokens)], query))))
        return out
