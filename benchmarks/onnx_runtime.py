"""PyTorch against onnxruntime (fp32, int8) per tower, and the cold start of `mmretrieve search`.

Throughput: the torch runtime on the bundle against the onnx runtime on its exports, at batch
1 and 32, the variants interleaved round after round (timings on this machine drift by 2x
over minutes, so only ratios within one run mean much). Texts are Flickr8k captions,
tokenised inside the timed call (both runtimes share the tokenizer); images are Flickr8k
photos preprocessed beforehand (identical arrays for both), so the image rate is the model's.

Cold start: a fresh `mmretrieve search "QUERY" --runtime onnx` process (interpreter start,
imports, plugins, index and text graph load, one query) on an index of ``--index-size``
synthetic unit vectors written through the index store API (the same SQLite + FAISS files
`mmretrieve index` writes; embedding 10k real images would take ~10 minutes here and measure
nothing more). The first process of each kind warms the page cache and is not counted.
Prints Markdown tables.

    python benchmarks/onnx_runtime.py --model runs/frozen-heads/best [--rounds 3] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared/data/flickr8k-dev/captions.jsonl"
TARGETS = {"text_speedup": 1.3, "cold_search_s": 1.5}
WORK = {1: {"text": 48, "image": 12}, 32: {"text": 256, "image": 64}}  # items per timed call, by batch


def exports(model: str, work: Path) -> dict[str, Path]:
    """fp32 and int8 exports of ``model`` in ``work`` (reused when already there)."""
    from mmretrieve.export import is_export, read_export_info
    from mmretrieve.export.exporter import export_model
    from mmretrieve.bundle import read_bundle_info

    fingerprint = read_bundle_info(model).fingerprint
    folders = {}
    for precision in ("fp32", "int8"):
        folder = work / precision
        if not (is_export(folder) and read_export_info(folder).fingerprint == fingerprint):
            print(f"exporting {precision} to {folder} ...", file=sys.stderr)
            # int8 recall is checked by `mmretrieve export --int8 --eval-data` (docs/onnx.md), not here.
            export_model(model, folder, precision=precision, force=True)
        folders[precision] = folder
    return folders


def throughput(model: str, folders: dict[str, Path], rounds: int) -> list[dict]:
    from mmretrieve.data import load_captions
    from mmretrieve.runtime.onnx_runtime import OnnxEmbedder
    from mmretrieve.runtime.torch_runtime import TorchEmbedder

    items = load_captions(DATA, check_images=False).items
    texts = [caption for item in items for caption in item.captions]
    runtimes = {"torch fp32": TorchEmbedder(model, device="cpu"),
                **{f"onnx {p}": OnnxEmbedder(folder, device="cpu") for p, folder in folders.items()},
                # The runtime alone, on exactly torch's batches (no length-sorted sub-batches): text only,
                # since images have no padding and the two rows would be the same.
                "onnx fp32, batches as given": OnnxEmbedder(folders["fp32"], device="cpu", text_sub_batch=None)}
    photos = [item.image for item in items[:WORK[32]["image"]]]
    pixels = runtimes["onnx fp32"].image_preprocessor(photos)["pixel_values"]
    calls = {
        "text": lambda embedder, batch: [embedder.embed_texts(texts[s:s + batch])
                                         for s in range(0, WORK[batch]["text"], batch)],
        "image": lambda embedder, batch: [embedder.embed_pixels(pixels[s:s + batch])
                                          for s in range(0, WORK[batch]["image"], batch)],
    }

    def measured(tower):
        return {name: e for name, e in runtimes.items() if tower == "text" or not name.endswith("as given")}

    timings: dict[tuple, list[float]] = {}
    for tower in calls:  # warm-up: sessions, allocators, oneDNN kernels
        for embedder in measured(tower).values():
            calls[tower](embedder, 32)
    for round_ in range(rounds):
        for tower in calls:
            for batch in (1, 32):
                for name, embedder in measured(tower).items():
                    started = time.perf_counter()
                    calls[tower](embedder, batch)
                    timings.setdefault((tower, batch, name), []).append(WORK[batch][tower] / (time.perf_counter() - started))
        print(f"round {round_ + 1}/{rounds} done", file=sys.stderr)
    rows = []
    for (tower, batch, name), rates in timings.items():
        # Ratio within each round (the runs seconds apart), then the median over rounds.
        ratios = [rate / base for rate, base in zip(rates, timings[(tower, batch, "torch fp32")])]
        rows.append({"tower": tower, "batch": batch, "runtime": name, "median": statistics.median(rates),
                     "runs": rates, "vs_torch": statistics.median(ratios), "ratios": ratios})
    return rows


def synthetic_index(folder: Path, export: Path, size: int) -> None:
    """``size`` random unit vectors as a published image index built "with" ``export``."""
    from mmretrieve.export import read_export_info
    from mmretrieve.index.builder import publish
    from mmretrieve.index.store import IndexStore, Item

    info = read_export_info(export)
    store = IndexStore.create(folder, {
        "modality": "image", "model": {"ref": str(export), "path": str(export), "fingerprint": info.fingerprint},
        "embed_dim": info.embed_dim, "metric": "inner_product", "normalized": True, "requested_index_type": "auto"})
    vectors = np.random.default_rng(0).standard_normal((size, info.embed_dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store.stage([Item(0, f"/synthetic/{i:06d}.jpg", 50_000, 0, None, 500, 375) for i in range(size)], vectors)
    publish(store, [])
    store.close()


def cold_search(model: str, folders: dict[str, Path], index: Path, rounds: int) -> list[dict]:
    mmretrieve = str(Path(sys.executable).with_name("mmretrieve"))
    commands = {
        "onnx fp32": [mmretrieve, "search", "a dog runs on the beach", "--index-dir", str(index), "-k", "5",
                      "--model", str(folders["fp32"]), "--runtime", "onnx"],
        "onnx int8": [mmretrieve, "search", "a dog runs on the beach", "--index-dir", str(index), "-k", "5",
                      "--model", str(folders["int8"]), "--runtime", "onnx"],
        "torch fp32": [mmretrieve, "search", "a dog runs on the beach", "--index-dir", str(index), "-k", "5",
                       "--model", model, "--runtime", "torch"],
        "imports only (python -c 'import onnxruntime, faiss, tokenizers, numpy')":
            [sys.executable, "-c", "import onnxruntime, faiss, tokenizers, numpy"],
        "imports only (python -c 'import torch')": [sys.executable, "-c", "import torch"],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for round_ in range(rounds + 1):
        for name, command in commands.items():
            started = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            if round_:  # round 0 warms the page cache
                times[name].append(time.perf_counter() - started)
    return [{"command": name, "median": statistics.median(t), "min": min(t), "runs": t} for name, t in times.items()]


def print_tables(rows: list[dict], cold: list[dict], meta: dict) -> None:
    print(f"\n{meta['machine']}, load average {meta['load_before']} before / {meta['load_after']} after; torch "
          f"{meta['torch']} ({meta['torch_threads']} threads), onnxruntime {meta['onnxruntime']} (default intra-op "
          f"threads); {meta['rounds']} interleaved rounds.\n")
    for tower, unit in (("text", "texts/s"), ("image", "images/s")):
        print(f"| {tower} tower | batch | {unit} (median) | vs torch (median of per-round ratios) | {unit}, each round |")
        print("|---|---:|---:|---:|---|")
        for row in sorted((r for r in rows if r["tower"] == tower), key=lambda r: (r["batch"], r["runtime"])):
            runs = ", ".join(f"{v:.1f}" for v in row["runs"])
            print(f"| {row['runtime']} | {row['batch']} | {row['median']:.1f} | {row['vs_torch']:.2f}x | {runs} |")
        print()
    print(f"| cold start ({meta['index_size']:,}-image index) | median s | min s | runs |")
    print("|---|---:|---:|---|")
    for row in cold:
        print(f"| {row['command']} | {row['median']:.2f} | {row['min']:.2f} | {', '.join(f'{v:.2f}' for v in row['runs'])} |")
    search = next(r for r in cold if r["command"] == "onnx fp32")
    print("\ntargets:")
    for name in ("onnx fp32", "onnx fp32, batches as given"):
        ratio = next(r["vs_torch"] for r in rows if r["tower"] == "text" and r["batch"] == 32 and r["runtime"] == name)
        print(f"- {name}: text tower at batch 32 {ratio:.2f}x torch (target >= {TARGETS['text_speedup']}x): "
              f"{'met' if ratio >= TARGETS['text_speedup'] else 'MISSED'}")
    print(f"- cold `mmretrieve search --runtime onnx`: {search['median']:.2f} s (target < {TARGETS['cold_search_s']} s): "
          f"{'met' if search['median'] < TARGETS['cold_search_s'] else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/frozen-heads/best",
                        help="a bundle (minilm-l6 + efficientnet-lite0), e.g. from the README's example training config")
    parser.add_argument("--work", help="where the exports and the index go (default: a temporary folder)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--index-size", type=int, default=10_000)
    parser.add_argument("--json", help="also write the raw numbers to this file")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    import onnxruntime
    import torch

    load_before = "%.1f" % os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        folders = exports(args.model, work)
        index = work / f"index-{args.index_size}"
        if not index.exists():
            synthetic_index(index, folders["fp32"], args.index_size)
        cold = cold_search(args.model, folders, index, args.rounds)
        rows = throughput(args.model, folders, args.rounds)
    meta = {"machine": f"{os.cpu_count()} CPU cores", "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "onnxruntime": onnxruntime.__version__, "rounds": args.rounds, "index_size": args.index_size,
            "load_before": load_before, "load_after": "%.1f" % os.getloadavg()[0]}
    print_tables(rows, cold, meta)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "throughput": rows, "cold_start": cold}, indent=2))


if __name__ == "__main__":
    main()
