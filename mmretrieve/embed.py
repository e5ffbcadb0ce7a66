"""`mmretrieve embed`: gather inputs, embed them, write .npy plus a description of each row."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

from .atomic import write_npy_atomic, write_text_atomic
from .errors import InputError
from .images import is_image_path, list_images

log = logging.getLogger(__name__)


def collect_inputs(texts, texts_file, image_args) -> dict[str, list]:
    """Texts from arguments and a file; image paths from files and (recursively) folders."""
    all_texts = list(texts)
    if texts_file:
        lines = Path(texts_file).read_text(encoding="utf-8").splitlines()
        all_texts += [line.strip() for line in lines if line.strip()]
    paths: list[Path] = []
    for arg in image_args:
        path = Path(arg)
        if path.is_dir():
            found = list_images(path)
            if not found:
                raise InputError(f"{path}: the folder holds no image files ({', '.join(('jpg', 'png', 'webp', 'bmp', 'gif', 'tiff'))})")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            raise InputError(f"{path}: no such file or folder")
    if not all_texts and not paths:
        raise InputError("nothing to embed: give --text, --texts-file or --image")
    return {"text": all_texts, "image": paths}


def embed_images_tolerant(paths: list[Path], preprocessor, embed_pixels, batch_size: int,
                          dim: int) -> tuple[Any, list[Path], list[dict]]:
    """Decode and embed each image once, skipping (and logging) those that cannot be used."""
    from .embedding import embed_image_paths
    from .progress import progress_bar

    readable = [path for path in paths if is_image_path(path)]
    with progress_bar(total=len(paths), unit="image", desc="embed") as bar:
        bar.update(len(paths) - len(readable))
        matrix, embedded, failed = embed_image_paths(readable, preprocessor, embed_pixels, batch_size, dim, bar=bar)
    reasons = {path: "not an image file type" for path in paths if not is_image_path(path)}
    reasons.update((d.path, d.error) for d in failed)
    skipped = []
    for path in paths:
        if path in reasons:
            log.warning("skipping %s: %s", path, reasons[path])
            skipped.append({"path": str(path), "reason": reasons[path]})
    return (matrix if len(embedded) else None), [d.path for d in embedded], skipped


def _output_paths(out: Path, modality: str, fmt: str, multi: bool) -> tuple[Path, Path]:
    """emb.npy + emb.rows.json; with both modalities, emb.text.npy and emb.image.npy."""
    stem = out.name[:-4] if out.name.endswith(".npy") else out.name
    if multi:
        stem = f"{stem}.{modality}"
    return out.with_name(f"{stem}.npy"), out.with_name(f"{stem}.rows.{fmt}")


def _write_rows(path: Path, rows: list[dict[str, Any]], fmt: str) -> None:
    if fmt == "json":
        write_text_atomic(path, json.dumps(rows, indent=1, ensure_ascii=False))
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["row", "modality", "input"])
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def run_embed(inputs: dict[str, list], out: Path, rows_format: str, encoder_name: str | None, model_ref: str | None,
              batch_size: int, normalize: bool, device: str | None, config_file: str | None,
              overrides: tuple[str, ...]) -> dict[str, Any]:
    from .config import apply_overrides, read_config_file
    from .embedding import torch_rows

    if encoder_name:
        from .encoders import create_encoder
        from .encoders.factory import encoder_spec

        modality = encoder_spec(encoder_name).modality
        other = "image" if modality == "text" else "text"
        if inputs[other]:
            raise InputError(f"encoder {encoder_name!r} embeds {modality}s only; drop the {other} inputs or use --model")
        options = apply_overrides(read_config_file(config_file) if config_file else {}, overrides)
        encoder = create_encoder(encoder_name, **options)

        def embed_texts(texts):
            return encoder.embed(texts, batch_size=batch_size, normalize=normalize, device=device, progress=True)

        image_tower, dim = encoder, encoder.dim
        run = torch_rows(encoder.module, lambda inputs: encoder.features(inputs, normalize), device)
    else:
        from .bundle import load_bundle

        model = load_bundle(model_ref)

        def embed_texts(texts):
            return model.embed("text", texts, batch_size=batch_size, device=device, progress=True)

        image_tower, dim = model.image_encoder, model.embed_dim
        run = torch_rows(model, model.encode_image, device)

    multi = bool(inputs["text"]) and bool(inputs["image"])
    results, skipped = [], []
    if inputs["text"]:
        results.append(("text", embed_texts(inputs["text"]), inputs["text"]))
    if inputs["image"]:
        normalize = image_tower.preprocessor.normalize  # the pool sends uint8 pixels
        matrix, good, skipped = embed_images_tolerant(inputs["image"], image_tower.preprocessor,
                                                      lambda pixels: run({"pixel_values": normalize(pixels)}),
                                                      batch_size, dim)
        if matrix is None:
            raise InputError(f"none of the {len(inputs['image'])} images could be read; nothing to embed")
        results.append(("image", matrix, good))
    outputs = []
    for modality, matrix, items in results:
        npy_path, rows_path = _output_paths(out, modality, rows_format, multi)
        write_npy_atomic(npy_path, matrix)
        rows = [{"row": i, "modality": modality, "input": str(item)} for i, item in enumerate(items)]
        _write_rows(rows_path, rows, rows_format)
        outputs.append({"modality": modality, "rows": int(matrix.shape[0]), "dim": int(matrix.shape[1]),
                        "path": str(npy_path), "rows_file": str(rows_path)})
    return {"outputs": outputs, "skipped": skipped}
