"""The commands beside the pipeline's stages: export and import (the reference dataset's layout),
view (the static site, or serving it), publish (a dataset) and train-sae. `autoexplain.cli` lists
them after the stage commands."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer

from autoexplain import defaults, preflight
from autoexplain.cli_common import WINDOW_LEN, records_layer
from autoexplain.console import err, progress_bar, run_or_exit
from autoexplain.errors import UserError


def export_cmd(
    records: Path = typer.Option(..., "--records", "-r", help="The records folder the scores came from."),
    scores: Path = typer.Option(..., "--scores", "-c", help="A folder printed by `autoexplain score`."),
    to: Path = typer.Option(..., "--to", help="Folder to write neurons/<layer>/<n>.json and explanations/<layer>/<n>.jsonl into."),
):
    """Export records, explanations and scored simulations in the reference dataset's JSON layout."""
    import pyarrow.parquet as pq

    from autoexplain.interop import export_layer
    from autoexplain import layout
    from autoexplain.layer import StageRef, load_units
    from autoexplain.storage import read_manifest, require_recording

    def go():
        preflight.check_out(str(to), preflight.cli_flag, "to")
        score_ref = StageRef.of(scores, "scores")
        records_layer(records, score_ref.layer)
        require_recording(score_ref.directory, records)
        scored = read_manifest(score_ref.directory)["inputs"]["simulations"]
        sims_ref = StageRef.of(layout.input_of(score_ref.directory, scored))
        sims = pq.read_table(sims_ref.path)
        units = load_units(records, score_ref.layer, sorted(set(sims.column("unit").to_pylist())))
        n = export_layer(to, units, pq.read_table(sims_ref.directory / layout.CHOSEN), sims,
                         pq.read_table(score_ref.path))
        err.print(f"exported {n} units of layer {score_ref.layer}")
        typer.echo(str(to))

    run_or_exit(go)


def import_cmd(
    source: Path = typer.Option(..., "--from", help="A dataset `publish` wrote, or a folder in the reference layout (explanations/<layer>/<n>.jsonl)."),
    layer: Optional[int] = typer.Option(None, "--layer", "-l", help="Layer to import (required for the reference layout; default for a dataset: every layer)."),
    out: Path = typer.Option(Path("out"), "--out", "-o"),
    model: Optional[str] = typer.Option(None, "--model", help="Where the dataset's subject model is on this machine (a dataset names it without its place), for the scorers that run it again."),
):
    """Import published explanations to re-simulate and re-score them. A dataset `publish` wrote comes
    back whole (records, explanations, its scores), as runs that `rescore --out OUT --layer L` re-scores."""
    from autoexplain import layout
    from autoexplain.interop import import_explanations
    from autoexplain.store import Stage

    def go():
        if not source.is_dir():
            raise UserError(f"--from: {source} {'is not a folder' if source.exists() else 'does not exist'}",
                            "give a dataset folder `publish` wrote, or a folder in the reference layout (explanations/<layer>/)")
        preflight.check_out(str(out), preflight.cli_flag)
        if (source / "data" / "explanations").is_dir():
            from autoexplain.dataset_import import import_dataset

            for L, kind in import_dataset(source, out, None if layer is None else [layer], model):
                err.print(f"imported layer {L} ({kind}): re-score it with `autoexplain rescore --out {out} --layer {L}"
                          f"{'' if kind == 'mlp' else ' --source ' + kind}`", highlight=False)
            typer.echo(str(out))
            return
        if layer is None:
            raise UserError("--layer is required for the reference layout", "pass --layer L")
        table = import_explanations(source, layer)
        # Keyed by the rows themselves: they are the output, whatever code parsed them.
        stage = Stage.open(out, "explanations", {"imported": table.to_pylist()})
        if not stage.done:
            stage.table(table, layout.table(stage.directory, layer).name, "explanations")
            stage.seal({"source": str(source)}, {"layer": layer})
        err.print(f"imported {table.num_rows} explanations for layer {layer}")
        typer.echo(str(stage.directory))

    run_or_exit(go)


def view(
    scores: Optional[list[str]] = typer.Option(None, "--scores", "-c", help="Scores folders printed by `autoexplain score` or explain-layer (or their URLs: file://, or under a URL --out): one per layer, or the shards of a layer. Optional with --serve when the site exists."),
    site: str = typer.Option("site", "--site", help="Folder or fsspec URL to write the static site into (or, with --serve alone, the folder to serve)."),
    records: Optional[str] = typer.Option(None, "--records", "-r", help="Records folder or URL (default: found through the manifests)."),
    serve: bool = typer.Option(False, "--serve", help="Serve the site over http on this machine until Ctrl-C, and print its URL: what a browser opens from an http page such as the Prefect UI, which does not follow file:// links."),
    port: Optional[int] = typer.Option(None, "--port", help="Port for --serve (default 8765, or a free port when 8765 is taken; 0: any free port)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address for --serve (default loopback only: nothing outside this machine sees the site)."),
):
    """Write a static neuron viewer (no server needed: open index.html) from scored layers; --serve serves it."""
    def go():
        from autoexplain import remote, serve as serving
        from autoexplain.storage import local_folder
        from autoexplain.view import BUILT_WHOLE, build_site, site_folder

        if serve:
            serving.check_address(host, port)
        if scores:
            preflight.check_out(site, preflight.cli_flag, "site")
            index = build_site([local_folder(s) for s in scores], site_folder(site, True), records and local_folder(records))
            uploaded = remote.push(index.parent, prune=BUILT_WHOLE)  # a URL's site; None for a folder
            typer.echo(remote.uri(index) if uploaded else str(index))
        elif not serve:
            raise UserError("nothing to do: no --scores given", "pass --scores <scores folder>, or --serve to serve an existing --site")
        if not serve:
            return
        server = serving.start(site_folder(site, bool(scores)), host, port)
        typer.echo(server.url)
        err.print(f"serving {server.site} at {server.url} (Ctrl-C to stop)", highlight=False)
        server.wait()

    run_or_exit(go)


def publish(
    out: str = typer.Option("out", "--out", "-o", help="Output root of explain-layer runs (folder or URL)."),
    to: str = typer.Option(..., "--to", help="Folder or fsspec URL to write the dataset into (new, empty, or an earlier publish, which is replaced)."),
    layers: Optional[str] = typer.Option(None, "--layers", "-l", help="Layers to publish: 15, 3,7 or 10-12 (default: every layer with a finished run)."),
    license_: Optional[str] = typer.Option(None, "--license", help="The dataset's license for the card (default: cc-by-sa-3.0 for the embedded corpus; required for any other corpus)."),
):
    """Publish the latest runs as a dataset: parquet tables by source and layer, and a dataset card (Hugging Face format)."""
    from autoexplain.model_plan import parse_layers
    from autoexplain.publish import TABLES
    from autoexplain.publish import publish as publish_dataset

    def go():
        chosen = parse_layers(layers, None, preflight.cli_flag) if layers not in (None, "all") else None
        preflight.check_root(out, preflight.cli_flag)
        preflight.check_out(to, preflight.cli_flag, "to")
        to_dir = publish_dataset(out, to, chosen, license_)
        err.print(f"published {', '.join(TABLES)} to {to_dir}", highlight=False)
        typer.echo(str(to_dir))

    run_or_exit(go)


def train_sae_cmd(
    model: str = typer.Option(defaults.SUBJECT, "--model", "-m", help="Subject model: hub name, local folder, .gguf file, or 'smollm2' (embedded)."),
    corpus: str = typer.Option(defaults.CORPUS, "--corpus", "-c", help="Corpus whose tokens the SAE is trained on (as for record)."),
    layer: Optional[int] = typer.Option(None, "--layer", "-l", help="Layer of the hook point (default: the middle layer)."),
    hook: str = typer.Option("resid_post", "--hook", help="resid_pre, resid_post, mlp_in, mlp_out, mlp_module_in or mlp_module_out of that layer (README: SAEs)."),
    latents: int = typer.Option(4096, "--latents", help="Latents of the SAE."),
    k: int = typer.Option(32, "--k", help="Active latents per token (TopK)."),
    tokens: int = typer.Option(200_000, "--tokens", "-n", help="Corpus tokens to capture hidden states from (5 % held out)."),
    epochs: int = typer.Option(1, "--epochs", help="Passes over the captured tokens."),
    batch: int = typer.Option(1024, "--batch-tokens", help="Tokens per training step."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate (default: scaled to --latents)."),
    seed: int = typer.Option(0, "--seed"),
    window_len: int = WINDOW_LEN,
    out: Path = typer.Option(Path("out"), "--out", "-o", help="Output root (the tokenised windows are cached under it)."),
    to: Optional[Path] = typer.Option(None, "--to", help="SAE folder to write (default: <out>/sae/layer_<L>_<hook>_<latents>)."),
):
    """Train a TopK SAE on one hook point's hidden states, on CPU, and save it in SAELens format
    (SAELens and `autoexplain.sae` read it back); prints its held-out fraction of variance explained and dead latents."""
    from autoexplain.record import build_windows
    from autoexplain.sae_coder import HookPoint
    from autoexplain.sae_train import TL_HOOKS, TrainConfig, check_target, train_sae
    from autoexplain.subject import load_subject

    def go():
        for name, value in (("--latents", latents), ("--k", k), ("--tokens", tokens), ("--epochs", epochs), ("--batch-tokens", batch)):
            preflight.at_least(preflight.cli_flag, name.lstrip("-").replace("-", "_"), value, 1)
        if k > latents:
            raise UserError(f"--k {k} is more than --latents {latents}", "pass --k at most --latents")
        if lr is not None and not lr > 0:
            raise UserError(f"--lr must be more than 0, got {lr}", "pass a positive learning rate, or leave --lr out")
        if tokens - tokens // 20 < batch:  # 5 % of the tokens are held out for the report
            raise UserError(f"--tokens {tokens:,} leave {tokens - tokens // 20:,} to train on, fewer than one batch of "
                            f"--batch-tokens {batch:,}", "pass more --tokens or a smaller --batch-tokens")
        if hook not in TL_HOOKS:
            raise UserError(f"unknown --hook '{hook}'", f"use one of {', '.join(TL_HOOKS)}")
        for flag, where in (("out", out), ("to", to)):
            if where is None:
                continue
            if re.match(r"[a-z][a-z0-9+.-]*:/", str(where)):  # a URL, which Path has folded to 'file:/...'
                raise UserError(f"--{flag} {where}: train-sae writes to a local folder, not a URL",
                                "pass a folder path (copy the SAE to the URL afterwards)")
            preflight.check_out(str(where), preflight.cli_flag, flag)
        preflight.check_corpus(corpus, preflight.cli_flag)
        shape = preflight.model_shape(model, preflight.cli_flag)
        preflight.check_window(shape, window_len, preflight.cli_flag)
        point = HookPoint(shape.middle_layer if layer is None else layer, hook)
        preflight.check_layer(shape, point.layer, preflight.cli_flag, "layer")
        folder = to or out / "sae" / f"layer_{point.layer}_{hook}_{latents}"
        check_target(folder)
        subject = load_subject(model)
        windows = build_windows(subject, corpus, out, window_len, tokens, seed)
        if windows.notice:
            err.print(windows.notice, highlight=False, markup=False)
        with progress_bar() as bar:
            tasks = {}

            def progress(stage, done, total):
                if stage not in tasks:
                    tasks[stage] = bar.add_task(f"{stage} {point}", total=total, unit="steps" if stage == "train" else "tokens")
                bar.update(tasks[stage], completed=done, total=total)

            report = train_sae(subject, point, windows, folder, TrainConfig(latents, k, batch, epochs, lr, seed=seed), corpus, progress)
        err.print(f"SAE {latents} latents, k={k} on {point}: FVE {report.fve:.3f} ({report.fve_without_top_dim:.3f} without the "
                  f"highest-variance dimension), dead {report.dead_fraction:.1%} "
                  f"(held-out {report.tokens_eval:,} tokens); trained on {report.tokens_train:,} tokens, "
                  f"{report.steps} steps, capture {report.seconds_capture:.0f}s + train {report.seconds_train:.0f}s")
        typer.echo(str(folder))

    # No LLM here, nothing half-written (the SAE folder appears whole or not at all), and the
    # tokenised windows are cached under --out.
    run_or_exit(go, left="no SAE was written; rerun the same command to train it (the tokenised windows are reused)")
