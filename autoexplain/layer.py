"""Explain a layer: the explain, simulate and score stages with their content-addressed outputs.

Each `run_*` function reads its inputs from disk, calls the pure stage function in `pipeline`,
and writes `<out>/<stage>/<key>/layer_<L>.parquet` plus a manifest. The key hashes the inputs'
keys, the parameters, the prompt hashes and the code version, so a rerun with nothing changed
returns at once and an edit recomputes only the stages downstream of it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.parquet as pq

from autoexplain import pipeline
from autoexplain.activations import read_units
from autoexplain.errors import UserError
from autoexplain.explain import explainer_prompt_hash
from autoexplain.storage import code_version, content_key, is_complete, read_manifest, stage_dir, write_manifest, write_table

DEFAULT_EXPLAINER = "local"
DEFAULT_SIMULATOR = "embedding"


@dataclass
class StageRef:
    """A finished stage output: its folder, key and the one table file in it."""

    directory: Path
    key: str
    layer: int

    @property
    def path(self) -> Path:
        return self.directory / f"layer_{self.layer}.parquet"

    @classmethod
    def of(cls, directory: str | Path) -> "StageRef":
        directory = Path(directory)
        if not is_complete(directory):
            raise UserError(f"{directory} is not a finished stage output (no manifest.json)",
                            "point at a folder printed by an earlier autoexplain command")
        m = read_manifest(directory)
        return cls(directory, m["key"], m["params"]["layer"])


def make_simulator(spec: str | None = None):
    """'embedding' (offline default), 'all-at-once[:LLM]' or 'chat-json:LLM' (LLM as in make_llm)."""
    spec = spec or DEFAULT_SIMULATOR
    kind, _, llm_spec = spec.partition(":")
    if kind == "embedding":
        from autoexplain.embedding import EmbeddingSimulator

        return EmbeddingSimulator()
    from autoexplain.llm import make_llm

    if kind == "all-at-once":
        from autoexplain.simulate import AllAtOnceSimulator

        return AllAtOnceSimulator(make_llm(llm_spec or "local"))
    if kind == "chat-json":
        from autoexplain.simulate_chat import ChatJsonSimulator

        return ChatJsonSimulator(make_llm(llm_spec or "local"))
    raise UserError(f"unknown simulator '{spec}'", "use 'embedding', 'all-at-once[:LLM]' or 'chat-json:LLM'")


def _records_inputs(records_dir: Path, layer: int):
    manifest = read_manifest(records_dir)
    if layer not in manifest["params"]["layers"]:
        raise UserError(f"layer {layer} was not recorded in {records_dir} (it has {manifest['params']['layers']})",
                        "record that layer first, or pass one of the recorded layers")
    windows = records_dir.parent.parent / "windows" / manifest["inputs"]["windows"] / "windows.parquet"
    return (records_dir / f"layer_{layer}.records.parquet", windows, manifest["key"])


def load_units(records_dir: str | Path, layer: int, units: list[int] | None = None):
    records_path, windows_path, _ = _records_inputs(Path(records_dir), layer)
    wanted = None if units is None else [(u, p) for u in units for p in (1, -1)]
    found = read_units(records_path, windows_path, wanted)
    if units is not None and not found:
        raise UserError(f"none of units {units[0]}..{units[-1]} exist in layer {layer}", "check --units")
    return found


def run_explain(records_dir, layer: int, out, units=None, explainer=None, cfg=None, llm=None) -> StageRef:
    records_dir = Path(records_dir)
    cfg = cfg or pipeline.ExplainConfig()
    _, _, records_key = _records_inputs(records_dir, layer)
    spec = explainer or DEFAULT_EXPLAINER
    params = {"layer": layer, "units": units, "explainer": spec, "config": asdict(cfg),
              "prompt": explainer_prompt_hash()}
    key = content_key({"records": records_key, **params, "code": code_version("explain", "pipeline", "llm")})
    ref = StageRef(stage_dir(out, "explanations", key), key, layer)
    if is_complete(ref.directory):
        return ref
    if llm is None:
        from autoexplain.llm import make_llm

        llm = make_llm(spec)
    table = pipeline.explain_stage(load_units(records_dir, layer, units), llm, cfg)
    write_table(table, ref.path, "explanations")
    write_manifest(ref.directory, "explanations", key, {"records": str(records_dir)}, params, [ref.path.name])
    return ref


def run_simulate(records_dir, explanations: StageRef, out, simulator=None, sim=None, seed: int = 0) -> StageRef:
    sim = sim or make_simulator(simulator)
    layer = explanations.layer
    params = {"layer": layer, "simulator": sim.name, "prompt": getattr(sim, "prompt_hash", ""), "seed": seed}
    key = content_key({"explanations": explanations.key, **params,
                       "code": code_version("simulate", "simulate_chat", "embedding", "pipeline")})
    ref = StageRef(stage_dir(out, "simulations", key), key, layer)
    if is_complete(ref.directory):
        return ref
    table = pq.read_table(explanations.path)
    units = sorted(set(table.column("unit").to_pylist()))
    chosen, sims = pipeline.simulate_stage(load_units(records_dir, layer, units), table, sim, seed)
    write_table(sims, ref.path, "simulations")
    write_table(chosen, ref.directory / "chosen.parquet", "explanations")
    write_manifest(ref.directory, "simulations", key,
                   {"records": str(records_dir), "explanations": str(explanations.directory)}, params,
                   [ref.path.name, "chosen.parquet"])
    return ref


def run_score(records_dir, simulations: StageRef, out, n_boot: int = 1000, seed: int = 0) -> StageRef:
    layer = simulations.layer
    params = {"layer": layer, "n_boot": n_boot, "seed": seed}
    key = content_key({"simulations": simulations.key, **params, "code": code_version("scoring", "pipeline")})
    ref = StageRef(stage_dir(out, "scores", key), key, layer)
    if is_complete(ref.directory):
        return ref
    sims = pq.read_table(simulations.path)
    chosen = pq.read_table(simulations.directory / "chosen.parquet")
    units = sorted(set(sims.column("unit").to_pylist()))
    table = pipeline.score_stage(load_units(records_dir, layer, units), sims, chosen, n_boot, seed)
    write_table(table, ref.path, "scores")
    write_manifest(ref.directory, "scores", key, {"simulations": str(simulations.directory)}, params, [ref.path.name])
    return ref
