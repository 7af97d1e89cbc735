"""A subject's shape (layers, MLP units) from its config alone: a GGUF header, a folder's
config.json or the hub's config, never the weights, so that every parameter can be checked in
milliseconds before a model loads (`preflight`)."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from autoexplain import defaults
from autoexplain.errors import UserError


@dataclass(frozen=True)
class Shape:
    """What a subject offers, read from its config alone."""

    name: str
    n_layers: int
    n_units: int | None  # None: the config does not say (units are then checked after loading)
    n_positions: int | None = None  # the longest input its position embeddings allow; None: the config does not say

    @property
    def middle_layer(self) -> int:
        """The layer explained or recorded when none is named (15 of SmolLM2-135M's 0-29)."""
        return self.n_layers // 2


def units_of(cfg: dict) -> int | None:
    for key in ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "ffn_hidden_size"):
        if cfg.get(key):
            return int(cfg[key])
    width = cfg.get("n_embd") or cfg.get("hidden_size")
    return 4 * int(width) if width and cfg.get("model_type") in ("gpt2", "gpt_neo", "gptj") else None


def layers_of(cfg: dict) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if cfg.get(key):
            return int(cfg[key])
    return None


def positions_of(cfg: dict) -> int | None:
    """The context length a config gives, under the names architectures use for it."""
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length"):
        if cfg.get(key):
            return int(cfg[key])
    return None


def _gguf_config(path: Path) -> dict:
    stat = path.stat()
    return _gguf_header(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _gguf_header(path: str, mtime_ns: int, size: int) -> dict:
    """Parsed once per file version: the reader walks every field, the tokenizer's 49k included
    (seconds), and a model run checks the same file for every layer, in the CLI and in the flow."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        fields = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("tokenizer.")}
    except Exception as e:  # noqa: BLE001 - any parse failure means "not a GGUF we can read"
        raise UserError(f"{path} is not a readable GGUF file ({type(e).__name__})", "check the model file") from None
    arch = fields.get("general.architecture", "")
    return {"num_hidden_layers": fields.get(f"{arch}.block_count"),
            "intermediate_size": fields.get(f"{arch}.feed_forward_length"),
            "n_ctx": fields.get(f"{arch}.context_length")}


def read_shape(model: str) -> Shape:
    """Layers and units of a subject from its config (a GGUF header, config.json or the hub's
    config), without loading weights."""
    path = Path(defaults.resolve_model(model)).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file {path} does not exist", "check the model path")
        cfg = _gguf_config(path)
    elif path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a Hugging Face model folder (no config.json)",
                        "point it at a folder saved with save_pretrained, or a .gguf file")
        cfg = json.loads((path / "config.json").read_text())
    elif model.startswith(("/", "./", "../", "~")):  # a path, not a hub name: say so, not what the hub says of it
        raise UserError(f"model folder {path} does not exist", "check the path, or give a hub name or a .gguf file")
    else:
        try:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(model).to_dict()
        except (OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"cannot load model '{model}': {first[:160]}",
                        "give a local model folder, a .gguf file, or a hub name reachable from here") from None
    n_layers = layers_of(cfg)
    if not n_layers:
        raise UserError(f"the config of '{model}' names no layer count", "give a transformer causal LM")
    return Shape(model, n_layers, units_of(cfg), positions_of(cfg))
