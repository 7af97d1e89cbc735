"""The JSON chat simulator, for chat-only APIs that return no prompt logprobs.

The model gets the explanation and the tokens of `records_per_request` records (one unless
`chat-json/N:LLM` packs N), and answers
at temperature 0 with one JSON list of `{"token", "activation"}` objects per record. Where the API returns `top_logprobs`, the
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

from autoexplain.explain import ENDING, read_prompt
from autoexplain.llm import accepts as _takes
from autoexplain.llm import per_item_errors as _per_item_errors
from autoexplain.simulate import DIGITS, Simulation, Simulator, expected_value, prompt_hash

FORMAT = (
    "Answer with only a JSON list holding one list per record, in the order given, each holding one "
    'object per token of that record, in order: [[{"token": "...", "activation": N}, ...], ...] where N '
    "is an integer from 0 to 10."
)


class ParseFailure(ValueError):
    pass


def chat_messages(explanation: str, records: Sequence[Sequence[str]]) -> list[dict]:
    """One request for several records of one explanation: the explanation comes first, so that a
    provider's prefix cache holds it for every request of the unit."""
    system = read_prompt("simulator_system.txt").strip() + "\n" + FORMAT
    listed = json.dumps([list(r) for r in records], ensure_ascii=False)
    user = f"Explanation: {ENDING} {explanation}.\nRecords ({len(records)}), each a list of tokens: {listed}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


_NUMBER = re.compile(r'"activation"\s*:\s*(-?\d+(?:\.\d+)?)')


def _items(items, numbers: list, first: int, where: str) -> list[tuple[str, float, int]]:
    """[(token, activation, character offset of the number)] of one record's objects; `numbers` are
    the matches of every number in the reply, `first` the index of this record's first one."""
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ParseFailure(f"{where} is not a list of objects")
    out = []
    for n, item in enumerate(items):
        value = item.get("activation")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ParseFailure(f"{where}: item {n} has no numeric activation")
        offset = numbers[first + n].start(1) if first + n < len(numbers) else -1
        out.append((str(item.get("token", "")), float(min(max(value, 0), 10)), offset))
    return out


def _json_span(text: str):
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end <= start:
        raise ParseFailure("no JSON list in the reply")
    try:
        return json.loads(text[start : end + 1]), list(_NUMBER.finditer(text, start, end + 1))
    except json.JSONDecodeError as e:
        raise ParseFailure(f"invalid JSON ({e.msg} at {e.pos})") from None


def parse_reply(text: str) -> list[tuple[str, float, int]]:
    """One record's flat list: [(token, activation, character offset of the number in `text`)]."""
    items, numbers = _json_span(text)
    return _items(items, numbers, 0, "the JSON")


def parse_replies(text: str, n: int) -> list:
    """A packed reply: per record, its items (as `parse_reply`) or the ParseFailure that explains
    why it has none. A flat list answers a single record."""
    try:
        lists, numbers = _json_span(text)
    except ParseFailure as e:
        return [e] * n
    if n == 1 and isinstance(lists, list) and lists and all(isinstance(i, dict) for i in lists):
        lists = [lists]
    if not isinstance(lists, list):
        return [ParseFailure("the JSON is not a list")] * n
    out, first = [], 0
    for r in range(n):
        if r >= len(lists):
            out.append(ParseFailure(f"the reply holds {len(lists)} lists for {n} records"))
            continue
        try:
            out.append(_items(lists[r], numbers, first, f"list {r + 1}"))
        except ParseFailure as e:
            out.append(e)
        first += len(lists[r]) if isinstance(lists[r], list) else 0
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
    selection = "halving"
    # One record per request by default, as the all-at-once simulator and for the same reason: a
    # record answered in one reply with others is judged beside them, and a model that writes its
    # activations in sequence carries the earlier lists into the later ones. Packing N records
    # (`chat-json/N:LLM`) pays the instructions and explanation once per N: a cost saving, opt-in.
    # A packed record whose part of the reply fails is retried, grouped with the others that failed.
    # With a local LLM too the records share its prompt, so N keys its outputs there as well.
    records_per_request = 1

    def __init__(self, llm, retries: int = 2, top_logprobs: int | None = 5, min_coverage: float = 1.0,
                 max_tokens: int = 2048, records_per_request: int | None = None):
        self.llm = llm
        self.retries = retries
        self.top_logprobs = top_logprobs
        self.min_coverage = min_coverage
        self.max_tokens = max_tokens  # per record; a request may use that many per record it holds
        if records_per_request is not None:
            if not isinstance(records_per_request, int) or records_per_request < 1:
                raise ValueError(f"records_per_request must be an integer of at least 1, got {records_per_request!r}")
            self.records_per_request = records_per_request

    @property
    def name(self) -> str:
        """Records per request in it where they are not the default (read at use, as in `simulate`)."""
        return f"chat-json{self.packing(self.records_per_request, True)}:{getattr(self.llm, 'name', type(self.llm).__name__)}"

    @property
    def prompt_hash(self) -> str:
        return prompt_hash("simulator_system.txt") + ":json2"

    @property
    def thread_safe(self) -> bool:
        return self.llm.thread_safe

    def dollars(self, prompt_tokens, completion_tokens, cached_tokens=0):
        return self.llm.dollars(prompt_tokens, completion_tokens, cached_tokens)

    def simulate(self, explanation: str, records: Sequence[Sequence[str]]) -> list[Simulation]:
        return self.simulate_many([explanation], records)[0]

    def _groups(self, pending: list[int], pairs) -> list[list[int]]:
        """Pending pairs in requests of up to `records_per_request`, one explanation per request."""
        by_text: dict[str, list[int]] = {}
        for i in pending:
            by_text.setdefault(pairs[i][0], []).append(i)
        step = self.records_per_request
        return [ids[j : j + step] for ids in by_text.values() for j in range(0, len(ids), step)]

    def simulate_many(self, explanations: Sequence[str], records: Sequence[Sequence[str]]) -> list[list[Simulation]]:
        """Every request of the call in flight together; the records that fail are retried."""
        pairs = [(e, r) for e in explanations for r in records]
        pending = list(range(len(pairs)))
        sims: list[Simulation | None] = [None] * len(pairs)
        used = [Simulation(None) for _ in pairs]  # each record's token tally over its attempts
        extra = _per_item_errors(self.llm.chat)
        # A server LLM's response cache keys a conversation by its sample index: each retry is a new sample.
        takes_sample = _takes(self.llm.chat, "sample")
        for attempt in range(self.retries + 1):
            if not pending:
                break
            groups = self._groups(pending, pairs)
            # Retries sample a little, otherwise temperature 0 would repeat the same broken reply.
            temperature = 0.0 if attempt == 0 else 0.7
            results = self.llm.chat([chat_messages(pairs[g[0]][0], [pairs[i][1] for i in g]) for g in groups],
                                    temperature=temperature, max_tokens=self.max_tokens * max(map(len, groups)),
                                    top_logprobs=self.top_logprobs, **extra,
                                    **({"sample": attempt} if takes_sample else {}))
            still = []
            for group, result in zip(groups, results):
                if isinstance(result, Exception):  # the request's own retries ran out: not asked again
                    for i in group:
                        sims[i] = Simulation(None, f"request failed: {getattr(result, 'problem', result)}")
                    continue
                parts = parse_replies(result.text, len(group))
                for n, (i, part) in enumerate(zip(group, parts)):
                    used[i].share(result, len(group), n)
                    sims[i] = self._read(pairs[i][1], result, part)
                    if not sims[i].ok:
                        still.append(i)
            pending = still
        for i, sim in enumerate(sims):
            sim.prompt_tokens, sim.completion_tokens, sim.cached_tokens = (
                used[i].prompt_tokens, used[i].completion_tokens, used[i].cached_tokens)
            if not sim.ok and not sim.failure.startswith("request failed"):
                sim.failure = f"{sim.failure} (after {self.retries + 1} attempts)"
        n = len(records)
        return [sims[k * n: (k + 1) * n] for k in range(len(explanations))]

    def _read(self, tokens: Sequence[str], result, reply) -> Simulation:
        if isinstance(reply, ParseFailure):
            return Simulation(None, f"unparseable reply: {reply}")
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
