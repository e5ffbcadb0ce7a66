"""Index bookkeeping at scale: what staging a batch and publishing cost in SQLite, and how many
bytes each item takes, with 1k to 1M items already published (issue 17, items 4 and 5).

Synthetic items go through ``IndexStore`` exactly as ``mmretrieve index`` sends them: paths in
a realistic folder tree (``/srv/photos/<year>/<event>/IMG_<n>.jpg``, ~60 bytes), size,
mtime, SHA-256, width and height, and random unit vectors (``--dim``, 256 by default). For
each size an index is filled once (staged in large batches, published once); then each
measurement runs in a fresh process that opens it and, ``--rounds`` times, stages batches of
32 items (24 new files, 8 changed ones) and publishes them. Measured:

- ``stage ms``: one ``IndexStore.stage`` of 32 items (median over all batches);
- ``publish ms``: the SQLite side of ``builder.publish`` (staged rows, ids of removed and
  replaced items, the count, ``IndexStore.publish``), FAISS excluded (it is the same with or
  without this bookkeeping, and measured by ``index_backends.py``);
- bytes per item of ``items.sqlite`` (with its WAL) and of the stored embeddings outside it
  (none before issue 17: they were in SQLite), after the index was filled and published;
- the measuring process's peak RSS.

Sizes are measured interleaved (rounds alternate their order), one process per measurement.

    python benchmarks/index_bookkeeping.py                        # 1k, 10k, 100k, 1M (~10 min)
    python benchmarks/index_bookkeeping.py --sizes 1000 10000     # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BATCH = 32
NEW_PER_BATCH = 24
FILL_BATCH = 10_000


def item_path(n: int) -> str:
    """A photo path in a tree of years and events, ~200 photos per event folder."""
    event = n // 200
    return f"/srv/photos/{2000 + event % 25}/event-{event:05d}/IMG_{n:07d}.jpg"


def make_items(numbers, rng):
    from mmretrieve.index.store import Item

    return [Item(0, item_path(int(n)), size=int(rng.integers(50_000, 5_000_000)),
                 mtime_ns=1_700_000_000 * 10**9 + int(n), sha256=rng.bytes(32).hex(), width=int(rng.integers(320, 4000)), height=int(rng.integers(240, 3000)))
            for n in numbers]


def unit_vectors(rng, n: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def manifest(dim: int) -> dict:
    return {"modality": "image", "model": {"ref": "synthetic", "path": "synthetic", "fingerprint": "0" * 32},
            "embed_dim": dim, "query_padding": 0, "metric": "inner_product", "normalized": True,
            "requested_index_type": "flat"}


def folder_bytes(data: Path) -> tuple[int, int]:
    """(items.sqlite with its WAL, stored embeddings outside SQLite) in bytes."""
    sqlite = sum(p.stat().st_size for p in data.glob("items.sqlite*") if p.name != "items.sqlite-shm")
    vectors = sum(p.stat().st_size for p in data.glob("embeddings*") if p.is_file())
    return sqlite, vectors


def fill(folder: Path, size: int, dim: int) -> dict:
    """An index of ``size`` published items (SQLite only; no FAISS folder is needed here)."""
    from mmretrieve.index.store import IndexStore

    rng = np.random.default_rng(size)
    started = time.perf_counter()
    store = IndexStore.create(folder, manifest(dim))
    for start in range(0, size, FILL_BATCH):
        numbers = range(start, min(size, start + FILL_BATCH))
        store.stage(make_items(numbers, rng), unit_vectors(rng, len(numbers), dim))
    store.publish(1, [], "flat", {}, "flat")
    store.activate()
    store.close()
    seconds = time.perf_counter() - started
    sqlite, vectors = folder_bytes(folder / IndexStore.open(folder, readonly=True).name)
    return {"fill_s": seconds, "sqlite_bytes": sqlite, "vector_bytes": vectors}


def measure(folder: Path, size: int, dim: int, batches: int, publishes: int, seed: int) -> dict:
    """In this process: stage ``batches`` batches, then publish, ``publishes`` times."""
    from mmretrieve.index.store import IndexStore

    rng = np.random.default_rng(seed)
    store = IndexStore.open(folder)
    next_new = size * 10 + seed * 1_000_000  # paths no fill or other measurement used
    stage_ms, publish_ms = [], []
    for _ in range(publishes):
        removed = [item_path(int(n)) for n in rng.integers(0, size, 4)]
        for _ in range(batches):
            numbers = list(range(next_new, next_new + NEW_PER_BATCH)) + \
                [int(n) for n in rng.integers(0, size, BATCH - NEW_PER_BATCH)]
            next_new += NEW_PER_BATCH
            items, vectors = make_items(numbers, rng), unit_vectors(rng, BATCH, dim)
            started = time.perf_counter()
            store.stage(items, vectors)
            stage_ms.append((time.perf_counter() - started) * 1e3)
        started = time.perf_counter()
        # What builder.publish asks SQLite besides writing FAISS.
        staged_ids, _ = store.staged()
        removed_ids = store.item_ids_for_paths(removed)
        live = store.count() - len(set(removed_ids)) + \
            len(set(staged_ids.tolist()) - set(store.items_by_id(staged_ids)))
        store.publish(store.generation + 1, removed, "flat", {}, "flat")
        publish_ms.append((time.perf_counter() - started) * 1e3)
        assert live == store.count(), (live, store.count())
    store.close()
    return {"stage_ms": stage_ms, "publish_ms": publish_ms, "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started its program (VmHWM; ru_maxrss would
    carry over the high-water mark of the parent it was forked from)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="measurements per size, interleaved")
    parser.add_argument("--batches", type=int, default=40, help="staged batches per publish")
    parser.add_argument("--publishes", type=int, default=3, help="publishes per measurement")
    parser.add_argument("--workdir", type=Path, default=None, help="where the indexes go (default: a temporary folder)")
    parser.add_argument("--child", nargs=4, metavar=("FOLDER", "SIZE", "DIM", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        folder, size, dim, seed = Path(args.child[0]), *map(int, args.child[1:])
        print(json.dumps(measure(folder, size, dim, args.batches, args.publishes, seed)))
        return

    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="index-bookkeeping-", dir=args.workdir))
    try:
        filled = {}
        for size in args.sizes:
            print(f"filling {size:,} items ...", file=sys.stderr, flush=True)
            filled[size] = fill(work / f"n{size}", size, args.dim)
            print(f"  {filled[size]['fill_s']:.1f} s", file=sys.stderr, flush=True)
        results = {size: [] for size in args.sizes}
        for round_ in range(args.rounds):
            order = args.sizes if round_ % 2 == 0 else list(reversed(args.sizes))
            for size in order:
                out = subprocess.run([sys.executable, __file__, "--batches", str(args.batches), "--publishes",
                                      str(args.publishes), "--child", str(work / f"n{size}"), str(size),
                                      str(args.dim), str(round_ + 1)],
                                     check=True, capture_output=True, text=True).stdout
                results[size].append(json.loads(out))
                print(f"round {round_ + 1}: {size:,} items measured", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"{args.dim}-d vectors; {args.rounds} interleaved rounds x {args.publishes} publishes x {args.batches} "
          f"batches of {BATCH}; {os.cpu_count()} CPUs; load average (1, 5, 15 min) at start "
          f"{', '.join(f'{x:.2f}' for x in load_before)}, at end {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| items published | stage ms (median) | stage p90 | vs smallest | publish ms (median) | "
          "items.sqlite B/item | embeddings outside SQLite B/item | fill s | peak RSS MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = None
    for size in args.sizes:
        stage = [ms for r in results[size] for ms in r["stage_ms"]]
        publish = [ms for r in results[size] for ms in r["publish_ms"]]
        median = statistics.median(stage)
        base = base or median
        p90 = float(np.percentile(stage, 90))
        print(f"| {size:,} | {median:.2f} | {p90:.2f} | {median / base:.2f}x | {statistics.median(publish):.1f} | "
              f"{filled[size]['sqlite_bytes'] / size:,.0f} | {filled[size]['vector_bytes'] / size:,.0f} | "
              f"{filled[size]['fill_s']:.1f} | {max(r['peak_rss_mb'] for r in results[size]):.0f} |")


if __name__ == "__main__":
    main()
