"""Whole words of a subject model's tokens: the unit that embedding channels read.

Kept apart from the embedding simulator because the corpus word table (`wordvecs`) depends on
exactly this definition, and should not be rebuilt when the simulator's scoring code changes.
"""

from __future__ import annotations

from typing import Sequence


def word_spans(tokens: Sequence[str]) -> list[tuple[int, int]]:
    """[start, end) token spans of whole words: a token with no leading space that joins two
    letters or digits continues the previous token's word (' sm','it','ten' is one word)."""
    spans: list[tuple[int, int]] = []
    for i, t in enumerate(tokens):
        if spans and t[:1].isalnum() and tokens[i - 1][-1:].isalnum():
            spans[-1] = (spans[-1][0], i + 1)
        else:
            spans.append((i, i + 1))
    return spans


def word_of_each_token(tokens: Sequence[str]) -> list[str]:
    """The whole word each subject token belongs to, stripped (' sm','it','ten' -> 'smitten')."""
    out = [""] * len(tokens)
    for start, end in word_spans(tokens):
        out[start:end] = ["".join(tokens[start:end]).strip()] * (end - start)
    return out
