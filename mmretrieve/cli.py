"""The `mmretrieve` command line. Results go to stdout; progress and logs go to stderr.

Nothing heavy is imported at start-up: each command imports torch and friends in its body,
so `mmretrieve --help` and `mmretrieve plugins` stay fast.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from pathlib import Path

import click

from . import __version__
from .errors import MMRetrieveError


class Group(click.Group):
    """Turns a user's mistake (an MMRetrieveError) into one sentence instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MMRetrieveError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="mmretrieve")
@click.option("-v", "--verbose", count=True, help="More logging on stderr (-vv for debug).")
@click.pass_context
def cli(ctx: click.Context, verbose: int) -> None:
    """Text-to-image and image-to-text search: train, index, search, export."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    job = COMMAND_JOBS.get(ctx.invoked_subcommand or "")
    if job:  # threads for onnxruntime, faiss, torch and decoding, chosen for the job (mmretrieve.threads)
        from .threads import use_policy

        use_policy(job)
    if job == "train":  # torch's activations reused, not faulted in again each step (mmretrieve/allocator.py)
        from .allocator import tune_allocator

        tune_allocator()


# The thread policy each command runs under (`serve` applies its own, with --threads).
COMMAND_JOBS = {"search": "search", "index": "index", "embed": "embed", "eval": "eval", "export": "export",
                "train": "train", "train-fusion": "train"}


def echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def registered(kind: str, keywords: tuple[str, ...] = ("auto",)):
    """An option callback accepting ``keywords`` or any name registered for ``kind``, a plugin's
    included; the registry is read only when such a value is given, so --help loads no plugin.
    Returns the registered name (an alias becomes the name it stands for)."""
    def check(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is None or value in keywords:
            return value
        from .plugins import get_host

        registry = get_host().registry(kind)
        if value not in registry:
            raise click.BadParameter(f"{registry.unknown_message(value)}; or {' or '.join(keywords)}")
        return registry.get(value).name

    return check


def config_options(func):
    """--config FILE and repeatable --set key=value, in that order of precedence."""
    func = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                        help="Override one setting (repeatable); values parse as JSON where they can.")(func)
    return click.option("--config", "config_file", type=click.Path(dir_okay=False),
                        help="Settings from a TOML, YAML or JSON file.")(func)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins(as_json: bool) -> None:
    """List plugins, their versions and what each registers."""
    from .plugins import KINDS, PLURALS, get_host

    host = get_host()
    for kind in KINDS:
        host.registry(kind)  # runs the register hooks so records are filled in
    records = [r.as_dict() for r in host.records.values()]
    if as_json:
        echo_json(records)
        return
    rows = [("plugin", "version", "source", "registers")]
    for record in host.records.values():
        what = "; ".join(f"{PLURALS[kind]}: {', '.join(names)}" for kind, names in sorted(record.registered.items()))
        if record.error:
            what = f"SKIPPED ({record.error})"
        elif record.refused:
            what += f"; refused: {len(record.refused)}"
        rows.append((record.name, record.version or "-", record.source, what or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3])


@cli.command()
@click.option("--encoder", "encoder_name", help="A registered encoder (see `mmretrieve plugins`), e.g. bert or timm:resnet50.")
@click.option("--model", "model_ref", help="A model bundle (or registered model name): embed into its shared space.")
@click.option("--text", "texts", multiple=True, help="A text to embed (repeatable).")
@click.option("--texts-file", type=click.Path(exists=True, dir_okay=False), help="A file with one text per line.")
@click.option("--image", "images", multiple=True, type=click.Path(), help="An image file or folder (repeatable).")
@click.option("-o", "--out", type=click.Path(dir_okay=False), default="embeddings.npy", show_default=True,
              help="Where to write the float32 matrix (.npy); row descriptions go beside it.")
@click.option("--rows-format", type=click.Choice(["json", "csv"]), default="json", show_default=True,
              help="Format of the file describing each row.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--no-normalize", is_flag=True, help="Keep raw encoder features (encoders only).")
@click.option("--device", help="torch device (default: cuda when present, else cpu).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@config_options
def embed(encoder_name, model_ref, texts, texts_file, images, out, rows_format, batch_size, no_normalize, device,
          as_json, config_file, overrides):
    """Embed texts or images with an encoder or a trained model, into a .npy file."""
    from .embed import collect_inputs, run_embed

    if bool(encoder_name) == bool(model_ref):
        raise click.UsageError("give exactly one of --encoder NAME or --model MODEL")
    inputs = collect_inputs(texts, texts_file, images)
    result = run_embed(inputs, out=Path(out), rows_format=rows_format, encoder_name=encoder_name,
                       model_ref=model_ref, batch_size=batch_size, normalize=not no_normalize, device=device,
                       config_file=config_file, overrides=overrides)
    if as_json:
        echo_json(result)
        return
    for part in result["outputs"]:
        click.echo(f"{part['modality']}: {part['rows']} x {part['dim']} float32 -> {part['path']} "
                   f"(rows described in {part['rows_file']})")
    for skipped in result["skipped"]:
        click.echo(f"skipped {skipped['path']}: {skipped['reason']}", err=True)


def _trained_line(trained: dict) -> str:
    """What `train` recorded in a bundle: the start, the best and the gain (a hand-edited or partial
    record prints what it has)."""
    from .metrics import mean_recall

    def gain(direction: str, name: str) -> str:
        value = (trained["gain"].get(direction) or {}).get(name)
        return f"{value:+.1f}" if isinstance(value, (int, float)) else "?"

    try:
        recalls = f"mean recall {mean_recall(trained['start']):.1f} at the start -> {mean_recall(trained['val']):.1f} "
    except (AttributeError, KeyError, TypeError, ValueError):
        recalls = ""
    return (f"best at step {trained.get('step', '?')}: {recalls}(gain R@1/R@5: t2i {gain('t2i', 'R@1')}/"
            f"{gain('t2i', 'R@5')}, i2t {gain('i2t', 'R@1')}/{gain('i2t', 'R@5')})")


@cli.command()
@click.argument("model_ref", metavar="MODEL")
@click.option("--verify", is_flag=True, help="Re-hash every file against the manifest; for an index, also check "
              "SQLite, the FAISS ids and counts against it, and the stored vectors (non-zero exit when damaged).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(model_ref: str, verify: bool, as_json: bool) -> None:
    """Describe a model bundle, an ONNX export or an index folder: what it holds and how it was made."""
    from .bundle import read_bundle_info
    from .describe import describe_export, describe_index, fusion_head_lines, kind_of

    kind = kind_of(model_ref)
    if kind != "bundle":
        payload, lines = describe_export(model_ref, verify) if kind == "export" else describe_index(model_ref, verify)
        if as_json:
            echo_json(payload)
        else:
            click.echo("\n".join(lines))
        report = payload.get("verify")
        if report and not report["ok"]:  # the check lines above say what; the verdict says what to do
            if as_json:
                raise SystemExit(1)
            from .errors import IndexDamagedError

            raise IndexDamagedError(report["verdict"])
        return
    bundle = read_bundle_info(model_ref, verify=verify)
    heads, head_lines = fusion_head_lines(bundle.path)
    if as_json:
        echo_json({"path": str(bundle.path), "manifest": bundle.manifest, "model": bundle.model, "fusion_heads": heads})
        return
    manifest, config = bundle.manifest, bundle.model["config"]
    click.echo(f"bundle:       {bundle.path}")
    click.echo(f"format:       {manifest['format']} v{manifest['format_version']} (mmretrieve {manifest['mmretrieve_version']})")
    click.echo(f"fingerprint:  {manifest['fingerprint']}")
    click.echo(f"embed dim:    {manifest['embed_dim']}  head: {config['head']}")
    bridge = config.get("bridge") or {}
    if bridge.get("enabled"):  # the embedding is the heads' part and the label bridge's side by side
        click.echo(f"label bridge: {bridge.get('num_classes')} classes, top {bridge.get('top_t')}, temperature "
                   f"{bridge.get('temperature')}, weight {bridge.get('weight')} (heads {config['embed_dim']}-d + "
                   f"{int(manifest['embed_dim']) - int(config['embed_dim'])}-d)")
    source = (manifest.get("metadata") or {}).get("source")
    if isinstance(source, dict) and source:  # a pretrained pair's bundle: which checkpoint it was made from
        click.echo(f"source:       {source.get('kind', '?')} {source.get('checkpoint', '?')}"
                   + (f" @ {source['revision']}" if source.get("revision") else ""))
    for name, tower in bundle.model["towers"].items():
        reference = tower.get("reference")
        stored = (f", by reference ({reference['changed_tensors']} tensors changed by training)" if reference else "")
        click.echo(f"{name + ' tower:':<13} {tower['registered_as']} ({tower['family']}, {tower['dim']}-d){stored}")
    trained = manifest.get("metadata") or {}
    if isinstance(trained.get("gain"), dict) and isinstance(trained.get("start"), dict):  # written by `train`
        click.echo(f"trained:      {_trained_line(trained)}")
    stored = manifest.get("stored_parameters", manifest["parameters"])
    click.echo(f"parameters:   {manifest['parameters']:,}" +
               (f" ({stored:,} stored in the bundle)" if stored != manifest["parameters"] else ""))
    for line in head_lines:
        click.echo(line)
    if verify:
        click.echo(f"verified:     {len(manifest['files'])} files match their hashes"
                   + (f"; {len(heads)} fusion heads too" if heads else ""))


@cli.command()
@click.option("--data", help="Training pairs: JSONL, CSV, COCO captions JSON, or a folder with .txt sidecars.")
@click.option("--val-data", help="Validation pairs (default: a held-out split of --data).")
@click.option("--init", "init_model", help="Start from this bundle or registered model instead of a fresh one.")
@click.option("--text-encoder", help="Text tower for a fresh model, e.g. bert or minilm-l6.")
@click.option("--image-encoder", help="Image tower for a fresh model, e.g. timm:resnet50 or efficientnet-lite0.")
@click.option("--text-mode", help="What trains in the text tower: frozen, full, top:N, bitfit, lora.")
@click.option("--image-mode", help="What trains in the image tower: frozen, full, top:N, bitfit, lora.")
@click.option("--epochs", type=click.IntRange(1), help="Passes over the training images.")
@click.option("--batch-size", type=click.IntRange(2), help="Pairs per batch (per process).")
@click.option("-o", "--output", help="Run folder (bundle in OUTPUT/best).")
@click.option("--resume", is_flag=True, help="Continue the run in --output from its last checkpoint.")
@click.option("--self-contained", is_flag=True,
              help="Store every tower weight in the bundle, not by reference to the --init pair's checkpoint "
                   "(the default for a pretrained pair).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@config_options
def train(data, val_data, init_model, text_encoder, image_encoder, text_mode, image_mode, epochs, batch_size, output,
          resume, self_contained, as_json, config_file, overrides):
    """Fine-tune a retrieval model contrastively on image-caption pairs.

    Runs on CUDA with mixed precision when present, else on CPU; under torchrun it trains
    with DistributedDataParallel. The best validation checkpoint is saved as a bundle.
    """
    from .config import TrainConfig, load_config

    flags = {"data": data, "val_data": val_data, "init": init_model, "model.text.encoder": text_encoder,
             "model.image.encoder": image_encoder, "text.mode": text_mode, "image.mode": image_mode,
             "epochs": epochs, "batch_size": batch_size, "output": output,
             "bundle_towers": "embed" if self_contained else None}
    sets = tuple(f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None) + tuple(overrides)
    if _starts_from_default(config_file, sets):
        sets = ('init="default"',) + sets
        click.echo("no --init or encoders given: starting from the offline `default` model, as with --init default "
                   "(give --text-encoder/--image-encoder for fresh towers)", err=True)
    config = load_config(TrainConfig, config_file, sets)
    from .threads import apply_to_torch
    from .train.loop import TrainingInterrupted, run_training

    apply_to_torch()  # the loop imported torch after the group chose the threads
    try:
        result = run_training(config, resume=resume)
    except KeyboardInterrupt as exc:  # Ctrl-C: say what was kept and how to go on, instead of "Aborted!"
        if os.environ.get("RANK", "0") == "0":
            click.echo(_interrupted_note(exc if isinstance(exc, TrainingInterrupted) else None,
                                         Path(config.output) / "checkpoint", click.get_current_context()), err=True)
        sys.exit(130)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports for everyone
    if as_json:
        echo_json(result.__dict__)
        return
    _print_gain(result)


def _starts_from_default(config_file, sets: tuple[str, ...]) -> bool:
    """No starting model and no tower chosen anywhere (flags, --config, --set), and a plugin registers
    `default`: then train starts from it, since the fresh towers' defaults (bert, timm) need a model hub."""
    from .bundle import default_model
    from .config import apply_overrides, read_config_file

    chosen = apply_overrides(read_config_file(config_file) if config_file else {}, sets)
    return "init" not in chosen and "model" not in chosen and default_model() is not None


def _interrupted_note(interrupted, checkpoint: Path, ctx: click.Context) -> str:
    """One sentence after Ctrl-C: which checkpoint holds the run, and the command that resumes it."""
    from .train.checkpoint import has_checkpoint, load_checkpoint

    words = ["mmretrieve", "train"]
    for param in ctx.command.params:  # what the user typed, as long options
        if ctx.get_parameter_source(param.name) not in (click.core.ParameterSource.COMMANDLINE,
                                                        click.core.ParameterSource.ENVIRONMENT):
            continue
        value, flag = ctx.params[param.name], max(param.opts, key=len)
        if getattr(param, "is_flag", False):
            words += [flag] if value else []
        else:
            for item in (value if param.multiple else (value,)):
                words += [flag, str(item)]
    command = shlex.join(words + ([] if "--resume" in words else ["--resume"]))
    if interrupted is not None and interrupted.checkpoint is not None:
        return f"Interrupted: the checkpoint of step {interrupted.step} is saved in {checkpoint}; resume with: {command}"
    if has_checkpoint(checkpoint):
        try:
            step = json.loads(load_checkpoint(checkpoint)["trainer"])["step"]
        except Exception:  # noqa: BLE001 - the note must not fail; the step is a courtesy
            step = "?"
        return f"Interrupted before a new checkpoint; the last one (step {step}) is in {checkpoint}; resume with: {command}"
    return "Interrupted before the first checkpoint, so nothing was saved; run the same command again to start over"


def _print_gain(result) -> None:
    if result.baseline is None or result.best is None:
        click.echo(f"trained {result.steps} steps in {result.seconds:.0f}s; no validation result")
        return
    click.echo(f"trained {result.steps} steps in {result.seconds:.0f}s; best at step {result.best_step} -> "
               f"{result.best_bundle}{' (stopped early)' if result.stopped_early else ''}")
    click.echo(f"{'':>10} {'t2i R@1':>8} {'R@5':>6} {'R@10':>6} {'i2t R@1':>8} {'R@5':>6} {'R@10':>6}")
    for label, metrics in (("start", result.baseline), ("best", result.best), ("gain", result.gain)):
        if metrics is None:
            continue
        t, i = metrics["t2i"], metrics["i2t"]
        sign = "+" if label == "gain" else ""
        click.echo(f"{label:>10} {t['R@1']:>{sign}8.1f} {t['R@5']:>{sign}6.1f} {t['R@10']:>{sign}6.1f} "
                   f"{i['R@1']:>{sign}8.1f} {i['R@5']:>{sign}6.1f} {i['R@10']:>{sign}6.1f}")


@cli.command(name="eval")
@click.option("--model", "model_ref", default="default", show_default=True,
              help="A model bundle, registered model name or ONNX export folder.")
@click.option("--data", required=True, help="Captioned images: JSONL, CSV, COCO captions JSON or a folder.")
@click.option("--fused", is_flag=True,
              help="Fused items instead: each image plus one caption is an item, its other captions query it; "
                   "image-only, text-only and every fusion strategy in one table.")
@click.option("--weights", help="With --fused: text,image weights for late and mean (default 0.5,0.5).")
@click.option("--fusion-bundle", "fusion_bundles", multiple=True, type=click.Path(file_okay=False),
              help="With --fused: a trained fusion head to include (repeatable; heads stored in the model are included).")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--workers", type=click.IntRange(0), default=2, show_default=True, help="Image decoding processes (0: a thread of this process).")
@click.option("--runtime", default="auto", show_default=True, callback=registered("runtime"),
              help="torch, onnx, a plugin's (see `mmretrieve plugins`), or auto (onnx for an export folder, else torch).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, ...")
@click.option("--json", "as_json", is_flag=True, help='Print {"t2i": {...}, "i2t": {...}} (percentages).')
def evaluate(model_ref, data, fused, weights, fusion_bundles, batch_size, workers, runtime, device, as_json):
    """Recall@1/5/10 and median rank, text->image and image->text (CLIP_benchmark protocol)."""
    from .data import load_captions
    from .runtime import choose_runtime

    if not fused and (weights or fusion_bundles):
        raise click.UsageError("--weights and --fusion-bundle go with --fused")
    captions = load_captions(data)
    runtime = choose_runtime(model_ref, runtime)
    if fused:
        _evaluate_fused(model_ref, captions, weights, fusion_bundles, batch_size, workers, runtime, device, as_json)
        return
    if runtime == "torch":
        import torch

        from .bundle import load_bundle
        from .evaluate import evaluate_model

        model = load_bundle(model_ref)
        device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                              ("cpu" if device == "auto" else device))
        metrics = evaluate_model(model, captions.items, batch_size=batch_size, device=device, workers=workers)
    else:  # any other runtime goes through its embedder (onnx never imports torch)
        from .evaluate import evaluate_embedder
        from .runtime import load_embedder

        embedder = load_embedder(model_ref, runtime, None if device == "auto" else device)
        metrics = evaluate_embedder(embedder, captions.items, batch_size=batch_size, workers=workers)
    if as_json:
        echo_json(metrics)
        return
    click.echo(f"{len(captions)} images, {captions.num_captions} captions ({captions.source})")
    click.echo(f"{'':>4} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'median rank':>12}")
    for direction in ("t2i", "i2t"):
        m = metrics[direction]
        click.echo(f"{direction:>4} {m['R@1']:>6.1f} {m['R@5']:>6.1f} {m['R@10']:>6.1f} {m['median_rank']:>12g}")


def _evaluate_fused(model_ref, captions, weights, fusion_bundles, batch_size, workers, runtime, device, as_json):
    from .fusion.evaluation import evaluate_fused_items, format_table
    from .runtime import load_embedder

    embedder = load_embedder(model_ref, runtime, None if device == "auto" else device)
    table, skipped = evaluate_fused_items(embedder, captions.items, weights, fusion_bundles, batch_size, workers,
                                          progress=not as_json)
    for note in skipped:
        click.echo(f"left out: {note}", err=True)
    if as_json:
        echo_json(table)
        return
    queries = captions.num_captions - len(captions)
    click.echo(f"{len(captions)} items (image + first caption), {queries} caption queries ({captions.source})")
    click.echo(format_table(table))


@cli.command(name="train-fusion")
@click.option("--model", "model_ref", default="default", show_default=True,
              help="The model bundle (or registered model) whose embeddings the heads fuse.")
@click.option("--data", required=True, help="Captioned images (two or more captions each): JSONL, CSV, COCO, folder.")
@click.option("--strategy", "strategies", multiple=True,
              help="Trained strategy to train (repeatable; default: every trainable one registered).")
@click.option("-o", "--out", type=click.Path(file_okay=False),
              help="Folder for the heads, one fusion bundle per strategy (default: MODEL/fusion for a bundle folder).")
@click.option("--epochs", type=click.IntRange(1), default=10, show_default=True)
@click.option("--batch-size", type=click.IntRange(2), default=256, show_default=True, help="Distinct images per step.")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--cache", type=click.Path(file_okay=False), help="Folder to cache the towers' features in (reused).")
@click.option("--workers", type=click.IntRange(0), default=2, show_default=True, help="Image decoding processes (0: a thread of this process).")
@click.option("--device", help="torch device for the towers (default: cuda when present).")
@click.option("--json", "as_json", is_flag=True, help="Print one report per head as JSON.")
def train_fusion(model_ref, data, strategies, out, epochs, batch_size, lr, seed, cache, workers, device, as_json):
    """Train fusion heads (concat-projection, gated) on a model's frozen embeddings.

    Each step fuses an image with one of its captions and contrasts the item with another caption
    of the same image. Heads are saved as fusion bundles (PyTorch weights and a parity-checked
    ONNX graph), by default inside the model bundle, where `index --fusion`, `search --fusion`,
    `eval --fused` and `export` find them.
    """
    from .fusion.training import FusionTrainConfig, train_fusion_heads

    config = FusionTrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    reports = train_fusion_heads(model_ref, data, list(strategies) or None, out, config, cache, workers, device)
    if as_json:
        echo_json(reports)
        return
    for r in reports:
        click.echo(f"{r['strategy']}: {r['steps']} steps on {r['images']} images in {r['seconds']:.1f}s, "
                   f"final loss {r['final_loss']:.3f}, ONNX parity {r['onnx_min_cosine']:.6f} -> {r['folder']}")


@cli.command()
@click.option("--model", "model_ref", default="default", show_default=True,
              help="The model bundle (or registered model name) to export.")
@click.option("--out", required=True, type=click.Path(), help="Export folder to write (an earlier export there is replaced).")
@click.option("--fp16", is_flag=True, help="fp16 weights and arithmetic (for GPUs); needs --eval-data or --force.")
@click.option("--int8", is_flag=True, help="Dynamic int8 MatMul weights (for CPUs); needs --eval-data or --force.")
@click.option("--calibration", type=click.Path(exists=True),
              help="With --int8: images (a folder) to calibrate static int8 for the image tower's convolutions "
                   "(the first 64); without it the image tower stays fp32.")
@click.option("--int8-towers", type=click.Choice(["text", "image", "text,image"]),
              help="With --int8: the towers to quantise (default text, and image with --calibration).")
@click.option("--eval-data", type=click.Path(exists=True),
              help="Captioned images to report Recall@K on; a reduced precision may lose at most 1 point of R@1, R@5 or R@10.")
@click.option("--force", is_flag=True, help="Write a reduced-precision export without the recall check, or despite it.")
@click.option("--opset", type=int, help="ONNX opset, 17-20 (default 18).")
@click.option("--json", "as_json", is_flag=True, help="Print the export manifest as JSON.")
def export(model_ref, out, fp16, int8, calibration, int8_towers, eval_data, force, opset, as_json):
    """Export a model's text and image towers to ONNX for the onnx runtime (`--runtime onnx`).

    Each graph includes the projection head and normalisation. fp32 must match PyTorch
    (cosine >= 0.9999 per embedding on test texts and images) or nothing is written.
    """
    from .export.exporter import export_model

    if fp16 and int8:
        raise click.UsageError("give at most one of --fp16 and --int8")
    precision = "fp16" if fp16 else "int8" if int8 else "fp32"
    manifest = export_model(model_ref, out, precision=precision, eval_data=eval_data, force=force, opset=opset,
                            progress=not as_json, calibration=calibration,
                            int8_towers=int8_towers.split(",") if int8_towers else None)
    if as_json:
        echo_json(manifest)
        return
    click.echo(f"{out}: {precision} ONNX export of {manifest['source']['path']} "
               f"(fingerprint {manifest['fingerprint'][:12]}, {manifest['embed_dim']}-d, opset {manifest['opset']}, "
               f"{manifest['seconds']:.0f}s)")
    for tower, report in manifest["parity"].items():
        line = f"{tower:>5}: fp32 vs PyTorch min cosine {report['min_cosine']:.6f}"
        if "agreement" in manifest:
            line += f"; {precision} vs PyTorch min cosine {manifest['agreement'][tower]['min_cosine']:.4f}"
        click.echo(line)
    for variant, metrics in manifest.get("recall", {}).get("results", {}).items():
        click.echo(f"{variant:>5}: R@5 t2i {metrics['t2i']['R@5']:.2f}, i2t {metrics['i2t']['R@5']:.2f}")
    for name, head in manifest.get("fusion_heads", {}).items():
        click.echo(f"fusion head {name}: ONNX vs PyTorch min cosine {head['onnx_min_cosine']:.6f}")


def _parse_size(text: str | None) -> int | None:
    """'4GB', '512MB', '1.5G' -> bytes."""
    if not text:
        return None
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    value = text.strip().lower().rstrip("b").rstrip("i")
    try:
        return int(float(value[:-1]) * units[value[-1]]) if value[-1] in units else int(float(value))
    except (ValueError, IndexError):
        raise click.BadParameter(f"{text!r} is not a size like 4GB or 512MB") from None


def default_model_name(folder: Path) -> str:
    """`default` when a plugin registers it (mmretrieve-offline-towers does), else ask for --model."""
    from .bundle import DEFAULT_MODEL, default_model

    name = default_model()
    if name is not None:
        return name
    raise click.UsageError(f"{folder} does not exist yet and no plugin provides a `{DEFAULT_MODEL}` model: give "
                           f"--model MODEL (or pip install mmretrieve-offline-towers)")


def _index_model(folder: Path, rebuild: bool) -> str:
    """The model `index` uses without --model: the index's own; for a new index, or a --rebuild of
    one whose manifest is too damaged to name it, the default model."""
    from .bundle import resolve_model_ref
    from .errors import IndexDamagedError
    from .index.store import MANIFEST, read_manifest

    if not (folder / MANIFEST).is_file():
        return default_model_name(folder)
    try:
        return resolve_model_ref(built_with=read_manifest(folder)["model"], index_dir=folder)
    except IndexDamagedError:
        if not rebuild:
            raise
        return default_model_name(folder)


@cli.command()
@click.argument("path", required=False, type=click.Path())
@click.option("--model", "model_ref",
              help="Bundle, export folder or registered model (default: the index's own model; for a new index, `default`).")
@click.option("--index-dir", type=click.Path(file_okay=False), help="Index folder (default: index/images, or index/texts with --texts).")
@click.option("--include", multiple=True, metavar="GLOB", help="Only files matching (path relative to PATH, or name); repeatable.")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Skip files matching; repeatable.")
@click.option("--index-type", default=None, callback=registered("index_backend"),
              help="flat, hnsw, ivfpq, a plugin's backend (see `mmretrieve plugins`), or auto (the default for a "
                   "new index), which picks by collection size and --memory-budget; for an "
                   "existing index, another type re-indexes its stored vectors (nothing is embedded again).")
@click.option("--memory-budget", help="Memory the index may use, e.g. 4GB (for --index-type auto).")
@click.option("--captions", "captions_file", type=click.Path(exists=True),
              help="Captions or titles for the images (JSONL, CSV, COCO JSON), stored as metadata (and fused with --fusion).")
@click.option("--fusion", help="Index each image fused with its first caption: late, mean, concat-projection, gated, ...")
@click.option("--weights", help="text,image weights for late and mean fusion (default 0.5,0.5).")
@click.option("--fusion-bundle", type=click.Path(file_okay=False),
              help="Trained head for a trained --fusion (default: the one stored in the model).")
@click.option("--texts", "texts_file", type=click.Path(exists=True),
              help="Index the captions of this data file instead of images (for image->text search).")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--workers", type=click.IntRange(0), default=None,
              help="Decoding processes (default: none on up to 2 cores, else cores - 1; 0 decodes in a thread of this process); with --engine ray, encoder actors (default: the cluster's CPUs).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where images are embedded: this machine, or a Ray cluster (pip install \"mmretrieve[ray]\"); "
                   "every Ray node must read PATH and the model at the same paths.")
@click.option("--ray-address", help="With --engine ray: a running cluster (e.g. ray://HEAD:10001, or auto); "
                                    "default: start a local one with this machine's CPUs.")
@click.option("--gpus-per-worker", type=click.FloatRange(0), default=0, show_default=True,
              help="With --engine ray: GPUs each encoder actor reserves.")
@click.option("--commit-every", type=click.IntRange(1), default=5000, show_default=True,
              help="Publish on the way once the run has embedded N images and as many as the index held at "
                   "its last publish, or 256 MiB of vectors (a killed run keeps them either way).")
@click.option("--runtime", default="auto", show_default=True, callback=registered("runtime"),
              help="torch, onnx, a plugin's (see `mmretrieve plugins`), or auto: onnx for an export folder, else torch.")
@click.option("--device", help="torch device (default: cuda when present).")
@click.option("--rebuild", is_flag=True, help="Re-embed everything (needed to switch models).")
@click.option("--follow-links", is_flag=True,
              help="Also follow links that point outside PATH (links inside it are always followed).")
@click.option("--prune", is_flag=True,
              help="Allow this run to remove more than a fifth of the items under PATH (files gone or no longer included).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def index(path, model_ref, index_dir, include, exclude, index_type, memory_budget, captions_file, fusion, weights,
          fusion_bundle, texts_file, batch_size, workers, engine, ray_address, gpus_per_worker, commit_every, runtime,
          device, rebuild, follow_links, prune, as_json):
    """Embed a folder of images (or a captions file) into a FAISS index.

    Re-running indexes only new or changed files and drops vanished ones; a killed run
    resumes where it stopped. Unreadable files are listed and skipped. With --captions and
    --fusion every image is indexed together with its caption as one multimodal item.
    """
    from .api import default_index_dir
    from .runtime import load_embedder

    if bool(path) == bool(texts_file):
        raise click.UsageError("give a PATH of images to index, or --texts FILE to index captions")
    if texts_file and (fusion or weights or fusion_bundle):
        raise click.UsageError("--fusion fuses images with their captions; it does not apply to --texts")
    if texts_file and (follow_links or prune):
        raise click.UsageError("--follow-links and --prune apply to a folder of images, not to --texts")
    if engine != "ray" and (ray_address or gpus_per_worker):
        raise click.UsageError("--ray-address and --gpus-per-worker apply to --engine ray")
    if engine == "ray" and texts_file:
        raise click.UsageError("--engine ray embeds images; index --texts on this machine (without --engine)")
    if path:
        from .index.scan import check_root

        check_root(path)  # a mistyped folder fails before a model is loaded or an index folder made
    ray_engine = None
    if engine == "ray":
        from .index.ray_engine import RayEngine

        ray_engine = RayEngine(ray_address, workers, gpus_per_worker, runtime=None if runtime == "auto" else runtime,
                               device=device)
        click.get_current_context().call_on_close(ray_engine.close)  # a cluster it started stops with the command
        ray_engine.connect()  # Ray missing or the cluster unreachable: said before a model is loaded
    folder = Path(index_dir) if index_dir else default_index_dir("text" if texts_file else "image")
    if not model_ref:
        model_ref = _index_model(folder, rebuild)
    embedder = load_embedder(model_ref, runtime, device)
    if texts_file:
        from .index.builder import index_texts

        report = index_texts(texts_file, folder, embedder, index_type=index_type, rebuild=rebuild)
    else:
        from .index.fused import item_fusion_settings
        from .index.builder import index_images

        captions, strategy, source = item_fusion_settings(folder, embedder, captions_file, fusion, weights,
                                                          fusion_bundle, rebuild)
        if workers is None:
            from .threads import current_policy

            workers = current_policy().decode_workers
        report = index_images(path, folder, embedder, include, exclude, index_type, batch_size, workers, commit_every,
                              captions, rebuild, memory_budget=_parse_size(memory_budget), fusion=strategy,
                              captions_source=source, follow_links=follow_links, prune=prune, engine=ray_engine)
    if as_json:
        echo_json(report.__dict__)
        return
    click.echo(f"{report.index_dir}: {report.total} items ({report.index_type}, generation {report.generation}); "
               f"added {report.added}, updated {report.updated}, removed {report.removed}, "
               f"unchanged {report.unchanged}, failed {len(report.failed)}"
               + (f", skipped {len(report.skipped)}" if report.skipped else "")
               + f"; {report.seconds:.1f}s, {report.items_per_s:.1f} items/s")
    for worker in report.workers:
        click.echo(f"  worker {worker['worker']}: {worker['items']} images in {worker['busy_s']:.1f}s busy, "
                   f"{worker['items_per_s']:.1f} images/s")
    for note in report.notes:
        click.echo(note, err=True)
    if report.uncaptioned:
        click.echo(f"{report.uncaptioned} images had no caption and are indexed by the image alone", err=True)
    for failure in report.failed:
        click.echo(f"skipped {failure['path']}: {failure['reason']}", err=True)
    for skip in report.skipped:
        click.echo(f"skipped {skip['path']}: {skip['reason']}", err=True)


@cli.command()
@click.argument("queries", nargs=-1)
@click.option("--image", "images", multiple=True, type=click.Path(), help="Search by this image (repeatable).")
@click.option("-k", "k", type=click.IntRange(1), default=10, show_default=True, help="Results per query.")
@click.option("--min-score", type=float, help="Drop results scoring below this cosine similarity.")
@click.option("--index-dir", type=click.Path(file_okay=False), help="Index folder (default: index/images).")
@click.option("--texts", "search_texts", is_flag=True, help="Search the caption index (default dir index/texts).")
@click.option("--model", "model_ref", help="Model to embed queries with (must be the index's).")
@click.option("--runtime", default="auto", show_default=True, callback=registered("runtime"),
              help="torch, onnx, a plugin's (see `mmretrieve plugins`), or auto: onnx for an export folder (--model), "
                   "else torch.")
@click.option("--device", help="torch device (default: cuda when present).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: a list of results (per query if several).")
@click.option("-p", "--paths", "paths_only", is_flag=True, help="Print only paths, one per line (for piping).")
@click.option("-0", "--null", "null_ends", is_flag=True,
              help="Print only paths, each ended by a NUL byte instead of a newline, so names with newlines "
                   "survive piping (`| xargs -0`, like `find -print0`); implies --paths.")
@click.option("--text", "query_text", help="With one --image: words that refine it (\"at night\"), fused into one query.")
@click.option("--fusion", help="Fusion strategy for --image with --text: late, mean, concat-projection, gated, or a plugin's.")
@click.option("--weights", help="text,image weights for late and mean fusion, e.g. 0.3,0.7 (default 0.5,0.5).")
@click.option("--fusion-bundle", type=click.Path(file_okay=False), help="Trained head for a trained --fusion (default: the one stored in the model).")
def search(queries, images, k, min_score, index_dir, search_texts, model_ref, runtime, device, as_json, paths_only,
           null_ends, query_text, fusion, weights, fusion_bundle):
    """Search an index by text (QUERY, or - to read queries from stdin), by --image, or by both (--image with --text)."""
    from .index.search import IndexReader

    queries = list(queries)
    if queries == ["-"]:
        queries = [line.strip() for line in sys.stdin if line.strip()]
    multimodal = query_text is not None
    if multimodal and (queries or len(images) != 1):
        raise click.UsageError("--text refines exactly one --image; give no QUERY arguments with it")
    if not multimodal and (fusion or weights or fusion_bundle):
        raise click.UsageError("--fusion, --weights and --fusion-bundle combine --image with --text; add --text")
    if not multimodal and bool(queries) == bool(images):
        raise click.UsageError("give text QUERY arguments or --image PATH, not both and not neither")
    paths_only = paths_only or null_ends
    if as_json and paths_only:
        raise click.UsageError("give one of --json and --paths (or -0)")
    if index_dir:
        folder = Path(index_dir)
    else:  # the library API (index/images under $MMRETRIEVE_INDEX_ROOT) only when no folder is given
        from .api import default_index_dir

        folder = default_index_dir("text" if search_texts else "image")
    reader = IndexReader(folder, model=model_ref, runtime=runtime, device=device, mmap=True)  # one query, then exit
    if multimodal:
        results = [reader.search_fused(images[0], query_text, k, fusion or "mean", weights, fusion_bundle, min_score)]
        labels = [f"{images[0]} + {query_text}"]
    else:
        results = reader.search_text(queries, k, min_score) if queries else reader.search_image(images, k, min_score)
        labels = queries or list(images)
    if as_json:
        payload = [[hit.as_dict() for hit in hits] for hits in results]
        echo_json(payload[0] if len(payload) == 1 else
                  [{"query": label, "results": hits} for label, hits in zip(labels, payload)])
        return
    for label, hits in zip(labels, results):
        if paths_only:
            _echo_paths([hit.as_dict()["path"] for hit in hits], null_ends)
            continue
        if len(labels) > 1:
            click.echo(f"# {label}")
        if not hits:
            click.echo("no results" + (f" scoring at least {min_score}" if min_score is not None else ""))
        for hit in hits:
            shown = hit.item.text if hit.item.text is not None else hit.path
            click.echo(f"{hit.rank:>3}  {hit.score:.4f}  {shown}")


def _echo_paths(paths: list[str], null_ends: bool) -> None:
    """One path per line, or each ended by NUL with -0; a newline inside a name splits it, so stderr says so."""
    if null_ends:
        for path in paths:
            click.echo(f"{path}\0", nl=False)
        return
    for path in paths:
        click.echo(path)
    if any("\n" in path for path in paths):
        click.echo("a path above contains a newline and was printed as two lines; use -0 (with xargs -0) to "
                   "keep every path whole", err=True)


@cli.command()
@click.option("--index-dir", type=click.Path(file_okay=False), envvar="MMRETRIEVE_INDEX_DIR", show_envvar=True,
              help="Image index to search (default: index/images).")
@click.option("--text-index-dir", type=click.Path(file_okay=False), envvar="MMRETRIEVE_TEXT_INDEX_DIR",
              show_envvar=True, help="Caption index for image->text search (default: index/texts if it exists "
                                     "and --index-dir is not given).")
@click.option("--host", default="127.0.0.1", show_default=True, envvar="MMRETRIEVE_HOST", show_envvar=True,
              help="Address to listen on (0.0.0.0 for every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, envvar="MMRETRIEVE_PORT",
              show_envvar=True)
@click.option("--model", "model_ref", envvar="MMRETRIEVE_MODEL", show_envvar=True,
              help="Model to embed queries with (default: the index's own; an ONNX export keeps torch out).")
@click.option("--runtime", default="auto", show_default=True, callback=registered("runtime"),
              envvar="MMRETRIEVE_RUNTIME", show_envvar=True,
              help="torch, onnx, a plugin's (see `mmretrieve plugins`), or auto: onnx for an export folder, else torch.")
@click.option("--device", envvar="MMRETRIEVE_DEVICE", show_envvar=True, help="cpu, cuda, cuda:N (default: cuda when present).")
@click.option("--api-key", envvar="MMRETRIEVE_API_KEY", show_envvar=True,
              help="Require this key (X-API-Key header or Bearer token) for /api, /file and /thumb.")
@click.option("--root", "roots", multiple=True, type=click.Path(file_okay=False), envvar="MMRETRIEVE_ROOTS",
              show_envvar=True, help="Only serve files whose real path is under this folder (repeatable; default: the "
                                     "folders indexed into the index).")
@click.option("--thumb-cache", type=click.Path(file_okay=False), envvar="MMRETRIEVE_THUMB_CACHE", show_envvar=True,
              help="Folder for generated thumbnails (default: ~/.cache/mmretrieve/thumbs).")
@click.option("--max-upload-mb", type=click.FloatRange(0.01), default=20, show_default=True,
              envvar="MMRETRIEVE_MAX_UPLOAD_MB", show_envvar=True, help="Larger query uploads get 413.")
@click.option("--max-pixels", type=click.IntRange(1), envvar="MMRETRIEVE_MAX_PIXELS", show_envvar=True,
              help="Query images with more pixels get 413 (default 40,000,000).")
@click.option("--root-path", default="", envvar="MMRETRIEVE_ROOT_PATH", show_envvar=True,
              help="URL prefix when a reverse proxy serves this under a sub-path, e.g. /search.")
@click.option("--threads", type=click.IntRange(1), envvar="MMRETRIEVE_THREADS", show_envvar=True,
              help="Threads for embedding and FAISS (default: one fewer than the cores).")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
@click.option("--json", "as_json", is_flag=True,
              help="Once listening, print one JSON line (url, port, pid, model, runtime, indexes) on stdout; "
                   "logs stay on stderr. With --port 0 the system picks a free port.")
def serve(index_dir, text_index_dir, host, port, model_ref, runtime, device, api_key, roots, thumb_cache,
          max_upload_mb, max_pixels, root_path, threads, log_level, as_json):
    """Serve search over HTTP: a web page at /, a JSON API under /api, /health and /metrics.

    The model and indexes load once; a generation published by `mmretrieve index` is
    picked up without a restart. See docs/serving.md.
    """
    from .api import default_index_dir
    from .index.store import MANIFEST
    from .serve.config import ServeConfig, default_compute_threads, default_thumb_cache

    try:
        from .serve.server import serve as run_server
    except ImportError as exc:
        raise click.ClickException(f"serving needs fastapi and uvicorn ({exc}); install them with "
                                   f"`pip install fastapi uvicorn python-multipart`") from None
    if index_dir is None and text_index_dir is None and (default_index_dir("text") / MANIFEST).is_file():
        text_index_dir = default_index_dir("text")
    config = ServeConfig(index_dir=Path(index_dir) if index_dir else default_index_dir("image"),
                         text_index_dir=Path(text_index_dir) if text_index_dir else None, model=model_ref,
                         runtime=runtime, device=device, api_key=api_key or None,
                         roots=tuple(Path(r) for r in roots), max_upload_bytes=int(max_upload_mb * (1 << 20)),
                         thumb_cache=Path(thumb_cache) if thumb_cache else default_thumb_cache(),
                         compute_threads=threads or default_compute_threads())
    if max_pixels:
        config.max_pixels = max_pixels
    def ready(info: dict) -> None:
        click.echo(json.dumps(info, ensure_ascii=False))  # one line, flushed: scripts wait for it

    run_server(config, host=host, port=port, root_path=root_path.rstrip("/"), log_level=log_level,
               on_ready=ready if as_json else None)


def _add_plugin_commands() -> None:
    from .plugins import get_host

    get_host().call_each("register_commands", cli=cli)


def main() -> None:
    _add_plugin_commands()
    cli(prog_name="mmretrieve")
