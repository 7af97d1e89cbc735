"""Explain: show an explainer LLM a unit's top train records and ask what the unit looks for.

The prompt follows the reference format: `token<TAB>activation` lines between `<start>` and `<end>`,
activations normalised to integers 0-10 by the maximum over the records shown, a repeat of only the
non-zero lines when fewer than 20 % are non-zero, hand-written few-shot neurons, and a final line
ending in "the main thing this neuron does is find" for the model to complete.

The prompt files live in `autoexplain/prompts/`; `explainer_prompt_hash()` is stored with every
explanation, so editing a prompt file changes what depends on it and nothing else.
"""

from __future__ import annotations

import hashlib
import os
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from autoexplain.components import Explainer
from autoexplain.errors import NO_ANSWER, UserError
from autoexplain.records import ActivationRecord, Explanation  # noqa: F401 (Explanation: also importable from here)

PACKAGE_PROMPTS = Path(__file__).parent / "prompts"
EXPLAINER_FILES = ("explainer_system.txt", "fewshot.json")
ENDING = "the main thing this neuron does is find"
SPARSE_FRACTION = 0.2


def prompts_dir() -> Path:
    """The prompt files in use: a copy to edit can be named with AUTOEXPLAIN_PROMPTS."""
    return Path(os.environ.get("AUTOEXPLAIN_PROMPTS") or PACKAGE_PROMPTS)


def read_prompt(name: str) -> str:
    """A prompt file's text from `prompts_dir()`; every component that reads a prompt file reads it here."""
    path = prompts_dir() / name
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"prompt file {path} is missing", f"copy {PACKAGE_PROMPTS} and edit the copy") from None


def prompt_hash(*names: str) -> str:
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0" + read_prompt(name).encode() + b"\0")
    return h.hexdigest()[:16]


def explainer_prompt_hash() -> str:
    return prompt_hash(*EXPLAINER_FILES)


def escape_token(token: str) -> str:
    """Keep one token per line: newlines and tabs inside a token would break the format."""
    return token.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")


def normalise(records: Sequence[Sequence[float]], max_value: float | None = None) -> list[list[int]]:
    """min(10, floor(10 * relu(a) / max)), max over the records shown; all zeros if nothing fires."""
    top = max_value if max_value is not None else max((max(r) for r in records if len(r)), default=0.0)
    if not top or top <= 0 or not math.isfinite(top):
        return [[0] * len(r) for r in records]
    return [[min(10, math.floor(10 * max(a, 0.0) / top)) for a in r] for r in records]


def format_records(records: Sequence[tuple[Sequence[str], Sequence[int]]]) -> str:
    blocks = []
    for tokens, values in records:
        lines = [f"{escape_token(t)}\t{v}" for t, v in zip(tokens, values)]
        blocks.append("<start>\n" + "\n".join(lines) + "\n<end>")
        nonzero = [line for line, v in zip(lines, values) if v > 0]
        if 0 < len(nonzero) < SPARSE_FRACTION * len(lines):
            blocks.append("Same activations, with the zeros left out:\n<start>\n" + "\n".join(nonzero) + "\n<end>")
    return "\n".join(blocks)


def _neuron_block(number: int, records: Sequence[tuple[Sequence[str], Sequence[int]]]) -> str:
    return f"Neuron {number}\nActivations:\n{format_records(records)}\n"


def _ending(number: int) -> str:
    return f"Explanation of neuron {number} behavior: {ENDING}"


@dataclass
class ExplainerPrompt:
    system: str
    shots: list[tuple[str, str]]  # (neuron block, explanation)
    target: str
    number: int

    def text(self) -> str:
        """One completion-style prompt, for base models and /v1/completions."""
        parts = [self.system, ""]
        for i, (block, explanation) in enumerate(self.shots, 1):
            parts += [block, f"{_ending(i)} {explanation}.", ""]
        parts += [self.target, _ending(self.number)]
        return "\n".join(parts)

    def messages(self) -> list[dict]:
        """The same content as chat turns; the reply is read as the completion of the last line."""
        msgs = [{"role": "system", "content": self.system}]
        for i, (block, explanation) in enumerate(self.shots, 1):
            msgs += [{"role": "user", "content": f"{block}\n{_ending(i)}..."},
                     {"role": "assistant", "content": f"{explanation}."}]
        msgs.append({"role": "user", "content": f"{self.target}\n{_ending(self.number)}..."})
        return msgs


def build_prompt(records: Sequence[ActivationRecord], max_shots: int = 3, outputs: str | None = None) -> ExplainerPrompt:
    """`outputs`: a line on what the unit writes (`output_line`), added to the target neuron only:
    the few-shot neurons come without one, so the prompt does not teach the model to copy it."""
    fewshot = json.loads(read_prompt("fewshot.json"))["neurons"][:max_shots]
    shots = []
    for n, neuron in enumerate(fewshot, 1):
        recs = [([t for t, _ in r], [v for _, v in r]) for r in neuron["records"]]
        shots.append((_neuron_block(n, recs), neuron["explanation"]))
    values = normalise([r.activations for r in records])
    number = len(shots) + 1
    target = _neuron_block(number, [(r.tokens, v) for r, v in zip(records, values)])
    if outputs:
        target += f"{outputs}\n"
    return ExplainerPrompt(read_prompt("explainer_system.txt").strip(), shots, target, number)


def clean_explanation(text: str) -> str:
    """First sentence of a completion, without a trailing period or a repeated prompt fragment."""
    text = text.strip().split("\n")[0]
    text = re.sub(rf"^.*?{re.escape(ENDING)}\s*", "", text, flags=re.I)
    text = re.split(r"(?<=[a-z0-9\)'\"])\.\s", text + " ", maxsplit=1)[0]
    return text.strip().rstrip(".").strip()[:300]


def explain(llm, records: Sequence[ActivationRecord], k: int = 4, temperature: float = 1.0,
            max_tokens: int = 60, chat: bool = False) -> Explanation:
    """Sample k candidate explanations for one unit from its train records."""
    return explain_many(llm, [records], k, temperature, max_tokens, chat)[0]


def explain_many(llm, units: Sequence[Sequence[ActivationRecord]], k: int = 4, temperature: float = 1.0,
                 max_tokens: int = 60, chat: bool = False, outputs: Sequence[str | None] | None = None,
                 prompt_files: Sequence[str] = EXPLAINER_FILES) -> list[Explanation]:
    """Batched over units: one request batch to the LLM for all of them. `outputs`: per unit, a
    line on what it writes, or None (`build_prompt`)."""
    from autoexplain.llm import per_item_errors as _per_item_errors

    prompts = [build_prompt(recs, outputs=line) for recs, line in zip(units, outputs or [None] * len(units))]
    if chat:
        extra = _per_item_errors(llm.chat)
        results = llm.chat([p.messages() for p in prompts for _ in range(k)], temperature=temperature,
                           max_tokens=max_tokens, **extra)
        grouped = [results[i * k : (i + 1) * k] for i in range(len(prompts))]
        grouped = [next((s for s in g if isinstance(s, Exception)), g) for g in grouped]
    else:
        extra = _per_item_errors(llm.complete)
        grouped = llm.complete([p.text() for p in prompts], n=k, temperature=temperature, max_tokens=max_tokens, **extra)
    phash = prompt_hash(*prompt_files)
    name = getattr(llm, "name", type(llm).__name__)
    out = []
    for samples in grouped:
        if isinstance(samples, Exception):  # this unit's requests failed for good; the others go on
            out.append(Explanation("", [], phash, name, failure=f"{NO_ANSWER}: {getattr(samples, 'problem', samples)}"))
            continue
        texts = [clean_explanation(s.text) for s in samples]
        texts = [t for t in dict.fromkeys(texts) if t]  # unique, non-empty, in sampled order
        # Answered, but with nothing to explain by: a fault of the server as much as no answer, so it
        # counts as one (`errors.NO_ANSWER`): the run ends incomplete and the next run asks again
        # (blank answers are not cached, `OpenAILLM.complete`).
        failure = None if texts else f"{NO_ANSWER}: no usable explanation in {len(samples)} samples (blank once cleaned)"
        out.append(Explanation(
            text=texts[0] if texts else "",
            candidates=texts,
            prompt_hash=phash,
            explainer=name,
            prompt_tokens=sum(s.prompt_tokens for s in samples),
            completion_tokens=sum(s.completion_tokens for s in samples),
            cached_tokens=sum(s.cached_tokens for s in samples),
            failure=failure,
        ))
    return out


class LLMExplainer(Explainer):
    """The reference explainer: an LLM reads the shown records (`build_prompt`) and is sampled k
    times per unit. The registry builds one for every explainer spec that is an LLM spec."""

    kind, takes_llm, prompt_files = "llm", "required", EXPLAINER_FILES

    def __init__(self, llm):
        self.model = llm
        self.name = getattr(llm, "name", type(llm).__name__)

    @property
    def llm(self):
        return self.model

    @property
    def thread_safe(self) -> bool:  # a server LLM: the stage may send many units' requests at once
        return self.model.thread_safe

    def dollars(self, prompt_tokens, completion_tokens, cached_tokens=0):
        return self.model.dollars(prompt_tokens, completion_tokens, cached_tokens)

    def explain_records(self, units, k=4, temperature=1.0, max_tokens=60, chat=False):
        return explain_many(self.model, units, k, temperature, max_tokens, chat)

    def units_per_call(self, k):
        # A local model's rows per pass (`LocalLLM.batch_size`); a server batches nothing itself.
        rows = None if self.thread_safe else getattr(self.model, "batch_size", None)
        return max(1, rows // max(1, k)) if isinstance(rows, int) else None


class OutputsExplainer(LLMExplainer):
    """The LLM explainer, told also what the unit writes: the tokens its output direction promotes
    and suppresses (`output_line`), for input-and-output explanations. 'with-outputs:LLM'."""

    kind, takes_llm, uses_outputs = "with-outputs", "optional", True
    prompt_files = EXPLAINER_FILES + ("explainer_outputs.txt",)

    def __init__(self, llm):
        super().__init__(llm)
        self.name = f"{self.kind}:{self.name}"

    def explain_records(self, units, k=4, temperature=1.0, max_tokens=60, chat=False, outputs=None):
        return explain_many(self.model, units, k, temperature, max_tokens, chat, outputs, self.prompt_files)


def output_line(stats) -> str | None:
    """What a unit writes, as the prompt line of `explainer_outputs.txt`; None when its statistics
    do not say (a recording from before the output side)."""
    if stats is None or not stats.promotes:
        return None
    quoted = lambda tokens: ", ".join(f'"{t}"' for t in tokens[:10])  # noqa: E731
    return read_prompt("explainer_outputs.txt").strip().format(promotes=quoted(stats.promotes),
                                                                suppresses=quoted(stats.suppresses or []))


def output_lookup_explanation(promotes: Sequence[str], n: int = 5) -> str:
    """The token-lookup baseline's output-side twin: the tokens the unit promotes most."""
    words = [t.strip() for t in promotes if t.strip()][:n]
    return "promotes the tokens " + ", ".join(f'"{w}"' for w in words) if words else "nothing in particular"


def as_explainer(explainer_or_llm) -> Explainer:
    """An Explainer as it is, anything else (an LLM) as the LLM explainer over it."""
    if isinstance(explainer_or_llm, Explainer):
        return explainer_or_llm
    return LLMExplainer(explainer_or_llm)


def token_lookup_explanation(records: Sequence[ActivationRecord], n: int = 5, min_count: int = 1) -> str:
    """Baseline: the tokens with the highest mean activation over the records shown."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for r in records:
        for t, a in zip(r.tokens, r.activations):
            key = t.strip()
            if key:
                sums[key] += a
                counts[key] += 1
    ranked = sorted((s / counts[t], t) for t, s in sums.items() if counts[t] >= min_count)[::-1]
    words = [t for mean, t in ranked[:n] if mean > 0]
    return "the tokens " + ", ".join(f'"{w}"' for w in words) if words else "nothing in particular"


def shuffled_explanations(explanations: Sequence[str], seed: int = 0) -> list[str]:
    """Baseline: each unit gets another unit's explanation (a derangement when there are two or more)."""
    n = len(explanations)
    if n < 2:
        return list(explanations)
    import numpy as np

    rng = np.random.default_rng(seed)
    shift = int(rng.integers(1, n))
    order = rng.permutation(n)
    result = [""] * n
    for i in range(n):
        result[order[i]] = explanations[order[(i + shift) % n]]
    return result
