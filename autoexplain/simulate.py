"""Simulate: predict a unit's activation on each token of a record from its explanation alone.

Every simulator returns, per record, one expected activation (0-10 scale) per *subject* token, or a
failure with its reason. A failure is never turned into zeros: the scorer skips failed records and
reports how many there were.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Sequence

import torch

from autoexplain.components import Simulator  # noqa: F401 (the base class, also importable from here)
from autoexplain.explain import ENDING, escape_token, prompt_hash, read_prompt
from autoexplain.llm_local import LocalLLM
from autoexplain.local_batch import PREFIX_KWARG, local_batch_size, prefix_attention, prefix_keys_values
from autoexplain.llm import per_item_errors as _per_item_errors
from autoexplain.records import Simulation
from autoexplain.subject import Subject


# The prompt shared by the LLM simulators.

SIMULATOR_FILES = ("simulator_system.txt", "fewshot.json")
PLACEHOLDER = "unknown"
# A local pass pads each row to the next multiple of ROW_BUCKET tokens and batches only rows of one
# padded width: a row's shapes, and so its bits, are then the same whichever rows share its pass.
ROW_BUCKET = 8
DIGITS = [str(i) for i in range(11)]


def simulator_prompt_hash() -> str:
    return prompt_hash(*SIMULATOR_FILES)


def _example_blocks() -> tuple[str, int]:
    """The few-shot neurons with their true values, so the format is clear before the unknowns."""
    blocks = []
    neurons = json.loads(read_prompt("fewshot.json"))["neurons"]
    for n, neuron in enumerate(neurons, 1):
        records = "\n".join(
            "<start>\n" + "\n".join(f"{escape_token(t)}\t{v}" for t, v in rec) + "\n<end>" for rec in neuron["records"]
        )
        blocks.append(f"Neuron {n}\nExplanation: {ENDING} {neuron['explanation']}.\nActivations:\n{records}\n\n")
    return "".join(blocks), len(neurons) + 1


def simulator_prefix(explanation: str) -> str:
    """Everything before the target record's tokens: identical for every record of one unit."""
    system = read_prompt("simulator_system.txt").strip()
    examples, number = _example_blocks()
    return f"{system}\n\n{examples}Neuron {number}\nExplanation: {ENDING} {explanation}.\nActivations:\n<start>\n"


def simulator_body(tokens: Sequence[str]) -> tuple[str, list[int]]:
    """The record as `token<TAB>unknown` lines, and the character offset of each placeholder."""
    parts, offsets, pos = [], [], 0
    for t in tokens:
        line = f"{escape_token(t)}\t"
        offsets.append(pos + len(line))
        parts.append(f"{line}{PLACEHOLDER}\n")
        pos += len(line) + len(PLACEHOLDER) + 1
    return "".join(parts) + "<end>", offsets


def expected_value(digit_logprobs: dict[int, float]) -> float | None:
    """Renormalise the probability mass on "0".."10" and take the mean; None if no digit is there."""
    if not digit_logprobs:
        return None
    top = max(digit_logprobs.values())
    weights = {d: math.exp(lp - top) for d, lp in digit_logprobs.items()}
    return sum(d * w for d, w in weights.items()) / sum(weights.values())


def _failed_positions(values: list[float | None], n: int) -> Simulation:
    missing = sum(v is None for v in values)
    if missing:
        return Simulation(None, f"{missing} of {n} tokens had no digit among the top logprobs")
    return Simulation([float(v) for v in values])


class AllAtOnceSimulator(Simulator):
    """The reference simulator: one pass over `token<TAB>unknown` lines, digits' expected value.

    With a local model (an object with `.model` and `.tokenizer`) it reads the logits directly:
    the prompt up to the explanation is read once per simulator, and the records of every
    explanation, of one unit or of many (`simulate_jobs`), run in batches that attend to its KV
    cache in place (`local_batch.shared_prefix_attention`). With a server it asks for prompt
    logprobs (`echo=True`), one record per request unless `records_per_request` says more.
    """

    kind, takes_llm, prompt_files = "all-at-once", "optional", SIMULATOR_FILES
    selection = "halving"
    # One target record per prompt, as in the paper and as a local model reads it: a record packed
    # after others is read in their context (a tester saw shifts up to 0.53 on the 0-10 scale with
    # SmolLM2), so packed scores are neither the paper's nor the local model's. Packing N records
    # (`all-at-once/N:LLM`) pays the ~700-token prefix once per N records: a cost saving, opt-in.
    records_per_request = 1
    needs_prompt_logprobs = True

    def __init__(self, llm, batch_size: int | None = None, top_logprobs: int = 15, reuse_prefix: bool = True,
                 records_per_request: int | None = None):
        self.llm = llm
        self.top_logprobs = top_logprobs
        self.reuse_prefix = reuse_prefix
        if records_per_request is not None:
            if not isinstance(records_per_request, int) or records_per_request < 1:
                raise ValueError(f"records_per_request must be an integer of at least 1, got {records_per_request!r}")
            self.records_per_request = records_per_request
        # A LocalLLM wraps a Subject; a Subject itself also works. Anything else is a server.
        self.local = llm.subject if isinstance(llm, LocalLLM) else llm
        if not isinstance(self.local, Subject):
            self.local = None
        # Rows per forward pass: the LocalLLM's own setting, else the device's default.
        self.batch_size = batch_size or getattr(llm, "batch_size", None)
        if self.local is not None:
            self.batch_size = local_batch_size(self.local.model, self.batch_size)
        self._shared = None  # (text, ids, KV cache) of the prefix every explanation shares

    @property
    def prompt_hash(self) -> str:
        """Read at use, not at construction: an edited prompt file must change cache keys."""
        return simulator_prompt_hash()

    @property
    def name(self) -> str:
        """Its spec as content keys take it: records per request in it only where they pack (read at
        use, so a changed `records_per_request` is never keyed as the old one)."""
        packing = self.packing(self.records_per_request, self.local is None)
        return f"all-at-once{packing}:{getattr(self.llm, 'name', type(self.llm).__name__)}"

    @classmethod
    def shares_requests(cls, on_server: bool) -> bool:
        return on_server  # a local model reads each record in its own row

    def simulate(self, explanation: str, records: Sequence[Sequence[str]]) -> list[Simulation]:
        return self.simulate_many([explanation], records)[0]

    def simulate_many(self, explanations: Sequence[str], records: Sequence[Sequence[str]]) -> list[list[Simulation]]:
        """Each explanation on the records. On a server every (explanation, record) request of the
        call is in flight together, up to the LLM's concurrency."""
        return self.simulate_jobs([(explanations, records)])[0]

    def simulate_jobs(self, jobs: Sequence[tuple[Sequence[str], Sequence[Sequence[str]]]]) -> list[list[list[Simulation]]]:
        """`simulate_many` for several (explanations, records) at once, e.g. from many units: on a
        local model all their records share forward passes (`pipeline.simulate_stage` gathers the
        units' calls), on a server each is its own `simulate_many`."""
        if self.local is None:
            return [self._server(e, r) for e, r in jobs]
        return self._local(jobs)

    @property
    def thread_safe(self) -> bool:
        return self.local is None and self.llm.thread_safe

    @property
    def units_at_once(self) -> int:
        """Units whose simulations the stage gathers into one `simulate_jobs` call on a local model:
        each asks for at least two texts on a few records, so a quarter of the rows per pass fills
        the passes, and a unit's halving rounds wait for the slowest of no more units than that."""
        return max(1, self.batch_size // 4) if self.local is not None else 1

    def dollars(self, prompt_tokens, completion_tokens, cached_tokens=0):
        return 0.0 if self.local is not None else self.llm.dollars(prompt_tokens, completion_tokens, cached_tokens)

    # -- server: prompt logprobs ------------------------------------------------------------
    def _server(self, explanations, records):
        """One request per explanation and group of up to `records_per_request` records: the
        records follow the explanation one after another, each as its own <start>..<end> block."""
        bodies = [simulator_body(r) for r in records]
        step = self.records_per_request
        groups = [list(range(i, min(i + step, len(bodies)))) for i in range(0, len(bodies), step)]
        prompts, layout = [], []  # layout: per prompt, (explanation index, [(record, char start)])
        for e, explanation in enumerate(explanations):
            prefix = simulator_prefix(explanation)
            for group in groups:
                text, starts = prefix, []
                for n, r in enumerate(group):
                    text += "\n<start>\n" if n else ""
                    starts.append((r, len(text)))
                    text += bodies[r][0]
                prompts.append(text)
                layout.append((e, starts))
        results = self.llm.prompt_logprobs(prompts, top=self.top_logprobs, **_per_item_errors(self.llm.prompt_logprobs))
        out: list[list[Simulation | None]] = [[None] * len(bodies) for _ in explanations]
        for (e, starts), res in zip(layout, results):
            for n, (r, start) in enumerate(starts):
                if isinstance(res, Exception):  # retries ran out: these records failed, the rest go on
                    out[e][r] = Simulation(None, f"request failed: {getattr(res, 'problem', res)}")
                    continue
                out[e][r] = self._read_record(res, start, bodies[r][1])
                out[e][r].share(res, len(starts), n)
        return out

    @staticmethod
    def _read_record(res, start: int, offsets: list[int]) -> Simulation:
        """The expected value at each placeholder of a record whose body begins at `start`."""
        at = {off: i for i, off in enumerate(res.offsets)}
        values = []
        for off in offsets:
            i = at.get(start + off)
            top = res.top_logprobs[i] if i is not None and i < len(res.top_logprobs) else {}
            digits = {int(k.strip()): lp for k, lp in (top or {}).items() if k.strip() in DIGITS}
            values.append(expected_value(digits))
        return _failed_positions(values, len(offsets))

    # -- local: logits, rows of many units in one pass, one shared prefix ---------------------
    def _shared_prefix(self, tok, model, device):
        """The prompt up to "Explanation:", the same for every explanation of every unit, and its
        KV cache: read once per simulator, not once per explanation."""
        system, (examples, number) = read_prompt("simulator_system.txt").strip(), _example_blocks()
        text = f"{system}\n\n{examples}Neuron {number}\nExplanation:"
        if self._shared is None or self._shared[0] != text:  # an edited prompt file: read it again
            ids = tok(text, add_special_tokens=False)["input_ids"]
            cache = model.base_model(input_ids=torch.tensor([ids], device=device), use_cache=True).cache
            self._shared = (text, ids, cache, prefix_keys_values(cache))
        return self._shared[1], self._shared[2:]

    @torch.inference_mode()
    def _local(self, jobs):
        """Every (job, explanation, record) is one row; rows of all jobs are grouped by padded width
        (`ROW_BUCKET`) and run `batch_size` at a time, so a row's values do not depend on its
        batch-mates. A row whose prompt tokenises its start differently from the
        shared prefix (a merge across "Explanation:") is read whole, without the shared cache."""
        tok, model = self.local.tokenizer, self.local.model
        device = next(model.parameters()).device
        digit_ids = {d: tok.convert_tokens_to_ids(str(d)) for d in range(11)}
        # Only digits that are single tokens can be read at one position ("10" is two in many BPEs).
        digit_ids = {d: i for d, i in digit_ids.items() if i is not None and i != tok.unk_token_id
                     and tok.convert_ids_to_tokens(i) == str(d)}
        ids_tensor = torch.tensor(list(digit_ids.values()), device=device)
        shared, cache = self._shared_prefix(tok, model, device) if self.reuse_prefix else ([], None)
        prefixes: dict[str, list[int]] = {}
        rows = []  # (start, prompt ids after the start, placeholder positions in them, prompt tokens, where)
        for j, (explanations, records) in enumerate(jobs):
            bodies = [self._encode_body(tok, tokens) for tokens in records]
            for e, text in enumerate(explanations):
                if text not in prefixes:
                    prefixes[text] = tok(simulator_prefix(text), add_special_tokens=False)["input_ids"]
                pre = prefixes[text]
                start = len(shared) if shared and pre[: len(shared)] == shared else 0
                for r, (ids, positions) in enumerate(bodies):
                    shift = len(pre) - start
                    rows.append((start, pre[start:] + ids, [None if p is None else p + shift for p in positions],
                                 len(pre) + len(ids), (j, e, r)))
        out = [[[None] * len(records) for _ in explanations] for explanations, records in jobs]
        width = lambda row: -(-len(row[1]) // ROW_BUCKET) * ROW_BUCKET  # noqa: E731
        with prefix_attention(model) as shared_attention:
            for start, padded in sorted({(r[0], width(r)) for r in rows}):
                mine = [r for r in rows if r[0] == start and width(r) == padded]
                for b in range(0, len(mine), self.batch_size):
                    chunk = mine[b: b + self.batch_size]
                    logits = self._batch_logits(model, device, start, cache if start else None,
                                                [c[1] for c in chunk], padded, ids_tensor, shared_attention)
                    self._read_chunk(chunk, logits.tolist(), digit_ids, out)
        return out

    @staticmethod
    def _read_chunk(chunk, logits, digit_ids, out):
        """Each row's expected value at each placeholder, into out[job][explanation][record]."""
        for row, (_s, _ids, positions, n_tokens, (j, e, r)) in enumerate(chunk):
            # The logits that predict token p sit at p - 1; p >= 1 since a tab precedes it.
            values = [None if p is None else expected_value(dict(zip(digit_ids, logits[row][p - 1])))
                      for p in positions]
            out[j][e][r] = _failed_positions(values, len(positions))
            out[j][e][r].prompt_tokens = n_tokens

    @staticmethod
    def _encode_body(tok, tokens):
        body, offsets = simulator_body(tokens)
        enc = tok(body, add_special_tokens=False, return_offsets_mapping=True)
        starts = {a: i for i, (a, _b) in enumerate(enc["offset_mapping"])}
        return enc["input_ids"], [starts.get(o) for o in offsets]

    @staticmethod
    def _batch_logits(model, device, start, cache, rows, width, digit_rows, shared_attention=False):
        """The digits' logits at every position of the rows, which follow `start` cached tokens (or
        none), right-padded to `width`. Under the causal mask real positions never attend to the
        pads after them, so no attention mask is passed (an explicit all-ones mask makes SDPA ~3x
        slower on CPU). With `shared_attention` the rows attend to the one prefix cache in place
        (`local_batch.shared_prefix_attention`); else each row gets its own copy of it."""
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)
        kw = {}
        if cache is not None and shared_attention:
            kw[PREFIX_KWARG] = cache[1]
        elif cache is not None:
            kw["cache"] = copy.deepcopy(cache[0])
            kw["cache"].batch_repeat_interleave(len(rows))
            kw["use_cache"] = True
        positions = torch.arange(start, start + width, device=device).expand(len(rows), -1)
        kw.setdefault("use_cache", False)
        hidden = model.base_model(input_ids=ids, position_ids=positions, **kw).last_hidden_state
        # Only the digit rows of the output layer: the softmax over the whole vocabulary cancels when
        # the digits' mass is renormalised, and the full lm_head would dominate the cost.
        head = model.get_output_embeddings()
        weight = head.weight[digit_rows]
        bias = head.bias[digit_rows] if getattr(head, "bias", None) is not None else None
        return torch.nn.functional.linear(hidden, weight, bias).float()
