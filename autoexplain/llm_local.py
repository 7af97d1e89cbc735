"""The local backend: a Hugging Face causal LM run in this process (`llm.py` describes the interface)."""

from __future__ import annotations

import math

from autoexplain.llm import LLM, ChatResult, Completion, PromptLogprobs, shares
from autoexplain.local_batch import local_batch_size, prompt_width, sample_seed


def _cut_at_stop(text: str, stop: list[str] | None) -> str:
    cuts = [i for s in stop or () if s and (i := text.find(s)) >= 0]
    return text[: min(cuts)] if cuts else text


def _merge_top(pairs) -> dict[str, float]:
    """Token strings to logprobs; ids that decode to the same string pool their probability."""
    out: dict[str, float] = {}
    for s, v in pairs:
        out[s] = v if s not in out else float(math.log(math.exp(out[s]) + math.exp(v)))
    return out


class LocalLLM(LLM):
    """A Hugging Face causal LM run in-process with transformers (in `subject.compute_dtype`).

    `batch_size` is rows per forward pass (None: `local_batch_size`'s default for the device);
    prompts of many units share a pass, and each prompt samples from its own generator."""

    def __init__(self, spec: str | None = None, *, subject=None, batch_size: int | None = None, device=None,
                 logits_budget: int = 1 << 27, seed: int = 0):
        super().__init__()
        self.seed = seed
        import torch

        from autoexplain.subject import load_subject

        self._torch = torch
        self.subject = subject or load_subject(spec, device=device)
        self.name = self.subject.name
        self.fingerprint, self.key_name = self.subject.fingerprint, self.subject.key_name  # `layer.key_name`
        self.model, self.tok = self.subject.model, self.subject.tokenizer
        self.batch_size, self.logits_budget = local_batch_size(self.model, batch_size), logits_budget
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tok.eos_token_id is not None and self.tok.eos_token_id not in eos:
            eos.append(self.tok.eos_token_id)
        self._eos = eos
        self._pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else (eos[0] if eos else 0)
        with_special = self.tok("x")["input_ids"]
        plain = self.tok("x", add_special_tokens=False)["input_ids"]
        self._prefix = with_special[: len(with_special) - len(plain)] if with_special[-len(plain):] == plain else []
        self._strs: dict[int, str] = {}

    @property
    def _device(self):
        return next(self.model.parameters()).device

    def _str(self, i: int) -> str:
        if i not in self._strs:
            self._strs[i] = self.tok.decode([i])
        return self._strs[i]

    @staticmethod
    def _batches(seqs: list[list[int]], per_batch: int):
        """Prompt indices, `per_batch` at a time, and their width (`prompt_width`): a prompt's
        shapes, and so its bf16 bits and samples, do not depend on the prompts sharing its batch."""
        width = lambda i: prompt_width(len(seqs[i]))  # noqa: E731
        for w in sorted({width(i) for i in range(len(seqs))}):
            group = sorted((i for i in range(len(seqs)) if width(i) == w), key=lambda i: len(seqs[i]))
            for s in range(0, len(group), per_batch):
                yield group[s: s + per_batch], w

    def _padded(self, seqs: list[list[int]], left: bool, width: int):
        """Left padding for generation (every prompt ends at the last column), right for scoring."""
        torch = self._torch
        ids = torch.full((len(seqs), width), self._pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, seq in enumerate(seqs):
            cols = slice(width - len(seq), width) if left else slice(0, len(seq))
            ids[r, cols], mask[r, cols] = torch.tensor(seq), 1
        return ids.to(self._device), mask.to(self._device), width

    def _generate(self, id_lists: list[list[int]], n: int, temperature: float, max_tokens: int, logits: bool,
                  seeds: list[int] | None = None, width: int | None = None):
        """Sample n continuations per prompt. The prompt is read once and its KV cache is copied n
        times (`generate(num_return_sequences=n)` would re-read the prompt n times), and only the
        last position's logits are computed during the prompt pass. `seeds`: one per prompt (see
        `_seeds`)."""
        torch = self._torch
        ids, mask, width = self._padded(id_lists, left=True, width=width or max(map(len, id_lists)))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        step_logits: list = []
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1)
            cache, last = out.cache, out.logits[:, -1]
            if n > 1:
                cache.batch_repeat_interleave(n)
                last, mask = last.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
            pos = positions[:, -1:].repeat_interleave(n, 0)
            done = torch.zeros(last.shape[0], dtype=torch.bool, device=last.device)
            eos = torch.tensor(self._eos or [-1], device=last.device)
            # One generator per prompt, never torch's global RNG nor one for the batch: a prompt's
            # samples are the same whatever ran before, in whichever thread or process, and whichever
            # prompts share its batch. Each step draws n x vocab uniforms per prompt, done or not, so
            # a prompt's k-th draw always serves its k-th token. The token is the argmax of logits
            # plus Gumbel noise (an exact sample of the softmax): the float noise of another batch
            # shape flips it only on a near tie of the top two (an inverse-CDF draw over the summed
            # vocabulary flipped a token of the tiny test model between batch sizes 6 and 1).
            gens = []
            for seed in (seeds if seeds is not None else [sample_seed(self.seed, i) for i in id_lists]):
                gens.append(torch.Generator(device=last.device))
                gens[-1].manual_seed(seed)
            rows = []
            for _ in range(max_tokens):
                if logits:
                    step_logits.append(last)
                if temperature > 0:
                    u = torch.cat([torch.rand(n, last.shape[-1], generator=g, device=last.device) for g in gens])
                    token = (last.float() / temperature - torch.log(-torch.log(u))).argmax(-1)
                else:
                    token = last.argmax(-1)
                token = torch.where(done, torch.full_like(token, self._pad), token)
                rows.append(token)
                done |= torch.isin(token, eos)
                if bool(done.all()):
                    break
                mask = torch.cat([mask, (~done).long()[:, None]], 1)
                pos = pos + 1
                out = self.model(input_ids=token[:, None], attention_mask=mask, position_ids=pos, cache=cache,
                                 use_cache=True)
                cache, last = out.cache, out.logits[:, -1]
        seqs = torch.stack(rows, 1).tolist() if rows else [[] for _ in range(last.shape[0])]
        cut = [row[: next((j for j, t in enumerate(row) if t in self._eos), len(row))] for row in seqs]
        return cut, step_logits

    def _seeds(self, encoded: list[list[int]], *settings) -> list[int]:
        """Per prompt, a seed from the prompt, the settings and how many times the same prompt came
        earlier in the call (a chat asks k samples as k copies of one conversation)."""
        seen: dict[tuple, int] = {}
        out = []
        for ids in encoded:
            copy = seen[tuple(ids)] = seen.get(tuple(ids), -1) + 1
            out.append(sample_seed(self.seed, ids, copy, *settings))
        return out

    def complete(self, prompts, n=1, temperature=1.0, max_tokens=60, stop=None):
        sinks = self._sinks()
        encoded = [self.tok(p)["input_ids"] for p in prompts]
        seeds = self._seeds(encoded, n, temperature, max_tokens)
        results: list[list[Completion]] = [[] for _ in prompts]
        for batch, width in self._batches(encoded, max(1, self.batch_size // n)):
            rows, _ = self._generate([encoded[i] for i in batch], n, temperature, max_tokens, logits=False,
                                     seeds=[seeds[i] for i in batch], width=width)
            for k, i in enumerate(batch):
                for row, prompt_share in zip(rows[k * n: (k + 1) * n], shares(len(encoded[i]), n)):
                    text = _cut_at_stop(self.tok.decode(row, skip_special_tokens=True), stop)
                    results[i].append(Completion(text, prompt_share, len(row)))
                self._record(sinks, len(encoded[i]), sum(c.completion_tokens for c in results[i]))
        return results

    def chat(self, messages_batch, temperature=0.0, max_tokens=1024, top_logprobs=None):
        torch, sinks = self._torch, self._sinks()
        texts = [self.tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages_batch]
        encoded = [self.tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        seeds = self._seeds(encoded, 1, temperature, max_tokens)
        results: list[ChatResult | None] = [None] * len(texts)
        for batch, width in self._batches(encoded, self.batch_size):
            rows, step_logits = self._generate([encoded[i] for i in batch], 1, temperature, max_tokens,
                                               logits=bool(top_logprobs), seeds=[seeds[i] for i in batch],
                                               width=width)
            for k, i in enumerate(batch):
                tops = None
                if top_logprobs:
                    tops = []
                    for s in range(len(rows[k])):
                        vals, ids = torch.log_softmax(step_logits[s][k].float(), -1).topk(top_logprobs)
                        tops.append([(self._str(t), float(v)) for t, v in zip(ids.tolist(), vals.tolist())])
                text = self.tok.decode(rows[k], skip_special_tokens=True)
                results[i] = ChatResult(text, tops, len(encoded[i]), len(rows[k]))
                self._record(sinks, len(encoded[i]), len(rows[k]))
        return results

    def prompt_logprobs(self, prompts, top=15):
        torch, sinks = self._torch, self._sinks()
        if not getattr(self.tok, "is_fast", False):
            raise UserError(f"the tokenizer of {self.name} is not a fast tokenizer", "prompt logprobs need its offset mapping")
        enc = [self.tok(p, add_special_tokens=False, return_offsets_mapping=True) for p in prompts]
        seqs = [self._prefix + e["input_ids"] for e in enc]
        vocab = self.model.get_output_embeddings().weight.shape[0]
        results: list[PromptLogprobs | None] = [None] * len(prompts)
        longest = prompt_width(max(map(len, seqs), default=1))
        per_batch = max(1, min(self.batch_size, self.logits_budget // (vocab * longest)))
        for batch, width in self._batches(seqs, per_batch):
            ids, mask, _ = self._padded([seqs[i] for i in batch], left=False, width=width)
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            for r, i in enumerate(batch):
                full, n_pre = seqs[i], len(self._prefix)
                tops: list[dict[str, float]] = [{}] if n_pre == 0 else []  # nothing predicts a first token
                for s in range(max(n_pre, 1) - 1, len(full) - 1, 256):  # logits at p-1 predict token p
                    chunk = logits[r, s: min(s + 256, len(full) - 1)].float()
                    vals, tids = torch.log_softmax(chunk, -1).topk(top)
                    for v_row, t_row in zip(vals.tolist(), tids.tolist()):
                        tops.append(_merge_top((self._str(t), v) for t, v in zip(t_row, v_row)))
                own = enc[i]["input_ids"]
                results[i] = PromptLogprobs([self._str(t) for t in own], [a for a, _b in enc[i]["offset_mapping"]],
                                            tops, len(full))
                self._record(sinks, len(full), 0)
        return results
