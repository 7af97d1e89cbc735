"""What an explanation's text and a token's surface say before anything is embedded: the
explanation without its meta-words, the words it quotes, and each token's surface class.

Shared by the embedding simulator (`autoexplain.embedding`) and explainer (`explain_embedding`).
"""

from __future__ import annotations

import re
import string
from functools import lru_cache
from typing import Sequence

import numpy as np

from autoexplain.words import word_of_each_token, word_spans

# The surface classes; their descriptions, and competitor descriptions that no token is given, are
# the simulator's prompt file (prompts/embedding_simulator.json), hashed like any other prompt.
ORTHO_CLASSES = ("space", "digit", "punct", "allcaps", "capital")

_META_HEAD = re.compile(
    r"^(?:the\s+)?(?:words?|tokens?|terms?|phrases?|mentions?|references?|instances?|occurrences?)"
    r"(?:\s+(?:related\s+to|about|for|like|such\s+as|of|to))?\s+",
    re.I,
)
_META_TAIL = re.compile(r"(?<!\bas)(?<!\bin)\s+(?:words?|tokens?|terms?)$", re.I)
_QUOTED = re.compile(r"(?<!\w)[\"'\u2018\u201c]([^\"'\u2019\u201d]{1,40})[\"'\u2019\u201d](?!\w)")
_FILLER = {"and", "or", "nor", "the", "a", "an", "of", "word", "words", "token", "tokens"}


def content_of(explanation: str) -> str:
    """The explanation without leading/trailing meta-words; itself if nothing would remain."""
    text = " ".join(explanation.split()).strip(" ,.;:")
    stripped = _META_TAIL.sub("", _META_HEAD.sub("", text))
    return stripped if re.search(r"\w", stripped) else explanation


def quoted_literals(explanation: str) -> set[str]:
    """Words the explanation quotes ("the word 'God'"), lowercased."""
    return {q.strip().lower() for q in _QUOTED.findall(explanation) if q.strip()}


def literal_only(explanation: str) -> bool:
    """True when the explanation names its tokens and nothing else ("the word 'God'")."""
    rest = _QUOTED.sub(" ", explanation).lower()
    return bool(quoted_literals(explanation)) and not set(re.findall(r"[a-z]+", rest)) - _FILLER


_EXAMPLES = re.compile(r"\(([^()]*)\)|(?:\bsuch\s+as|\be\.g\.|\bincluding|:)\s*([^();]*)", re.I)


def named_examples(explanation: str) -> set[str]:
    """Single words an explanation gives as examples of its category, lowercased: the items of a
    list in parentheses or after 'such as', 'e.g.', 'including' or a colon ("metals such as gold,
    silver and iron" -> gold, silver, iron). Items of more than one word are left out."""
    out = set()
    for m in _EXAMPLES.finditer(explanation):
        for item in re.split(r",|\band\b|\bor\b", (m.group(1) or m.group(2) or "").strip(" .")):
            item = item.strip(" .\"'\u2018\u2019\u201c\u201d").lower()
            if re.fullmatch(r"[a-z][a-z'-]{0,24}", item) and item not in _FILLER:
                out.add(item)
    return out


def literal_keys(tokens: Sequence[str]) -> tuple[list[str], list[str]]:
    """Per token: its whole word, lowercased; and, for a piece continuing a word, the piece
    lowercased ("" otherwise). A quoted literal names a token through either."""
    words, pieces = [""] * len(tokens), [""] * len(tokens)
    for start, end in word_spans(tokens):
        words[start:end] = ["".join(tokens[start:end]).strip().lower()] * (end - start)
        for i in range(start + 1, end):
            pieces[i] = tokens[i].strip().lower()
    return words, pieces


def literal_hits(tokens: Sequence[str], literals: set[str], keys=None) -> np.ndarray:
    """Tokens a quoted literal names: those whose whole word is the literal, or that are the literal
    piece continuing a word ("'ing'" names the suffix piece; "'God'" is not ' God' in 'Godhead')."""
    words, pieces = keys or literal_keys(tokens)
    named = np.array(sorted(lit for lit in literals if lit), dtype=str)
    if not named.size:
        return np.zeros(len(words), dtype=bool)
    # Vectorised string equality: a stage tests thousands of tokens per quoting explanation.
    return np.isin(np.asarray(words, dtype=str), named) | np.isin(np.asarray(pieces, dtype=str), named)


@lru_cache(maxsize=1 << 16)
def ortho_class(token: str) -> str | None:
    w = token.strip()
    if not w:
        return "space"
    if any(c.isdigit() for c in w):
        return "digit"
    if all(c in string.punctuation or not c.isalnum() for c in w):
        return "punct"
    if w.isalpha() and w[:1].isupper():
        return "allcaps" if len(w) > 1 and w.isupper() else "capital"
    return None


_ORTHO_INDEX = {name: i for i, name in enumerate(ORTHO_CLASSES)}


@lru_cache(maxsize=1 << 15)
def window_surface(tokens: tuple[str, ...]) -> tuple[list[str], tuple[np.ndarray, np.ndarray], np.ndarray]:
    """What a window's tokens alone decide: each token's whole word, its literal keys and its
    surface class. Shared by every simulator in the process (random windows recur in every unit)."""
    ortho = np.array([_ORTHO_INDEX.get(ortho_class(t), -1) for t in tokens], dtype=np.int8)
    ortho.flags.writeable = False
    keys = tuple(np.array(k, dtype=str) for k in literal_keys(tokens))
    for k in keys:
        k.flags.writeable = False
    return word_of_each_token(tokens), keys, ortho
