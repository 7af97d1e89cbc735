"""The component interfaces: `Explainer`, `Simulator` and `Scorer` (the `LLM` base lives in
`llm.py`, the `UnitSource` one in `sources.py`).

A component says what it is as class-level data, readable without building it or loading a model:
- `kind`: the first word of its spec string ('embedding', 'all-at-once', ...), the name the
  registry (`autoexplain.registry`) knows it by;
- `takes_llm`: whether the spec takes an LLM after a colon: "none", "optional" (default 'local') or
  "required". A component that takes one receives the built LLM as its first constructor argument;
- `prompt_files`: the prompt files (in `explain.prompts_dir()`) whose text its outputs depend on;
- `settings`: any other class-level value its outputs depend on (a format version, a constant).
The registry derives a component's identity (`registry.simulator_identity`) from these alone.

Optional capabilities are methods with a default that does nothing (or the plain thing), plus a
flag where the caller must prepare data first. Nothing is discovered with `hasattr`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Sequence

if TYPE_CHECKING:
    import numpy as np

    from autoexplain.records import ActivationRecord, Explanation, Simulation
    from autoexplain.scoring import Score

LLM_ARGS = ("none", "optional", "required")


class Component:
    """What every explainer and simulator declares about itself (see the module docstring)."""

    kind: ClassVar[str] = ""
    takes_llm: ClassVar[str] = "none"
    prompt_files: ClassVar[tuple[str, ...]] = ()
    settings: ClassVar[dict[str, Any]] = {}
    # Capability: it embeds words, and wants the corpus's word table (`wordvecs.word_table`) given
    # through `add_words` before its first call. It then provides `encode_words` and `encoding`.
    uses_word_table: ClassVar[bool] = False
    # Capability: it may be called from many threads at once (a server LLM behind it), so a stage
    # sends many units' requests together, up to its LLM's `max_concurrency`.
    thread_safe: bool = False
    # Need: its server LLM must return prompt logprobs (echo=True), which the preflight asks the
    # server for with one request before any work.
    needs_prompt_logprobs: ClassVar[bool] = False

    name: str  # this instance's name as stored in output rows (may carry its settings and model)
    llm: Any = None  # the `llm.LLM` it calls (or a local `subject.Subject`), None for none

    def dollars(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float | None:
        """What a request of these tokens cost (`prices`): 0 for a component that calls no paid LLM,
        None when its model has no known price."""
        return 0.0

    def encode_words(self, words: Sequence[str]) -> "np.ndarray":
        """Embed a whole word list (only for `uses_word_table` components)."""
        raise NotImplementedError(f"{type(self).__name__} does not embed words")

    def add_words(self, words: Sequence[str], vectors: "np.ndarray") -> None:
        """Take precomputed word embeddings (only called when `uses_word_table`)."""


class Explainer(Component):
    """Writes k candidate explanations per unit from the unit's shown (train) records.

    Capability: `uses_outputs` (default False) says it also reads what each unit writes;
    `explain_records` then gets `outputs`, one line per unit (`explain.output_line`) or None."""

    uses_outputs: ClassVar[bool] = False

    def explain_records(self, units: Sequence[Sequence["ActivationRecord"]], k: int = 4, temperature: float = 1.0,
                        max_tokens: int = 60, chat: bool = False) -> list["Explanation"]:
        """One Explanation per unit. The sampling settings are for explainers that sample; others
        ignore them."""
        raise NotImplementedError

    def units_per_call(self, k: int) -> int | None:
        """How many units `explain_records` should get at once to fill one forward pass of a local
        model (k samples each); None: no preference (`ExplainConfig.batch_units` decides)."""
        return None


class Simulator(Component):
    """Maps (explanation, records' tokens) to per-token predictions.

    Optional capabilities, each with a default:
    - `simulate_many`: several explanations on the same records (default: `simulate` in a loop);
    - `warm(texts)`: prepare for these explanations in one batch (default: nothing);
    - `uses_text_vectors`: it embeds explanation texts, and takes them precomputed through
      `add_texts` (from `warm`'s return value, kept beside the outputs: `text_vectors`); it then
      provides `embedder` and `encoding`;
    - `fresh()`: a twin with the same loaded model and empty caches, for one shard (default: itself,
      for a simulator whose results never depend on what it simulated before);
    - `prompt_dependence(texts)`: for each text, a digest of what of the prompt its simulations
      depend on (default: the whole prompt's hash). The per-unit memo is keyed by it, so a prompt
      edit recomputes only the units whose simulations it can change;
    - `simulate_jobs(jobs)`: `simulate_many` for several (explanations, records) at once, with
      `units_at_once` > 1 when the stage should gather that many units' calls into one (a local
      model that reads rows of many units per forward pass; default: one after another, 1).
    """

    uses_text_vectors: ClassVar[bool] = False
    # Records of one explanation that share one LLM request by default (`KIND/N:LLM` in a spec sets
    # N, `registry`); None: it never puts two records in one prompt. A record's values then depend
    # on its neighbours there, so N is part of what a simulator's outputs are keyed by wherever it
    # can change them (`packing`).
    records_per_request: ClassVar[int | None] = None
    # How best-of-k is chosen on the valid split (`best_of_k`): "full" (every candidate on every
    # record) or "halving" (successive halving, for simulators that pay per request).
    selection: ClassVar[str] = "full"
    prompt_hash: str = ""  # the hash of the prompt it read, stored with its outputs

    def simulate(self, explanation: str, records: Sequence[Sequence[str]]) -> list["Simulation"]:
        """records: each record's subject tokens, as decoded strings. One Simulation per record."""
        raise NotImplementedError

    def simulate_many(self, explanations: Sequence[str], records: Sequence[Sequence[str]]) -> list[list["Simulation"]]:
        return [self.simulate(text, records) for text in explanations]

    def simulate_jobs(self, jobs: Sequence[tuple[Sequence[str], Sequence[Sequence[str]]]]) -> list[list[list["Simulation"]]]:
        return [self.simulate_many(texts, records) for texts, records in jobs]

    units_at_once: int = 1

    def warm(self, explanations: Sequence[str]):
        """Prepare for these explanations at once. With `uses_text_vectors`: returns, as a dict of
        named lists or arrays, what `add_texts` takes back (their embeddings, ...)."""
        return None

    def add_texts(self, **kept) -> bool:
        """Take back what `warm` returned, in this or another process (only called when
        `uses_text_vectors`). False: some of it is missing or stale, and `warm` should run again."""
        return True

    def fresh(self) -> "Simulator":
        return self

    def prompt_dependence(self, texts: Sequence[str]) -> list[str]:
        return [self.prompt_hash] * len(texts)

    @classmethod
    def shares_requests(cls, on_server: bool) -> bool:
        """Whether records per request can change its results with such an LLM (a server or a local
        model): by default wherever it packs records at all."""
        return cls.records_per_request is not None

    @classmethod
    def packing(cls, per_request: int | None, on_server: bool) -> str:
        """What its spec and name carry of records per request: '/N' where N can change its results
        and is not its default, else '' (so `KIND/1:LLM` and `KIND:LLM` are one key)."""
        if per_request is None or per_request == cls.records_per_request or not cls.shares_requests(on_server):
            return ""
        return f"/{per_request}"


class Scorer(Component):
    """Measures how well one explanation of a unit accounts for the unit's true activations.

    `score` gets the explanation, the unit's records to score (each with its true activations) and,
    when `needs_simulations`, a simulator's `Simulation` of the explanation on each of those records,
    in the same order. It returns one `scoring.Score` per metric, keyed by the metric's name.

    Capability: `needs_simulations` (default True) says it scores the simulate stage's predictions.
    A scorer that asks its own LLM about the explanation instead (detection, fuzzing) sets it False,
    takes an LLM (`takes_llm`) and is given `simulations=None`.
    """

    needs_simulations: ClassVar[bool] = True

    def score(self, explanation: str | None, records: Sequence["ActivationRecord"],
              simulations: Sequence["Simulation"] | None, *, n_boot: int = 1000,
              seed: int = 0) -> dict[str, "Score"]:
        raise NotImplementedError
