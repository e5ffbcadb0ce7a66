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
from .images import is_image_path, list_images, load_image

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


def embed_images_tolerant(paths: list[Path], embed_fn, chunk_size: int) -> tuple[Any, list[Path], list[dict]]:
    """Decode each image once, skipping (and logging) those that fail; embed in chunks."""
    import numpy as np

    from .progress import progress_bar

    matrices, good, skipped = [], [], []
    with progress_bar(total=len(paths), unit="image", desc="embed") as bar:
        for start in range(0, len(paths), chunk_size):
            decoded = []
            for path in paths[start:start + chunk_size]:
                try:
                    if not is_image_path(path):
                        raise InputError(f"{path}: not an image file type")
                    decoded.append(load_image(path))
                    good.append(path)
                except InputError as exc:
                    reason = str(exc).split(": ", 1)[-1]
                    log.warning("skipping %s: %s", path, reason)
                    skipped.append({"path": str(path), "reason": reason})
            if decoded:
                matrices.append(embed_fn("image", decoded))
            bar.update(len(paths[start:start + chunk_size]))
    return (np.concatenate(matrices) if matrices else None), good, skipped


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

    if encoder_name:
        from .encoders import create_encoder
        from .encoders.factory import encoder_spec

        modality = encoder_spec(encoder_name).modality
        other = "image" if modality == "text" else "text"
        if inputs[other]:
            raise InputError(f"encoder {encoder_name!r} embeds {modality}s only; drop the {other} inputs or use --model")
        options = apply_overrides(read_config_file(config_file) if config_file else {}, overrides)
        encoder = create_encoder(encoder_name, **options)

        def embed_fn(modality, items):
            return encoder.embed(items, batch_size=batch_size, normalize=normalize, device=device,
                                 progress=modality == "text")
    else:
        from .bundle import load_bundle

        model = load_bundle(model_ref)

        def embed_fn(modality, items):
            return model.embed(modality, items, batch_size=batch_size, device=device, progress=modality == "text")

    multi = bool(inputs["text"]) and bool(inputs["image"])
    results, skipped = [], []
    if inputs["text"]:
        results.append(("text", embed_fn("text", inputs["text"]), inputs["text"]))
    if inputs["image"]:
        matrix, good, skipped = embed_images_tolerant(inputs["image"], embed_fn, batch_size * 4)
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
