"""One batch of a sparse coder's latents held as its non-zero entries.

A 16,384-latent TopK SAE fires 32 latents per token: a batch of 2,048 tokens is 65k non-zeros in a
33-million-entry dense tensor. Recording reads a batch three ways (running statistics, each
latent's best windows, the reservoir sample), and a pass over the dense tensor for each of them
cost more than the encoding itself. From the entries, each of those touches only the latents that
fired, and the one dense thing built per batch is each window's maximum per latent (windows x
latents, 64 times smaller than tokens x latents at 64-token windows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SparseLatents:
    """The non-zero entries of a (windows, tokens, latents) batch: entry i is latent `latent[i]` at
    token `token[i]` of the batch's window `window[i]`, with value `value[i]` > 0 (float32)."""

    shape: tuple[int, int, int]
    window: torch.Tensor  # int64
    token: torch.Tensor  # int64
    latent: torch.Tensor  # int64
    value: torch.Tensor  # float32

    @classmethod
    def from_dense(cls, acts: torch.Tensor) -> "SparseLatents":
        """From a dense (B, T, U) batch of non-negative latents: one scan for its non-zeros."""
        nz = acts.nonzero()
        window, token, latent = nz.unbind(1)
        return cls(tuple(acts.shape), window, token, latent, acts[window, token, latent].float())

    @classmethod
    def from_topk(cls, indices: torch.Tensor, values: torch.Tensor, n_latents: int) -> "SparseLatents":
        """From each token's k chosen latents, `indices` and `values` (B, T, k); a chosen latent
        whose value is 0 (a ReLU'd non-positive pre-activation) is no entry, as in the dense form."""
        B, T, k = indices.shape
        keep = (values > 0).reshape(-1).nonzero().squeeze(1)
        window = keep // (T * k)
        token = keep // k % T
        return cls((B, T, n_latents), window, token, indices.reshape(-1)[keep], values.reshape(-1)[keep].float())

    def cpu(self) -> "SparseLatents":
        return SparseLatents(self.shape, *(t.cpu() for t in (self.window, self.token, self.latent, self.value)))

    def dense(self) -> torch.Tensor:
        out = torch.zeros(self.shape)
        out[self.window, self.token, self.latent] = self.value
        return out

    def window_max(self) -> torch.Tensor:
        """(B, U) float32: each window's maximum per latent, 0 where the latent did not fire."""
        B, _, U = self.shape
        out = torch.zeros(B * U)
        out.scatter_reduce_(0, self.window * U + self.latent, self.value, "amax")
        return out.view(B, U)

    def windows(self, rows: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """(E, T) float32: the per-token values of latent `latents[e]` in window `rows[e]`, for
        each of E distinct (window, latent) pairs: what `dense()[rows, :, latents]` is."""
        out = torch.zeros((len(rows), self.shape[1]))
        e, i = self._pairs(rows, latents)
        out[e, self.token[i]] = self.value[i]
        return out

    def write(self, target: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor, latents: torch.Tensor) -> None:
        """For each of E distinct (window, latent) pairs, the latent's entries in that window into
        `target[slots[e], token, latents[e]]` ((slots, T, U), any float dtype); every other
        position of `target` is left as it is."""
        e, i = self._pairs(rows, latents)
        target[slots[e], self.token[i], self.latent[i]] = self.value[i].to(target.dtype)

    def _pairs(self, rows: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(e, i): entry i lies in pair e, for every entry that lies in one of the pairs."""
        B, _, U = self.shape
        pair = torch.full((B * U,), -1, dtype=torch.int64)
        pair[rows * U + latents] = torch.arange(len(rows))
        e = pair[self.window * U + self.latent]
        i = (e >= 0).nonzero().squeeze(1)
        return e[i], i
