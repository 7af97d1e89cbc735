"""The JSON chat simulator, for chat-only APIs that return no prompt logprobs.

The model gets the explanation and the record's tokens and answers with a JSON list of
`{"token", "activation"}` objects at temperature 0. Where the API returns `top_logprobs`, the
activation is the expected value over the digit tokens at the position where the number was
written; otherwise it is the number itself. A reply that does not parse or does not cover the
record's tokens is retried, and if it still fails the record is marked failed with the reason —
never silently turned into zeros (the reference's defect).
"""

from __future__ import annotations

import json
import math
import re
from difflib import SequenceMatcher
from typing import Sequence

from autoexplain.explain import ENDING, _read
from autoexplain.llm import accepts as _takes
from autoexplain.simulate import DIGITS, Simulation, Simulator, _per_item_errors, expected_value, prompt_hash

FORMAT = (
    "Answer with only a JSON list holding one object per token, in the order given: "
    '[{"token": "...", "activation": N}, ...] where N is an integer from 0 to 10.'
)


class ParseFailure(ValueError):
    pass


def chat_messages(explanation: str, tokens: Sequence[str]) -> list[dict]:
    system = _read("simulator_system.txt").strip() + "\n" + FORMAT
    user = f"Explanation: {ENDING} {explanation}.\nTokens: {json.dumps(list(tokens), ensure_ascii=False)}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_reply(text: str) -> list[tuple[str, float, int]]:
    """[(token, activation, character offset of the number in `text`)]; ParseFailure otherwise."""
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end <= start:
        raise ParseFailure("no JSON list in the reply")
    try:
        items = json.loads(text[start : end + 1])
    except json.JSONDecodeError as e:
        raise ParseFailure(f"invalid JSON ({e.msg} at {e.pos})") from None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ParseFailure("the JSON is not a list of objects")
    # Locate each number in the raw text, in order, to read its logprobs later.
    numbers = [m for m in re.finditer(r'"activation"\s*:\s*(-?\d+(?:\.\d+)?)', text[start : end + 1])]
    out = []
    for n, item in enumerate(items):
        value = item.get("activation")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ParseFailure(f"item {n} has no numeric activation")
        offset = start + numbers[n].start(1) if n < len(numbers) else -1
        out.append((str(item.get("token", "")), float(min(max(value, 0), 10)), offset))
    return out


def align(subject_tokens: Sequence[str], reply: list[tuple[str, float, int]]) -> list[int | None]:
    """For each subject token, the index of the reply item that answers it (tokenizers differ)."""
    if len(reply) == len(subject_tokens):
        return list(range(len(reply)))
    a = [t.strip() for t in subject_tokens]
    b = [t.strip() for t, _, _ in reply]
    mapping: list[int | None] = [None] * len(a)
    for block in SequenceMatcher(a=a, b=b, autojunk=False).get_matching_blocks():
        for k in range(block.size):
            mapping[block.a + k] = block.b + k
    return mapping


def _logprob_values(result, reply) -> list[float | None]:
    """Expected values from the digit alternatives at each number's first character, if known."""
    if not result.top_logprobs:
        return [None] * len(reply)
    starts, pos = {}, 0
    for i, alternatives in enumerate(result.top_logprobs):
        if not alternatives:
            return [None] * len(reply)
        starts[pos] = i
        pos += len(alternatives[0][0])  # temperature 0: the chosen token is the most likely one
    out = []
    for _token, _value, offset in reply:
        i = starts.get(offset)
        digits = {} if i is None else {int(t.strip()): lp for t, lp in result.top_logprobs[i] if t.strip() in DIGITS}
        out.append(expected_value(digits))
    return out


class ChatJsonSimulator(Simulator):
    kind, takes_llm, prompt_files = "chat-json", "required", ("simulator_system.txt",)

    def __init__(self, llm, retries: int = 2, top_logprobs: int | None = 5, min_coverage: float = 1.0,
                 max_tokens: int = 2048):
        self.llm = llm
        self.retries = retries
        self.top_logprobs = top_logprobs
        self.min_coverage = min_coverage
        self.max_tokens = max_tokens
        self.name = f"chat-json:{getattr(llm, 'name', type(llm).__name__)}"

    @property
    def prompt_hash(self) -> str:
        return prompt_hash("simulator_system.txt") + ":json1"

    @property
    def thread_safe(self) -> bool:
        return getattr(self.llm, "thread_safe", False)

    def simulate(self, explanation: str, records: Sequence[Sequence[str]]) -> list[Simulation]:
        return self.simulate_many([explanation], records)[0]

    def simulate_many(self, explanations: Sequence[str], records: Sequence[Sequence[str]]) -> list[list[Simulation]]:
        """Every (explanation, record) pair's requests in flight together; retries per pair."""
        pairs = [(e, r) for e in explanations for r in records]
        pending = list(range(len(pairs)))
        sims: list[Simulation | None] = [None] * len(pairs)
        used = [[0, 0] for _ in pairs]
        extra = _per_item_errors(self.llm.chat)
        # A server LLM's response cache keys a conversation by its sample index: each retry is a new sample.
        takes_sample = _takes(self.llm.chat, "sample")
        for attempt in range(self.retries + 1):
            if not pending:
                break
            # Retries sample a little, otherwise temperature 0 would repeat the same broken reply.
            temperature = 0.0 if attempt == 0 else 0.7
            results = self.llm.chat([chat_messages(*pairs[i]) for i in pending],
                                    temperature=temperature, max_tokens=self.max_tokens,
                                    top_logprobs=self.top_logprobs, **extra,
                                    **({"sample": attempt} if takes_sample else {}))
            still = []
            for i, result in zip(pending, results):
                if isinstance(result, Exception):  # the request's own retries ran out: not asked again
                    sims[i] = Simulation(None, f"request failed: {getattr(result, 'problem', result)}")
                    continue
                used[i][0] += result.prompt_tokens
                used[i][1] += result.completion_tokens
                sims[i] = self._read(pairs[i][1], result)
                if not sims[i].ok:
                    still.append(i)
            pending = still
        for i, sim in enumerate(sims):
            sim.prompt_tokens, sim.completion_tokens = used[i]
            if not sim.ok and not sim.failure.startswith("request failed"):
                sim.failure = f"{sim.failure} (after {self.retries + 1} attempts)"
        n = len(records)
        return [sims[k * n: (k + 1) * n] for k in range(len(explanations))]

    def _read(self, tokens: Sequence[str], result) -> Simulation:
        try:
            reply = parse_reply(result.text)
        except ParseFailure as e:
            return Simulation(None, f"unparseable reply: {e}")
        mapping = align(tokens, reply)
        covered = sum(m is not None for m in mapping)
        if covered < self.min_coverage * len(tokens):
            return Simulation(None, f"reply covers {covered} of {len(tokens)} tokens")
        from_logprobs = _logprob_values(result, reply)
        values = []
        for m in mapping:
            if m is None:
                return Simulation(None, f"reply covers {covered} of {len(tokens)} tokens")
            values.append(from_logprobs[m] if from_logprobs[m] is not None else reply[m][1])
        return Simulation(values)
