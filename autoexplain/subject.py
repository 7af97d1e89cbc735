"""The subject model: load any Hugging Face causal LM and expose its MLP hidden units.

A neuron is one input feature of the MLP's output projection: the post-activation of GPT-2-style
MLPs, and `act(gate) * up` in gated MLPs (Llama, SmolLM2, Qwen, Gemma). We read it with a forward
pre-hook on that projection, so no model code is patched; Llama-style models instead take the fused
pass of `autoexplain.fused`, the same computation in fewer, larger steps. Either pass stops right
after the highest requested layer: the layers above it and the lm_head are never run.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from autoexplain import defaults, files
from autoexplain.counters import COUNTS
from autoexplain.errors import UserError
from autoexplain.hooked import MLP_NAMES, UNITS, capture_points
from autoexplain.weights import model_digest

# Names of the MLP's output projection across architectures; its input is the neuron vector.
OUTPUT_PROJECTIONS = ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "fc_out", "w2")

MMAP_MB, TRIM_MB = 1024, 2047


def keep_freed_memory() -> bool:
    """Opt-in (AUTOEXPLAIN_KEEP_FREED=1): ask glibc to serve large blocks from the heap and keep
    freed memory for reuse.

    By default glibc maps the forward pass's larger buffers fresh from the kernel and unmaps them on
    free, so every batch page-faults them in again: 2.5 million minor faults per 30 batches on
    SmolLM2. Keeping them removes the faults and speeds the pass up by about 10 %, but the heap then
    holds on to its high-water mark: peak RSS of a 60k-token recording went from 1.18 to 2.31 GiB,
    over the 2 GiB budget, hence off by default. AUTOEXPLAIN_MALLOC_MB="MMAP,TRIM" sets the two
    thresholds. Returns whether the C library took the settings."""
    import ctypes

    if os.environ.get("AUTOEXPLAIN_KEEP_FREED", "0") != "1":
        return False
    mmap_mb, trim_mb = (int(x) for x in os.environ.get("AUTOEXPLAIN_MALLOC_MB", f"{MMAP_MB},{TRIM_MB}").split(","))
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, mmap_mb << 20)) and bool(libc.mallopt(m_trim_threshold, trim_mb << 20))
    except (OSError, AttributeError, ValueError):
        return False


@dataclass
class Subject:
    model: torch.nn.Module
    tokenizer: object
    name: str
    projections: list[torch.nn.Module]  # one output projection per layer
    n_units: int
    load_seconds: float = 0.0
    # What content keys know its weights by: for a model given by path, its content digest alone
    # (`weights.model_digest`), so that a copy elsewhere is the same model; for a hub model, its
    # name and commit.
    fingerprint: str = ""
    # The folder or file it was loaded from ('' for a hub model): for people, never for keys.
    local_path: str = ""
    _fused: object = field(default=None, repr=False)

    @property
    def n_layers(self) -> int:
        return len(self.projections)

    @property
    def key_name(self) -> str:
        """What content keys know it by in a component's name (`layer.key_name`): 'local' for a
        model given by path, whose `fingerprint` stands for it, else its name."""
        return "local" if self.local_path else self.name

    def made(self, recorded: str) -> bool:
        """Whether a recording's subject key (this `fingerprint` when it was made) names this model:
        equal, or, for a model given by path, 'NAME:DIGEST' as such keys were before they left the
        path's name out."""
        return _names(recorded, self.fingerprint, bool(self.local_path))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def check_layers(self, layers: list[int]) -> None:
        for layer in layers:
            if not 0 <= layer < self.n_layers:
                raise UserError(
                    f"layer {layer} is out of range for {self.name}, which has layers 0..{self.n_layers - 1}",
                    f"pass --layers with values from 0 to {self.n_layers - 1}",
                )

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def token_strings(self, ids: list[int]) -> list[str]:
        """Each id decoded alone, so byte-level markers become readable text."""
        return [self.tokenizer.decode([i]) for i in ids]

    @property
    def fused(self):
        """The fused pass (autoexplain.fused) when this model's layout has one, else None.
        Built on first use: its rearranged weights are only worth their memory when recording."""
        if self._fused is None:
            from autoexplain import fused

            use = os.environ.get("AUTOEXPLAIN_FUSED", "1") != "0" and fused.supports(self.model)
            self._fused = fused.FusedLlama(self.model) if use else False
        return self._fused or None

    @torch.inference_mode()
    def capture(self, input_ids: torch.Tensor, points, hooked: bool = False) -> dict[tuple[int, str], torch.Tensor]:
        """The tensors at several (layer, point)s from one pass that stops once it has them all.
        A point is `UNITS` (a layer's MLP hidden units, (B, T, units)) or a sparse coder's hook
        point (`sae_coder.POINTS`, (B, T, d_model)). The fused pass where the model has one, else
        (or with `hooked`) Hugging Face's own forward with a hook per point. A tensor does not
        depend on what else the pass captures: every point is read where the computation passes it."""
        COUNTS["subject_forward"] += 1
        ids = input_ids.to(self.device)
        if not hooked and self.fused is not None:
            return self.fused.capture(ids, points)
        return capture_points(self.model, self.projections, points, ids)

    def hidden_states(self, input_ids: torch.Tensor, hook, hooked: bool = False) -> torch.Tensor:
        """Hidden states (B, T, d_model) at a sparse coder's hook point (`sae_coder.HookPoint`)."""
        return self.capture(input_ids, [(hook.layer, hook.point)], hooked)[(hook.layer, hook.point)]

    def mlp_activations(self, input_ids: torch.Tensor, layers: list[int], hooked: bool = False) -> dict[int, torch.Tensor]:
        """Neuron activations (B, T, units) for each requested layer, from one truncated pass."""
        got = self.capture(input_ids, [(layer, UNITS) for layer in layers], hooked)
        return {layer: got[(layer, UNITS)] for layer in set(layers)}


def _find_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for _name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n and n:
            return list(module)
    return []


def _find_projection(block: torch.nn.Module) -> torch.nn.Module | None:
    for mlp_name in MLP_NAMES:
        mlp = getattr(block, mlp_name, None)
        if mlp is None:
            continue
        for proj_name in OUTPUT_PROJECTIONS:
            proj = getattr(mlp, proj_name, None)
            if proj is not None:
                return proj
    return None


def _in_features(proj: torch.nn.Module) -> int:
    if isinstance(proj, torch.nn.Linear):
        return proj.in_features
    # GPT-2's Conv1D stores the weight as (in, out).
    return int(proj.weight.shape[0])


def wrap(model: torch.nn.Module, tokenizer, name: str) -> Subject:
    """Find the MLP hidden units of a loaded model, or say clearly why we cannot."""
    blocks = _find_layers(model)
    projections = [_find_projection(b) for b in blocks]
    if not blocks or any(p is None for p in projections):
        raise UserError(
            f"model '{name}' ({type(model).__name__}) has no MLP layout that autoexplain understands",
            f"supported: transformer blocks with an `mlp` holding one of {', '.join(OUTPUT_PROJECTIONS)}",
        )
    return Subject(model.eval(), tokenizer, name, projections, _in_features(projections[0]))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache
def bf16_dot_products() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX). Elsewhere torch emulates
    bf16 matmuls: about as fast as float32 with AVX512, but about 100x slower than float32 with
    AVX2 alone (1.2 against 100-145 GFLOP/s on a 2-core AMD EPYC of family 25, model 1)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype a subject computes in: bf16 where the device multiplies it natively, else float32.
    A bf16 checkpoint's weights widen to float32 exactly, so both run the same model; only the
    rounding inside the pass differs, as it does between CPU kinds anyway."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type != "cpu" or bf16_dot_products() else torch.float32



def converted_gguf(path: Path) -> Path:
    """Dequantise a GGUF once into a safetensors folder (bf16) and return that folder.

    Dequantising takes seconds to tens of seconds; loading the converted copy takes about one.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    cached = defaults.cache_root() / "models" / f"{path.stem}-{model_digest(path)}"
    if (cached / "config.json").is_file():
        return cached
    # Dense weights, not packed GGUF blocks: bf16 GEMM is the fast path on CPU.
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tmp = files.temporary_folder_beside(cached)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(cached)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(tmp, ignore_errors=True)
    return cached


def load_tokenizer(spec: str | None = None):
    """Just the tokenizer of a subject (GGUF tokenizers come from the cached conversion)."""
    from transformers import AutoTokenizer

    path = Path(defaults.resolve_model(spec or defaults.SUBJECT)).expanduser()
    if path.suffix == ".gguf":
        path = converted_gguf(path)
    return AutoTokenizer.from_pretrained(path if path.exists() else spec)


def load_subject(spec: str | None = None, dtype: torch.dtype | None = None, device=None) -> Subject:
    """Load a subject model by hub name, local folder, or `.gguf` file (None: the embedded default),
    in `dtype` (None: `compute_dtype` of the device)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = spec or defaults.SUBJECT
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or compute_dtype(device)
    started = time.perf_counter()
    keep_freed_memory()
    path = Path(defaults.resolve_model(spec)).expanduser()
    try:
        if path.suffix == ".gguf":
            if not path.is_file():
                raise UserError(f"GGUF file {path} does not exist", "check the --model path")
            folder = converted_gguf(path)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(folder)
        elif path.exists():
            if not (path / "config.json").is_file():
                raise UserError(f"{path} is not a Hugging Face model folder (no config.json)", "point --model at a folder saved with save_pretrained, or a .gguf file")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path)
        else:
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(spec)
        fingerprint = fingerprint_of(spec, model.config)
    except UserError:
        raise
    except (OSError, ValueError) as e:
        raise _cannot_load(spec, e) from None
    subject = wrap(model.to(device), tokenizer, spec)
    subject.load_seconds = time.perf_counter() - started
    subject.fingerprint = fingerprint
    subject.local_path = str(path) if path.exists() else ""
    COUNTS["model_loads"] += 1
    return subject


def _names(recorded: str, fingerprint: str, local: bool) -> bool:
    return recorded == fingerprint or (local and recorded.endswith(":" + fingerprint))


def made_records(recorded: str, spec: str) -> bool:
    """`Subject.made` of the model `spec` names, from its fingerprint alone: no weights loaded."""
    return _names(recorded, fingerprint_of(spec), Path(defaults.resolve_model(spec)).expanduser().exists())


def fingerprint_of(spec: str | None, config=None) -> str:
    """What a subject's outputs depend on, without its weights: a local folder's or GGUF file's
    content digest (every file: weights, config, tokenizer; not its path or name), or a hub model's
    name and commit (from `config`, else from its config alone)."""
    spec = spec or defaults.SUBJECT
    path = Path(defaults.resolve_model(spec)).expanduser()
    if path.exists():
        return model_digest(path)  # its content alone: a copy in another folder is the same model
    if config is None:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(spec)
        except (OSError, ValueError) as e:
            raise _cannot_load(spec, e) from None
    return f"{spec}:{getattr(config, '_commit_hash', None) or 'hub'}"


def _cannot_load(spec: str, e: Exception) -> UserError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return UserError(f"cannot load model '{spec}': {first[:200]}",
                     "give a local model folder, a .gguf file, or a hub name reachable from here")


class PlannedSubject:
    """A subject known by its config and fingerprint, loaded (by `load`, given the spec) only when a
    stage asks for more: a stage whose output is already there (here or pulled from the URL) never
    loads the weights. Its layers are checked from the config, as `Subject.check_layers` does."""

    check_layers = Subject.check_layers

    def __init__(self, spec: str | None, load):
        from autoexplain.model_config import read_shape

        self.name = spec or defaults.SUBJECT
        shape = read_shape(self.name)
        self.n_layers, self._units = shape.n_layers, shape.n_units
        self.fingerprint = fingerprint_of(self.name)
        self._load, self._loaded = load, None

    @property
    def n_units(self) -> int:
        return self._units if self._units is not None else self.loaded.n_units

    @property
    def loaded(self) -> Subject:
        if self._loaded is None:
            self._loaded = self._load(self.name)
        return self._loaded

    def __getattr__(self, name):  # what needs the weights: the model, its tokenizer, a pass
        if name.startswith("_"):  # not set yet (a copy being made): never a reason to load
            raise AttributeError(name)
        return getattr(self.loaded, name)
