"""`mmretrieve info`: what a folder holds — a model bundle, an ONNX export or an index — as
lines for people or a dict for --json. Reads metadata only (no torch, no onnxruntime)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def kind_of(ref: str | Path) -> str:
    """"export", "index" or "bundle" (also for anything else: the bundle reader explains what is wrong)."""
    from .export.manifest import is_export
    from .formats import peek_json_object
    from .index.store import FORMAT as INDEX_FORMAT, MANIFEST

    folder = Path(ref)
    if is_export(folder):
        return "export"
    manifest = peek_json_object(folder / MANIFEST)
    if manifest is not None:
        return "index" if manifest.get("format") == INDEX_FORMAT else "bundle"
    # A manifest that is no JSON object, beside an index's data: a damaged index (for --verify to report).
    return "index" if (folder / MANIFEST).is_file() and _holds_index_data(folder) else "bundle"


def _holds_index_data(folder: Path) -> bool:
    from .index.store import DATABASE, LEGACY_STORE, data_folder_names

    return bool(data_folder_names(folder)) or (folder / LEGACY_STORE / DATABASE).is_file()


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

    info = read_export_info(ref, verify=verify)
    m = info.manifest
    heads, head_lines = fusion_head_lines(info.path)
    lines = [f"export:       {info.path}",
             f"format:       {m['format']} v{m['format_version']} (mmretrieve {m['mmretrieve_version']})",
             f"fingerprint:  {m['fingerprint']} (of {m['source']['path']})",
             f"embed dim:    {m['embed_dim']}  precision: {m['precision']}  opset: {m['opset']}"]
    checks = export_checks(m)
    for tower, graph in m["towers"].items():
        parity = checks["parity"][tower]
        line = (f"{tower + ' tower:':<13} {graph['file']}, fp32 vs PyTorch min cosine "
                + ("not recorded" if parity is None else f"{parity:.6f}"))
        if tower in checks["agreement"]:
            agreement = checks["agreement"][tower]
            line += (f"; {m['precision']} vs PyTorch min cosine {agreement['min_cosine']:.4f} "
                     f"(mean {agreement['mean_cosine']:.4f})")
        lines.append(line)
    lines += _recall_lines(m["precision"], checks["recall"])
    lines += head_lines
    if verify:  # read_export_info re-hashed them
        lines.append(f"verified:     {len(m.get('files', {}))} files match their hashes")
    return {"path": str(info.path), "export": m, "checks": checks, "fusion_heads": heads}, lines


def export_checks(m: dict[str, Any]) -> dict[str, Any]:
    """What the export recorded about its own precision: fp32 parity per tower, a reduced
    precision's agreement with PyTorch, and the Recall@K gate (None when no recall was measured)."""
    from .export.recall import GATED, GATED_METRICS, MAX_RECALL_DROP, recall_drops

    checks: dict[str, Any] = {
        "precision": m["precision"],
        "parity": {tower: m.get("parity", {}).get(tower, {}).get("min_cosine") for tower in m["towers"]},
        "agreement": {tower: {key: report[key] for key in ("min_cosine", "mean_cosine")}
                      for tower, report in m.get("agreement", {}).items()},
        "recall": None,
    }
    recall = m.get("recall")
    if recall:
        results = recall.get("results", {})
        gate: dict[str, Any] = {"eval_data": recall.get("eval_data"), "metric": GATED,
                                GATED: {variant: {d: r[d][GATED] for d in ("t2i", "i2t")}
                                        for variant, r in results.items()}}
        if m["precision"] != "fp32" and {"fp32", m["precision"]} <= set(results):
            # Every R@K is gated; "drop" is each direction's largest loss, "drops" every one.
            every = {d: {k: round(v, 2) for k, v in by_metric.items()}
                     for d, by_metric in recall_drops(results["fp32"], results[m["precision"]]).items()}
            drops = {d: max(by_metric.values()) for d, by_metric in every.items()}
            gate.update(drop=drops, drops=every, gated=list(GATED_METRICS), max_drop=MAX_RECALL_DROP,
                        passed=max(drops.values()) <= MAX_RECALL_DROP)
        checks["recall"] = gate
    return checks


def _recall_lines(precision: str, gate: dict[str, Any] | None) -> list[str]:
    if gate is None:
        return [] if precision == "fp32" else [
            f"recall:       not checked; this {precision} export was written with --force and no --eval-data"]
    metric = gate["metric"]
    lines = [f"{'recall ' + metric + ':':<13} "
             + "; ".join(f"{variant}: t2i {r['t2i']:.2f}, i2t {r['i2t']:.2f}" for variant, r in gate[metric].items())
             + f" (on {gate['eval_data']})"]
    if "passed" in gate:
        worst = max(gate["drop"], key=gate["drop"].get)
        by_metric = gate.get("drops", {}).get(worst, {metric: gate["drop"][worst]})
        worst_metric = max(by_metric, key=by_metric.get)
        verdict = "passed" if gate["passed"] else "FAILED, written with --force"
        lines.append(f"recall gate:  {verdict} ({precision} loses {gate['drop'][worst]:.2f} points of {worst} "
                     f"{worst_metric}; at most {gate['max_drop']} allowed on each of "
                     f"{', '.join(gate.get('gated', [metric]))})")
    return lines


def describe_index(ref: str | Path, verify: bool = False) -> tuple[dict[str, Any], list[str]]:
    """What an index holds, counted in its SQLite database (the manifest's counts are a cache),
    and where its published vectors are. Damage it meets is an IndexDamagedError naming the
    rebuild command; with ``verify`` every part is checked instead (``payload["verify"]``,
    a ``mmretrieve.index.verify`` report) and the description falls back on the manifest."""
    from .errors import IndexDamagedError
    from .index.fused import fusion_label
    from .index.store import IndexStore, read_manifest
    from .index.verify import published_vectors

    folder = Path(ref)
    try:
        m = read_manifest(folder)
    except IndexDamagedError:
        if not verify:
            raise
        return _unreadable_index(folder)
    counts, kind, vectors_line = None, m.get("index_type", "?"), None
    try:
        with IndexStore(folder, m, readonly=True) as store:
            counts = store.counts()
            kind = store.published_index_type()[0] or kind
            published = published_vectors(folder, store, m)
            if published:
                where, meta = published
                vectors_line = f"published:    {where} ({meta['kind']}, {meta['count']:,} vectors)"
    except IndexDamagedError:
        if not verify:
            raise
    source = "" if counts is not None else " (as the manifest last recorded them)"
    cached = m.get("counts", {})
    counts = counts or {"items": cached.get("items", 0), "failures": cached.get("failures", 0),
                        "generation": m.get("generation", 0)}
    lines = [f"index:        {folder}",
             f"format:       {m['format']} v{m['format_version']} (mmretrieve {m['mmretrieve_version']})",
             f"holds:        {counts['items']:,} {m['modality']} items, {counts['failures']:,} files that failed to "
             f"read; generation {counts['generation']}, {kind} index{source}",
             f"model:        {m['model']['ref']} (fingerprint {m['model']['fingerprint'][:12]}), {m['embed_dim']}-d",
             f"fusion:       {fusion_label(m.get('fusion'))}"]
    if m.get("captions"):
        lines.append(f"captions:     {m['captions']}")
    if vectors_line:
        lines.append(vectors_line)
    payload: dict[str, Any] = {"path": str(ref), "index": m, "counts": counts}
    if verify:
        from .index.verify import verify_index

        report = verify_index(folder)
        payload["verify"] = report.as_dict()
        lines += report.lines()
        if report.ok:  # otherwise the verdict is the command's error sentence
            lines.append(f"verified:     {report.verdict}")
    return payload, lines


def _unreadable_index(folder: Path) -> tuple[dict[str, Any], list[str]]:
    """--verify on an index whose manifest cannot be read: the checks say so (a failed "manifest")."""
    from .index.verify import verify_index

    report = verify_index(folder)
    return {"path": str(folder), "index": None, "counts": None, "verify": report.as_dict()}, \
        [f"index:        {folder}", *report.lines()]
