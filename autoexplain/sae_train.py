"""A small TopK SAE (Gao et al. 2024) trained on the subject's own hidden states, on CPU, so the
embedded model has SAE latents to explain without downloading one.

The hidden states of one hook point are captured by hooks on the Hugging Face model
(`autoexplain.hooked`, which says what each point reads), stored in bf16 and shuffled; 5 % of them
are held out to measure the result: the fraction of variance explained (FVE) and the latents that
never fire on the held-out tokens.
The SAE is saved in SAELens 6.x format (`cfg.json` + `sae_weights.safetensors`), so SAELens and
`autoexplain.sae` read it back alike.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from autoexplain.errors import UserError
from autoexplain.hooked import capture  # noqa: F401 (where its callers and tests found it)
from autoexplain.sae_coder import HookPoint

# The TransformerLens name of each point, as the saved cfg.json names where the SAE reads
# (`sae_coder` maps these names back; the mlp.hook_in/hook_out pair reads the MLP module itself).
TL_HOOKS = {"resid_pre": "hook_resid_pre", "resid_post": "hook_resid_post", "mlp_out": "hook_mlp_out",
            "mlp_in": "ln2.hook_normalized", "mlp_module_in": "mlp.hook_in", "mlp_module_out": "mlp.hook_out"}
# SAELens tells a 6.x config from an older flat one by this version field alone.
SAELENS_CONFIG_GENERATION = "6.0.0"


@dataclass
class TrainConfig:
    latents: int = 4096
    k: int = 32
    batch: int = 1024  # tokens per step
    epochs: int = 1
    lr: float | None = None  # None: 2e-4 scaled by 1/sqrt(latents / 16384), Gao et al.'s rule, times 4 for short runs
    aux_alpha: float = 1 / 32
    seed: int = 0


@dataclass
class TrainReport:
    tokens_train: int
    tokens_eval: int
    steps: int
    fve: float
    fve_without_top_dim: float
    dead_fraction: float
    seconds_capture: float
    seconds_train: float


class TopKSAE(torch.nn.Module):
    def __init__(self, d_in: int, latents: int, k: int, b_dec: torch.Tensor, gen: torch.Generator):
        super().__init__()
        # Tied initialisation with unit decoder rows: every latent starts as a direction that can fire.
        W_dec = torch.randn(latents, d_in, generator=gen)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        self.W_dec = torch.nn.Parameter(W_dec)
        self.W_enc = torch.nn.Parameter(W_dec.T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(latents))
        self.b_dec = torch.nn.Parameter(b_dec.clone())
        self.k = k

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def decode_top(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        # Only k rows of W_dec per token: a gather instead of a dense [B, latents] product.
        return torch.einsum("bk,bkd->bd", values, self.W_dec[indices])

    def forward(self, x: torch.Tensor):
        pre = self.pre(x)
        top = pre.topk(self.k, dim=-1)
        values = top.values.relu()
        return self.decode_top(values, top.indices) + self.b_dec, pre, top.indices, values

    @torch.no_grad()
    def unit_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def fve(sae: TopKSAE, x: torch.Tensor, batch: int = 4096) -> tuple[float, float, torch.Tensor]:
    """Fraction of variance explained on x; the same without x's highest-variance dimension; and
    how often each latent fired. A handful of tokens with massive activations can put most of a
    residual stream's variance in one dimension (73-89 % on SmolLM2's layer 15, nearly all of it
    from 10 tokens in 10,000), where an SAE explains it easily: the second figure says how the SAE
    does on the rest."""
    err, fired = torch.zeros(x.shape[1], dtype=torch.float64), torch.zeros(sae.W_dec.shape[0], dtype=torch.long)
    with torch.no_grad():
        for s in range(0, len(x), batch):
            xb = x[s:s + batch].float()
            recon, _pre, idx, values = sae(xb)
            err += (xb - recon).double().pow(2).sum(0)
            fired += torch.bincount(idx[values > 0], minlength=len(fired))
    variance = (x.double() - x.double().mean(0)).pow(2).sum(0)
    rest = torch.ones_like(variance, dtype=torch.bool)
    rest[variance.argmax()] = False
    return (1 - err.sum() / variance.sum()).item(), (1 - err[rest].sum() / variance[rest].sum()).item(), fired


def train(states: torch.Tensor, cfg: TrainConfig, progress=None) -> tuple[TopKSAE, float, TrainReport]:
    """Train on states [N, d_in]; returns the SAE (weights for inputs scaled by the returned
    factor), that factor, and the held-out report."""
    gen = torch.Generator().manual_seed(cfg.seed)
    states = states[torch.randperm(len(states), generator=gen)]
    n_eval = max(1, len(states) // 20)
    held, data = states[:n_eval], states[n_eval:]
    if len(data) < cfg.batch:
        raise UserError(f"{len(data)} training tokens are fewer than one batch of {cfg.batch}", "pass more --tokens (or a longer corpus) or lower --batch-tokens")
    # Inputs scaled to mean squared norm d_in, so one learning rate fits every model and layer.
    d_in = states.shape[1]
    scale = (d_in / data[:65536].float().pow(2).sum(-1).mean()).sqrt().item()
    sae = TopKSAE(d_in, cfg.latents, cfg.k, data[:65536].float().mean(0) * scale, gen)
    lr = cfg.lr or 8e-4 / (cfg.latents / 16384) ** 0.5
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    steps_per_epoch = len(data) // cfg.batch
    total_steps = steps_per_epoch * cfg.epochs
    # A latent is dead for the auxiliary loss once it has missed this many training tokens.
    dead_after = min(50_000, max(cfg.batch, len(data) // 4))
    since_fired = torch.zeros(cfg.latents, dtype=torch.long)
    k_aux = min(d_in // 2, cfg.latents)
    started, step = time.perf_counter(), 0
    for _epoch in range(cfg.epochs):
        order = torch.randperm(len(data), generator=gen)
        for s in range(steps_per_epoch):
            x = data[order[s * cfg.batch:(s + 1) * cfg.batch]].float() * scale
            recon, pre, idx, values = sae(x)
            variance = (x - x.mean(0)).pow(2).sum()
            loss = (x - recon).pow(2).sum() / variance
            fired = torch.zeros(cfg.latents, dtype=torch.bool)
            fired[idx[values > 0]] = True
            since_fired = torch.where(fired, 0, since_fired + len(x))
            dead = since_fired > dead_after
            if dead.any():
                # AuxK: the dead latents' top k_aux try to explain what the live ones missed.
                aux = pre.masked_fill(~dead, float("-inf")).topk(min(k_aux, int(dead.sum())), dim=-1)
                residual = (x - recon).detach()
                aux_recon = sae.decode_top(aux.values.relu(), aux.indices)
                loss = loss + cfg.aux_alpha * (residual - aux_recon).pow(2).sum() / variance
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # Decay the learning rate linearly over the last fifth, as Gao et al. do.
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (total_steps - step) / max(1, total_steps // 5))
            opt.step()
            sae.unit_decoder()
            step += 1
            if progress:
                progress(step, total_steps)
    seconds = time.perf_counter() - started
    explained, explained_rest, fired = fve(sae, held.float() * scale)
    # The tokens trained on: whole batches only (the rest of each shuffled epoch is left out).
    report = TrainReport(min(len(data), steps_per_epoch * cfg.batch), len(held), step, explained, explained_rest, float((fired == 0).float().mean()), 0.0, seconds)
    return sae, scale, report


def save_saelens(sae: TopKSAE, scale: float, folder: Path, hook: HookPoint, model_name: str, context_size: int,
                 dataset: str, report: TrainReport) -> Path:
    """SAELens 6.x files; the input scale is folded into the weights, so they read raw activations.
    Written into a sibling folder that is renamed to `folder` once whole: `folder` is a coder or
    nothing, even when the process is stopped while writing."""
    import shutil
    import tempfile

    folder.parent.mkdir(parents=True, exist_ok=True)
    part = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        _write_saelens(sae, scale, part, hook, model_name, context_size, dataset, report)
        _as_umask_says(part)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()  # an empty folder made for it: a rename does not replace one everywhere
        try:
            part.rename(folder)
        except OSError:
            raise UserError(f"--to {folder} was filled by something else while the SAE trained",
                            "pass another --to, or delete that folder, and train again") from None
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise
    return folder


def _as_umask_says(folder: Path) -> None:
    """The modes a folder and its files get when made plainly: `mkdtemp` makes the folder 0700 and
    safetensors writes its weights 0600, so a coder shared with others (or read by a service's user)
    could not be opened by them."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def _write_saelens(sae: TopKSAE, scale: float, folder: Path, hook: HookPoint, model_name: str, context_size: int,
                   dataset: str, report: TrainReport) -> None:
    from safetensors.torch import save_file

    with torch.no_grad():
        tensors = {"W_enc": sae.W_enc * scale, "b_enc": sae.b_enc, "W_dec": sae.W_dec / scale, "b_dec": sae.b_dec / scale}
    save_file({n: t.detach().float().contiguous() for n, t in tensors.items()}, folder / "sae_weights.safetensors")
    cfg = {
        "d_in": sae.W_enc.shape[0], "d_sae": sae.W_enc.shape[1], "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
        "architecture": "topk", "k": sae.k, "rescale_acts_by_decoder_norm": False,
        "metadata": {"sae_lens_version": SAELENS_CONFIG_GENERATION, "sae_lens_training_version": None,
                     "model_name": model_name, "hook_name": f"blocks.{hook.layer}.{TL_HOOKS[hook.point]}",
                     "hook_head_index": None, "context_size": context_size, "prepend_bos": False,
                     "dataset_path": dataset, "trained_by": "autoexplain train-sae"},
    }
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2))
    (folder / "training.json").write_text(json.dumps(asdict(report), indent=2))


def check_target(folder: Path) -> None:
    """Before any training: `folder` (train-sae's --to) must be free. A coder there may be the one
    earlier runs were recorded with, so it is never replaced; nor is anything else."""
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return
    from autoexplain.sae_formats import GEMMASCOPE_FILE, SAELENS_FILES, SPARSIFY_FILES

    held = "a coder" if any((folder / f).is_file() for f in (*SAELENS_FILES, *SPARSIFY_FILES, GEMMASCOPE_FILE)) \
        else "files" if folder.is_dir() else "a file"
    raise UserError(f"--to {folder} already holds {held}, which train-sae would replace",
                    f"pass another --to (one per --k, --seed or --tokens you try), or delete {folder} to train it again")


def trained_on(subject) -> str:
    """The model a coder names as its own (SAELens `model_name`): the file or folder the subject was
    loaded from, absolute, or its hub id; never an alias ('smollm2'), which means nothing elsewhere."""
    return str(Path(subject.local_path).absolute()) if subject.local_path else subject.name


def collect_states(subject, hook: HookPoint, windows, batch_size: int = 32, progress=None) -> torch.Tensor:
    """Hidden states of every window's tokens but the first, as [N, d_model] bf16. The first token
    of a window has no context and, in most models, a residual norm tens of times the others':
    left in, it would take much of the reconstruction loss."""
    from autoexplain.record import windows_batches

    chunks, done = [], 0
    for _ids, tokens in windows_batches(windows, batch_size):
        states = capture(subject.model, hook, tokens.to(subject.device))
        chunks.append(states[:, 1:].reshape(-1, states.shape[-1]).to("cpu", torch.bfloat16))
        done += tokens.numel()
        if progress:
            progress(done, windows.n_windows * windows.window_len)
    return torch.cat(chunks)


def train_sae(subject, hook: HookPoint, windows, to: Path, cfg: TrainConfig, corpus: str,
              progress=None) -> TrainReport:
    """Capture, train, save: the whole `autoexplain train-sae`."""
    if not 0 <= hook.layer < subject.n_layers:
        raise UserError(f"layer {hook.layer} is out of range for {subject.name}, which has layers 0..{subject.n_layers - 1}",
                        f"pass --layer from 0 to {subject.n_layers - 1}")
    started = time.perf_counter()
    states = collect_states(subject, hook, windows, progress=progress and (lambda d, t: progress("capture", d, t)))
    captured = time.perf_counter() - started
    sae, scale, report = train(states, cfg, progress and (lambda d, t: progress("train", d, t)))
    report.seconds_capture = captured
    save_saelens(sae, scale, to, hook, trained_on(subject), windows.window_len, corpus, report)
    return report
