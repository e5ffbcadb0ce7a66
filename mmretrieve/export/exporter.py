"""`mmretrieve export`: a bundle's towers to ONNX, checked in onnxruntime before anything is written.

Every candidate folder (fp32 first, then the reduced-precision one if asked for) is complete
(graphs, preprocessing, manifest) and is loaded by the onnx runtime itself, exactly as users
will load it. fp32 must match PyTorch (``parity``); a reduced precision must keep retrieval
recall (``recall``). Only then is the chosen folder moved into place, atomically.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from .. import __version__
from ..formats import sha256_file
from ..errors import ExportError
from .manifest import EXPORT_JSON, FORMAT, FORMAT_VERSION, PRECISIONS, TOWER_GRAPHS, is_export
from .recall import GATED_METRICS, MAX_RECALL_DROP, onnx_embedder, recall_report, require_recall

log = logging.getLogger(__name__)


def check_target(out: Path) -> None:
    """An earlier export is replaced (atomically); any other non-empty folder is refused, since the
    final rename would delete what is in it."""
    if out.is_file():
        raise ExportError(f"{out} is a file; --out must be a folder for the export")
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        raise ExportError(f"{out} exists and is not an ONNX export; choose a new --out folder so nothing is replaced")


def export_model(model_ref: str, out: str | Path, precision: str = "fp32", eval_data: str | Path | None = None,
                 force: bool = False, opset: int | None = None, progress: bool = False,
                 calibration: str | Path | None = None, int8_towers: list[str] | None = None) -> dict[str, Any]:
    """Export ``model_ref`` (a bundle or registered model) to ``out``; returns export.json's content.

    ``calibration``: a folder of images (or one image) that makes an int8 export's image tower
    static int8, calibrated on the first CALIBRATION_IMAGES of them; without it int8 keeps that
    tower fp32. ``int8_towers``: the towers an int8 export quantises (default: text, and image when
    calibrated), e.g. ["image"] where the text tower's int8 loses recall."""
    from .graph import DEFAULT_OPSET, check_opset

    out = Path(out)
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    opset = check_opset(DEFAULT_OPSET if opset is None else opset)
    check_target(out)
    if precision != "fp32" and eval_data is None and not force:
        raise ExportError(f"an {precision} export changes the embeddings; give --eval-data FILE to check that "
                          f"retrieval recall holds, or --force to export it unchecked")
    eval_items = _load_eval_items(eval_data) if eval_data is not None else None
    calibration_images = _calibration_images(calibration, precision) if calibration is not None else None
    int8_towers = _int8_towers(int8_towers, precision, calibration_images is not None)

    from ..atomic import atomic_directory, scratch_directory
    from ..bundle import load_bundle

    model = load_bundle(model_ref).to("cpu").eval()
    started = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    with scratch_directory(out) as work:  # a killed export's is removed by the next one
        fp32 = Path(work) / "fp32"
        manifest = _write_fp32(model, str(model_ref), fp32, opset)
        chosen = fp32
        if precision != "fp32":
            chosen = Path(work) / precision
            manifest = _write_reduced(model, fp32, chosen, precision, manifest, calibration_images, int8_towers)
        if eval_items is not None:
            manifest["recall"] = _check_recall(fp32, chosen, precision, eval_items, str(eval_data), force, progress)
        elif precision != "fp32":
            log.warning("%s export written without a recall check (--force, no --eval-data)", precision)
        manifest["fusion_heads"] = _carry_fusion_heads(model, chosen)
        manifest["seconds"] = round(time.time() - started, 1)
        _write_manifest(chosen, manifest, with_hashes=True)
        with atomic_directory(out) as staging:
            for item in chosen.iterdir():
                shutil.move(str(item), staging / item.name)
    return manifest


def _carry_fusion_heads(model, folder: Path) -> dict[str, Any]:
    """The bundle's trained fusion heads, re-saved into the export (their ONNX graphs parity-checked
    again), so the onnx runtime fuses items and queries without torch."""
    from ..fusion.store import FUSION_FOLDER, attached_heads, load_fusion, read_fusion_info, save_fusion

    carried = {}
    for name, source in attached_heads(model.bundle.path).items():
        strategy = load_fusion(source, base_fingerprint=model.bundle.fingerprint)
        target = save_fusion(strategy, folder / FUSION_FOLDER / name, model.bundle.fingerprint,
                             training=read_fusion_info(source).get("training"))
        carried[name] = {"head_digest": strategy.digest,
                         "onnx_min_cosine": read_fusion_info(target)["onnx_parity"]["min_cosine"]}
        log.info("fusion head %s carried into the export (ONNX parity %.6f)", name, carried[name]["onnx_min_cosine"])
    return carried


def _calibration_images(calibration: str | Path, precision: str) -> list[Path]:
    from ..images import list_images
    from .precision import CALIBRATION_IMAGES

    if precision != "int8":
        raise ExportError(f"--calibration calibrates static int8 for the image tower; it goes with --int8, "
                          f"not an {precision} export")
    images = list_images(Path(calibration))[:CALIBRATION_IMAGES]
    if not images:
        raise ExportError(f"{calibration}: no images to calibrate int8 with")
    return images


def _int8_towers(towers: list[str] | None, precision: str, calibrated: bool) -> list[str] | None:
    if towers is None:
        return (["text", "image"] if calibrated else ["text"]) if precision == "int8" else None
    towers = [tower for tower in TOWER_GRAPHS if tower in towers]  # in graph order, each once
    if precision != "int8":
        raise ExportError(f"--int8-towers chooses what an int8 export quantises; it goes with --int8, "
                          f"not an {precision} export")
    if not towers:
        raise ExportError("--int8-towers must name text, image or both")
    if "image" in towers and not calibrated:
        raise ExportError("an int8 image tower is calibrated on images: give --calibration IMAGES")
    if calibrated and "image" not in towers:  # the images would calibrate nothing
        raise ExportError("--calibration calibrates the image tower's int8, which --int8-towers leaves out: "
                          "add image to --int8-towers or drop --calibration")
    return towers


def _load_eval_items(eval_data):
    from ..data import load_captions

    return load_captions(eval_data).items


def _write_fp32(model, model_ref: str, folder: Path, opset: int) -> dict[str, Any]:
    """The fp32 candidate, written and then held to PyTorch parity in onnxruntime."""
    import onnx
    import onnxruntime
    import torch

    from .graph import export_tower
    from .parity import measure, require_parity

    folder.mkdir()
    for tower in TOWER_GRAPHS:
        export_tower(model, tower, folder / TOWER_GRAPHS[tower]["file"], opset)
        (folder / tower).mkdir()
        encoder = model.text_encoder if tower == "text" else model.image_encoder
        encoder.preprocessor.save(folder / tower)
    bundle = model.bundle
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mmretrieve_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fingerprint": bundle.fingerprint,
        "source": {"ref": model_ref, "path": str(bundle.path.resolve()), "fingerprint": bundle.fingerprint},
        "embed_dim": model.embed_dim,
        "precision": "fp32",
        "opset": opset,
        "exporter": f"torch.onnx TorchScript exporter (torch {torch.__version__})",
        "versions": {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "towers": {tower: {**graph, "dim": model.embed_dim} for tower, graph in TOWER_GRAPHS.items()},
    }
    _write_manifest(folder, manifest)
    embedder = onnx_embedder(folder)
    manifest["parity"] = {}
    for tower in TOWER_GRAPHS:
        report = measure(model, embedder, tower)
        log.info("%s tower parity: %s", tower, report)
        require_parity(tower, report)
        manifest["parity"][tower] = report
    return manifest


def _write_reduced(model, fp32: Path, folder: Path, precision: str, manifest: dict[str, Any],
                   calibration: list[Path] | None = None, int8_towers: list[str] | None = None) -> dict[str, Any]:
    """The int8 or fp16 candidate, with its agreement with PyTorch measured (reported, not gated);
    ``calibration`` images make an int8 image tower static int8."""
    import onnx

    from .parity import measure
    from .precision import CALIBRATION_BATCH, INT8_SETTINGS, STATIC_IMAGE_SETTINGS, cpu_vnni, reduce_precision

    shutil.copytree(fp32, folder, ignore=shutil.ignore_patterns("*.onnx", EXPORT_JSON))
    batches = None
    if calibration is not None:
        from ..preprocess import ImagePreprocessor

        preprocessor = ImagePreprocessor.load(fp32 / "image")  # the export's own: bytes, as the graph takes
        name = TOWER_GRAPHS["image"]["inputs"][0]

        def batches():
            return ({name: preprocessor.uint8_batch(calibration[start:start + CALIBRATION_BATCH])}
                    for start in range(0, len(calibration), CALIBRATION_BATCH))
    for tower, graph in TOWER_GRAPHS.items():
        reduce_precision(precision, fp32 / graph["file"], folder / graph["file"], tower,
                         calibration=batches if tower == "image" else None, int8_towers=int8_towers)
        onnx.checker.check_model(str(folder / graph["file"]))
    manifest = dict(manifest, precision=precision)
    if precision == "int8":
        # INT8_SETTINGS (dynamic MatMul) describe the text tower's quantisation only.
        manifest["int8_settings"] = {**INT8_SETTINGS, "towers": int8_towers} if "text" in int8_towers \
            else {"towers": int8_towers}
        if "image" in int8_towers:
            manifest["int8_settings"]["image"] = {**STATIC_IMAGE_SETTINGS, "calibration_images": len(calibration),
                                                  "exporting_cpu_vnni": cpu_vnni()}
    _write_manifest(folder, manifest)
    # Runs the reduced graphs on real inputs; on CPU this is also the check that fp16 runs at all.
    embedder = onnx_embedder(folder)
    manifest["agreement"] = {tower: measure(model, embedder, tower) for tower in TOWER_GRAPHS}
    return manifest


def _check_recall(fp32: Path, chosen: Path, precision: str, items, eval_data: str, force: bool,
                  progress: bool) -> dict[str, Any]:
    """Recall of the fp32 export and, for a reduced precision, of the reduced one, which may not
    lose more than MAX_RECALL_DROP points of any of R@1, R@5 and R@10 either way (unless forced)."""
    results = {"fp32": recall_report(fp32, items, progress)}
    if chosen != fp32:
        results[precision] = recall_report(chosen, items, progress)
        require_recall(results["fp32"], results[precision], precision, force)
    return {"eval_data": eval_data, "results": results,
            "gate": f"each of {', '.join(GATED_METRICS)} may drop at most {MAX_RECALL_DROP} points, either direction"}


def _write_manifest(folder: Path, manifest: dict[str, Any], with_hashes: bool = False) -> None:
    if with_hashes:
        manifest["files"] = {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*"))
                             if p.is_file() and p.name != EXPORT_JSON}
    (folder / EXPORT_JSON).write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
