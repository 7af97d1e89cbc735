"""The field's classifier scorers (delphi's detection, fuzzing and intruder, and the embedding
scorer): an explanation is judged by whether it lets a classifier tell activating windows from
non-activating ones, not by a per-token simulation.

A scorer turns a unit's windows into *trials* and asks its classifier about them. A trial is one
window's question: its true label (1 activating, 0 not; for the intruder, the intruder's position),
the classifier's answer (None when the reply could not be read: a failure, never a 0 or a 1), P(1)
where the LLM's logprobs give it (the embedding scorer: a similarity), and the tokens it cost. The
metrics (`classify_metrics`) are computed from the trials afterwards, so a metric edit re-asks
nothing.

Windows: activating ones are the unit's test-split top windows (the explainer saw train ones only);
non-activating ones come per `negatives` kind: 'random' (the unit's test-split random windows where
it does not fire), 'similar' (held-out windows nearest the activating ones by MiniLM, where it does
not fire) or 'cofiring' (held-out windows where its co-firing units fire and it does not:
`negatives`). A window "fires" where a token reaches `ACTIVE_FRACTION` of the unit's top
activation; fuzzing highlights the tokens at or above that fraction of the window's own maximum.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np

from autoexplain.components import Scorer
from autoexplain.explain import prompt_hash, read_prompt
from autoexplain.llm import accepts, per_item_errors
from autoexplain.records import ActivationRecord

ACTIVE_FRACTION = 0.3  # of a window's max (fuzzing's highlights) or of the unit's max (firing at all)
SCORED_SPLIT = "test"


@dataclass
class Example:
    """One window as a classifier sees it."""

    tokens: list[str]
    label: int  # 1: activating (or correctly highlighted), 0: not
    window_id: int
    highlight: tuple[int, ...] = ()  # token positions marked with << >>


@dataclass
class Trial:
    """One question to the classifier about one window (see the module docstring)."""

    negatives: str  # the kind of non-activating windows in its prompt: 'random', 'similar', 'cofiring', 'active'
    prompt: int  # which request of the unit, method and negatives kind it was asked in
    window_id: int
    label: int
    prediction: int | None
    p_one: float | None = None
    failure: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @classmethod
    def of_row(cls, row: dict) -> "Trial":
        """A trial back from a row of the classifications table (its cost columns are the unit's)."""
        return cls(row["negatives"], row["prompt"], row["window_id"], row["label"], row["prediction"], row["p_one"],
                   row["failure"])


class ParseFailure(ValueError):
    pass


# ---- windows --------------------------------------------------------------------------------------

def unit_max(records: Sequence[ActivationRecord]) -> float:
    """The unit's top activation over its top windows (a statistic of every split: no answer leaks)."""
    tops = [r.max_activation for r in records if r.kind == "top"]
    return max(tops) if tops else max((r.max_activation for r in records), default=0.0)


def fires(record: ActivationRecord, top: float) -> bool:
    return top > 0 and record.max_activation >= ACTIVE_FRACTION * top


def activating(records: Sequence[ActivationRecord]) -> list[ActivationRecord]:
    """The unit's test-split top windows where it fires: a top record that never fires (recorded
    before top records had to) asked about as activating would score an explanation on zeros."""
    return [r for r in records if r.split == SCORED_SPLIT and r.kind == "top" and r.max_activation > 0]


def random_negatives(records: Sequence[ActivationRecord]) -> list[ActivationRecord]:
    """The unit's test-split random windows where it does not fire (a random window may fire)."""
    top = unit_max(records)
    return [r for r in records if r.split == SCORED_SPLIT and r.kind == "random" and not fires(r, top)]


def hot_tokens(record: ActivationRecord) -> tuple[int, ...]:
    """The tokens at or above `ACTIVE_FRACTION` of the window's own max (at least its argmax)."""
    a = np.asarray(record.activations, dtype=float)
    if a.size == 0:
        return ()
    hot = np.flatnonzero(a >= ACTIVE_FRACTION * a.max()) if a.max() > 0 else np.array([int(a.argmax())])
    return tuple(int(i) for i in hot)


def other_tokens(n_tokens: int, count: int, avoid: Sequence[int], rng: random.Random) -> tuple[int, ...]:
    """`count` positions outside `avoid`, drawn at random (as many highlights elsewhere)."""
    free = [i for i in range(n_tokens) if i not in set(avoid)]
    return tuple(sorted(rng.sample(free, min(count, len(free)))))


def render(example: Example) -> str:
    marked = set(example.highlight)
    return "".join(f"<<{t}>>" if i in marked else t for i, t in enumerate(example.tokens)).strip()


def numbered(examples: Sequence[Example]) -> str:
    return "\n".join(f"Example {i + 1}: {render(e)}" for i, e in enumerate(examples))


# ---- replies ---------------------------------------------------------------------------------------

def parse_labels(text: str, n: int) -> list[int]:
    """A reply's list of n 0/1 answers; ParseFailure when it holds anything else."""
    start, end = text.find("["), text.find("]", text.find("["))
    if start < 0 or end < 0:
        raise ParseFailure("no list in the reply")
    try:
        values = json.loads(text[start : end + 1])
    except json.JSONDecodeError:
        raise ParseFailure("the list is not valid JSON") from None
    if len(values) != n:
        raise ParseFailure(f"the list holds {len(values)} answers for {n} examples")
    if any(v not in (0, 1) or isinstance(v, bool) for v in values):
        raise ParseFailure("an answer is not 0 or 1")
    return [int(v) for v in values]


def parse_choice(text: str, n: int) -> int:
    """The 0-based position an intruder reply names (it writes 1..n)."""
    m = re.search(r"\d+", text)
    if m is None or not 1 <= int(m.group()) <= n:
        raise ParseFailure(f"no example number from 1 to {n} in the reply")
    return int(m.group()) - 1


def label_probabilities(top_logprobs, n: int) -> list[float | None]:
    """P(1) of each of n answers, read where the reply wrote its '0's and '1's (temperature 0: the
    chosen token is the most likely one); Nones when the logprobs do not show n such positions."""
    if not top_logprobs:
        return [None] * n
    out = []
    for alternatives in top_logprobs:
        if alternatives and alternatives[0][0].strip() in ("0", "1"):
            lp = {t.strip(): v for t, v in reversed(alternatives) if t.strip() in ("0", "1")}
            p0, p1 = (math.exp(lp[d]) if d in lp else 0.0 for d in ("0", "1"))
            out.append(p1 / (p0 + p1) if p0 + p1 > 0 else None)
    return out if len(out) == n else [None] * n


# ---- the scorers -----------------------------------------------------------------------------------

class ClassifierScorer(Scorer):
    """A scorer that asks its own classifier about windows, and measures from the trials.

    `trials(text, records, negatives)` asks; `classify_metrics.metrics(self.metric, trials)` measures;
    `score` does both for one explanation (a call on a record, for suites and tests)."""

    needs_simulations = False
    needs_explanation: ClassVar[bool] = True
    takes_llm = "optional"
    metric: ClassVar[str] = ""  # 'binary' (balanced accuracy and AUC), 'intruder', 'similarity'
    metric_prefix: ClassVar[str] = ""  # a binary scorer's metrics are named after it ('detection_auc@random')
    negative_kinds: ClassVar[tuple[str, ...]] = ("random", "similar", "cofiring")
    batch: ClassVar[int] = 5  # windows per prompt
    max_tokens: ClassVar[int] = 32
    retries: ClassVar[int] = 1  # a reply that does not parse is asked again, sampling a little

    def __init__(self, llm=None, spec: str | None = None):
        self.llm = llm
        self.name = spec or (f"{self.kind}:{getattr(llm, 'name', 'local')}" if llm is not None else self.kind)

    @property
    def thread_safe(self) -> bool:
        return bool(self.llm is not None and self.llm.thread_safe)

    @property
    def prompt_hash(self) -> str:
        return prompt_hash(*self.prompt_files) if self.prompt_files else ""

    def dollars(self, prompt_tokens, completion_tokens, cached_tokens=0):
        return self.llm.dollars(prompt_tokens, completion_tokens, cached_tokens) if self.llm is not None else 0.0

    def kinds_for(self, negatives: dict[str, list]) -> list[str]:
        return [k for k in self.negative_kinds if negatives.get(k)]

    def prompts(self, text: str | None, positives: list[ActivationRecord], negatives: list[ActivationRecord],
                rng: random.Random) -> list[list[Example]]:
        """The examples of each prompt (label 1 first in the pool, then shuffled)."""
        raise NotImplementedError

    def messages(self, text: str | None, examples: list[Example]) -> list[dict]:
        system = read_prompt(self.prompt_files[0]).strip()
        head = f"Explanation: {text}\n\n" if self.needs_explanation else ""
        return [{"role": "system", "content": system}, {"role": "user", "content": head + numbered(examples)}]

    def read(self, result, examples: list[Example]) -> list[tuple[int | None, float | None]]:
        """(prediction, P(1)) per example of a reply; raises ParseFailure."""
        labels = parse_labels(result.text, len(examples))
        return list(zip(labels, label_probabilities(result.top_logprobs, len(examples))))

    def trials(self, text: str | None, records: Sequence[ActivationRecord],
               negatives: dict[str, list[ActivationRecord]] | None = None, seed: int = 0) -> list[Trial]:
        """Every trial of one explanation on one unit's records, per kind of negatives. `negatives`
        defaults to {'random': the unit's non-firing test random windows}."""
        positives = activating(records)
        negatives = negatives if negatives is not None else {"random": random_negatives(records)}
        asked: list[tuple[str, int, list[Example]]] = []
        for kind in self.kinds_for({**negatives, "active": positives}):
            # The intruder's prompts do not depend on the explanation it is not shown.
            rng = random.Random(f"{seed}|{self.kind}|{kind}|{text if self.needs_explanation else ''}")
            for i, examples in enumerate(self.prompts(text, positives, negatives.get(kind, []), rng)):
                asked.append((kind, i, examples))
        return self.ask(text, asked)

    def ask(self, text: str | None, asked: list[tuple[str, int, list[Example]]]) -> list[Trial]:
        """Every prompt in one batch to the LLM (a server's requests go out together); a reply that
        does not parse is asked again up to `retries` times, then recorded as failed."""
        from autoexplain.llm import make_llm

        if self.llm is None:
            self.llm = make_llm("local")
        extra = per_item_errors(self.llm.chat)
        takes_sample = accepts(self.llm.chat, "sample")
        answers: list = [None] * len(asked)
        spent = [[0, 0, 0] for _ in asked]
        pending = list(range(len(asked)))
        for attempt in range(self.retries + 1):
            if not pending:
                break
            results = self.llm.chat([self.messages(text, asked[i][2]) for i in pending],
                                    temperature=0.0 if attempt == 0 else 0.7, max_tokens=self.max_tokens,
                                    top_logprobs=5, **extra, **({"sample": attempt} if takes_sample else {}))
            still = []
            for i, result in zip(pending, results):
                if isinstance(result, Exception):  # its own retries ran out: not asked again
                    answers[i] = f"request failed: {getattr(result, 'problem', result)}"
                    continue
                spent[i][0] += result.prompt_tokens
                spent[i][1] += result.completion_tokens
                spent[i][2] += result.cached_tokens
                try:
                    answers[i] = self.read(result, asked[i][2])
                except ParseFailure as e:
                    answers[i] = f"unparseable reply: {e} (after {attempt + 1} attempts)"
                    still.append(i)
            pending = still
        return [t for i, (kind, n, examples) in enumerate(asked) for t in self._trials(kind, n, examples, answers[i], spent[i])]

    def _trials(self, kind, n, examples, answer, spent) -> list[Trial]:
        out = []
        for j, e in enumerate(examples):
            share = [c // len(examples) + (j < c % len(examples)) for c in spent]
            if isinstance(answer, str):
                out.append(Trial(kind, n, e.window_id, e.label, None, None, answer, *share))
            else:
                out.append(Trial(kind, n, e.window_id, e.label, answer[j][0], answer[j][1], None, *share))
        return out

    def score(self, explanation, records, simulations=None, *, n_boot: int = 1000, seed: int = 0):
        from autoexplain.classify_metrics import metrics

        return metrics(self.metric, self.trials(explanation, records, seed=seed), n_boot, seed, self.metric_prefix)


def _batches(pool: list[Example], size: int, rng: random.Random) -> list[list[Example]]:
    rng.shuffle(pool)
    return [pool[i : i + size] for i in range(0, len(pool), size)]


class DetectionScorer(ClassifierScorer):
    """Is the unit firing in this window? Unhighlighted windows, half activating."""

    kind, prompt_files, metric, metric_prefix = "detection", ("classify_detection.txt",), "binary", "detection"
    settings = {"batch": ClassifierScorer.batch, "active_fraction": ACTIVE_FRACTION, "split": SCORED_SPLIT}

    def prompts(self, text, positives, negatives, rng):
        n = min(len(positives), len(negatives))  # half and half
        pool = [Example(list(r.tokens), 1, r.window_id) for r in positives[:n]]
        pool += [Example(list(r.tokens), 0, r.window_id) for r in negatives[:n]]
        return _batches(pool, self.batch, rng)


class FuzzingScorer(ClassifierScorer):
    """Are the highlighted tokens the ones the explanation describes? Correct windows highlight the
    activating tokens; incorrect ones highlight as many tokens of a non-activating window."""

    kind, prompt_files, metric, metric_prefix = "fuzzing", ("classify_fuzzing.txt",), "binary", "fuzzing"
    settings = {"batch": ClassifierScorer.batch, "active_fraction": ACTIVE_FRACTION, "split": SCORED_SPLIT}

    def prompts(self, text, positives, negatives, rng):
        n = min(len(positives), len(negatives))
        pool = [Example(list(r.tokens), 1, r.window_id, hot_tokens(r)) for r in positives[:n]]
        pool += [Example(list(r.tokens), 0, r.window_id, other_tokens(len(r.tokens), len(pool[i].highlight), (), rng))
                 for i, r in enumerate(negatives[:n])]
        return _batches(pool, self.batch, rng)


class ActiveFuzzingScorer(FuzzingScorer):
    """delphi's "active" fuzzing: incorrect examples highlight wrong tokens of activating windows,
    so the classifier cannot lean on the window alone."""

    kind = "fuzzing-active"
    negative_kinds = ("active",)

    def prompts(self, text, positives, negatives, rng):
        half = len(positives) // 2
        pool = [Example(list(r.tokens), 1, r.window_id, hot_tokens(r)) for r in positives[:half]]
        for r in positives[half : 2 * half]:
            hot = hot_tokens(r)
            pool.append(Example(list(r.tokens), 0, r.window_id, other_tokens(len(r.tokens), len(hot), hot, rng)))
        return _batches(pool, self.batch, rng)


class IntruderScorer(ClassifierScorer):
    """Which of these windows does not belong? `batch - 1` activating windows and one non-activating
    one, highlighted alike (the activating tokens; as many random ones in the intruder). Needs no
    explanation: it says whether the unit is interpretable at all."""

    kind, prompt_files, metric = "intruder", ("classify_intruder.txt",), "intruder"
    needs_explanation = False
    max_tokens = 8
    settings = {"batch": ClassifierScorer.batch, "active_fraction": ACTIVE_FRACTION, "split": SCORED_SPLIT}

    def prompts(self, text, positives, negatives, rng):
        k = min(self.batch - 1, len(positives))  # fewer when the unit has few test windows
        if k < 2:
            return []
        out = []
        for j, r in enumerate(negatives):
            shown = [positives[(j * k + i) % len(positives)] for i in range(k)]
            examples = [Example(list(p.tokens), 1, p.window_id, hot_tokens(p)) for p in shown]
            count = len(examples[j % len(examples)].highlight)
            examples.insert(rng.randrange(k + 1),
                            Example(list(r.tokens), 0, r.window_id, other_tokens(len(r.tokens), count, (), rng)))
            out.append(examples)
        return out

    def read(self, result, examples):
        return [(parse_choice(result.text, len(examples)), None)]

    def _trials(self, kind, n, examples, answer, spent):
        """One trial per prompt: its label is the intruder's position, its prediction the one named."""
        pos = next(i for i, e in enumerate(examples) if e.label == 0)
        if isinstance(answer, str):
            return [Trial(kind, n, examples[pos].window_id, pos, None, None, answer, *spent)]
        return [Trial(kind, n, examples[pos].window_id, pos, answer[0][0], None, None, *spent)]
