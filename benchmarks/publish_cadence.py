"""What publishing on the way costs an index run of N items: every ``commit_every`` items (the rule
before) against ``builder.publish_due`` (the interval grows with the index, up to 256 MiB of
staged vectors).

Each publish writes the whole FAISS index again (a new generation folder that readers switch to),
so the total grows with the number of publishes times the index's size. Synthetic items (the
paths, sizes and SHA-256s of ``index_bookkeeping.py``, random unit vectors of ``--dim``, 896 as
the default model's) are staged ``--chunk`` at a time through ``IndexStore`` and published by
``builder.publish`` (FAISS included, the index type chosen as ``mmretrieve index`` chooses it:
flat, then HNSW past 14,285 vectors at 896-d), each variant into a fresh index, the variants
alternating over ``--rounds``. Embedding is left out: it is the same for both.

    python benchmarks/publish_cadence.py [--items 100000] [--dim 896] [--commit-every 5000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from index_bookkeeping import make_items, manifest, unit_vectors  # noqa: E402 - the same synthetic items

from mmretrieve.index.builder import publish, publish_due  # noqa: E402
from mmretrieve.index.store import IndexStore  # noqa: E402

VARIANTS = {
    "every commit_every items (before)": lambda since, published, every, dim: since >= every,
    "publish_due (the interval grows with the index)": publish_due,
}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run(folder: Path, items: int, dim: int, chunk: int, commit_every: int, due) -> dict:
    """Stage ``items`` synthetic items ``chunk`` at a time, publishing when ``due`` says and at the end."""
    rng = np.random.default_rng(0)
    store = IndexStore.create(folder, {**manifest(dim), "requested_index_type": "auto"})
    publishes, publish_s, written, since, published, most_staged = 0, 0.0, 0, 0, 0, 0
    started = time.perf_counter()
    try:
        for start in range(0, items, chunk):
            numbers = range(start, min(items, start + chunk))
            store.stage(make_items(numbers, rng), unit_vectors(rng, len(numbers), dim))
            since += len(numbers)
            last = start + chunk >= items
            if last or due(since, published, commit_every, dim):
                most_staged = max(most_staged, since)
                began = time.perf_counter()
                generation, kind = publish(store, [])
                publish_s += time.perf_counter() - began
                publishes += 1
                written += folder_bytes(store.vectors_folder(generation))
                since, published = 0, store.count()
    finally:
        store.close()
    return {"publishes": publishes, "publish_s": publish_s, "total_s": time.perf_counter() - started,
            "written_gb": written / 1e9, "kind": kind, "most_staged_mb": most_staged * 4 * dim / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=896)
    parser.add_argument("--chunk", type=int, default=1000, help="items staged at a time")
    parser.add_argument("--commit-every", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    load_before = os.getloadavg()
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for round_ in range(args.rounds):
        names = list(VARIANTS) if round_ % 2 == 0 else list(VARIANTS)[::-1]
        for name in names:
            with tempfile.TemporaryDirectory() as tmp:
                results[name].append(run(Path(tmp) / "index", args.items, args.dim, args.chunk, args.commit_every,
                                         VARIANTS[name]))
            print(f"round {round_ + 1}, {name}: {results[name][-1]}", file=sys.stderr, flush=True)
    print(f"\n{args.items:,} items of {args.dim}-d, staged {args.chunk} at a time, commit_every {args.commit_every}, "
          f"{args.rounds} rounds; load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after\n")
    print("| publishing | publishes | FAISS written (GB) | most vectors one publish reads (MiB) | publish s (median) "
          "| run s (median) | final index |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, runs in results.items():
        print(f"| {name} | {runs[0]['publishes']} | {runs[0]['written_gb']:.2f} | {runs[0]['most_staged_mb']:.0f} | "
              f"{statistics.median(r['publish_s'] for r in runs):.1f} | "
              f"{statistics.median(r['total_s'] for r in runs):.1f} | {runs[0]['kind']} |")


if __name__ == "__main__":
    main()
