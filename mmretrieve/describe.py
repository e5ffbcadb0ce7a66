"""`mmretrieve info`: what a folder holds — a model bundle, an ONNX export or an index — as
lines for people or a dict for --json. Reads metadata only (no torch, no onnxruntime)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import BundleError


def kind_of(ref: str | Path) -> str:
    """"export", "index" or "bundle" (also for anything else: the bundle reader explains what is wrong)."""
    import json

    from .export.manifest import is_export
    from .index.store import FORMAT as INDEX_FORMAT, MANIFEST

    folder = Path(ref)
    if is_export(folder):
        return "export"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return "bundle"
    return "index" if isinstance(manifest, dict) and manifest.get("format") == INDEX_FORMAT else "bundle"


def fusion_head_lines(folder: Path) -> tuple[dict[str, Any], list[str]]:
    from .fusion.store import attached_heads, read_fusion_info

    heads = {name: read_fusion_info(path) for name, path in attached_heads(folder).items()}  # verifies hashes
    lines = []
    for name, head in heads.items():
        trained = head.get("training", {})
        lines.append(f"fusion head:  {name} ({head['dim']}-d, {trained.get('steps', '?')} steps on "
                     f"{trained.get('images', '?')} images; head {str(head.get('head_digest'))[:12]})")
    return heads, lines


def describe_export(ref: str | Path, verify: bool) -> tuple[dict[str, Any], list[str]]:
    from .export.manifest import read_export_info

    info = read_export_info(ref)
    m = info.manifest
    heads, head_lines = fusion_head_lines(info.path)
    lines = [f"export:       {info.path}",
             f"format:       {m['format']} v{m['format_version']} (mmretrieve {m['mmretrieve_version']})",
             f"fingerprint:  {m['fingerprint']} (of {m['source']['path']})",
             f"embed dim:    {m['embed_dim']}  precision: {m['precision']}  opset: {m['opset']}"]
    lines += [f"{tower + ' tower:':<13} {graph['file']}, fp32 vs PyTorch min cosine "
              f"{m.get('parity', {}).get(tower, {}).get('min_cosine', float('nan')):.6f}"
              for tower, graph in m["towers"].items()]
    lines += head_lines
    if verify:
        from .formats import damaged_file

        damaged = damaged_file(info.path, m.get("files", {}))
        if damaged:
            raise BundleError(f"{info.path}: {damaged} is missing or does not match its recorded hash; "
                              f"the export is damaged")
        lines.append(f"verified:     {len(m.get('files', {}))} files match their hashes")
    return {"path": str(info.path), "export": m, "fusion_heads": heads}, lines


def describe_index(ref: str | Path) -> tuple[dict[str, Any], list[str]]:
    from .fusion.items import fusion_label
    from .index.store import read_manifest

    m = read_manifest(Path(ref))
    counts = m.get("counts", {})
    lines = [f"index:        {Path(ref)}",
             f"format:       {m['format']} v{m['format_version']} (mmretrieve {m['mmretrieve_version']})",
             f"holds:        {counts.get('items', 0):,} {m['modality']} items, {counts.get('failures', 0):,} files "
             f"that failed to read; generation {m.get('generation', 0)}, {m.get('index_type', '?')} index",
             f"model:        {m['model']['ref']} (fingerprint {m['model']['fingerprint'][:12]}), {m['embed_dim']}-d",
             f"fusion:       {fusion_label(m.get('fusion'))}"]
    if m.get("captions"):
        lines.append(f"captions:     {m['captions']}")
    return {"path": str(ref), "index": m}, lines
