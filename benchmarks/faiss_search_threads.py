"""A warm text query on every faiss index kind: faiss's OpenMP threads as the search policy sets
them for a few queries (one thread below 20; ThreadPolicy.faiss_threads) against a thread per
core (faiss's default; the policy with that rule switched off). The flat index follows
the rule; hnsw and ivfpq keep faiss's threads, and this script is why.

A query is what `search` does per query: the caption embedded by the export's text tower in
onnxruntime (whose threads spin after each run, as the search policy lets them), then the index
searched (k = 10). Each kind is built once over ``--count`` random unit vectors of the export's
width; rounds alternate the two settings, each timing ``--queries`` Flickr8k captions one at a
time and keeping the median. Prints every round, the medians, the ratio and the load average.

    python benchmarks/faiss_search_threads.py --export EXPORT [--count 20000] [--rounds 5] [--queries 100]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from mmretrieve import threads
from mmretrieve.index.backends import create_index
from mmretrieve.runtime.onnx_runtime import OnnxEmbedder

FEW_QUERIES_RULE = threads.ThreadPolicy.faiss_threads
CAPTIONS = Path(__file__).resolve().parents[2] / "shared/data/flickr8k-dev/captions.jsonl"

KINDS = {"flat": {}, "hnsw": {}, "ivfpq": {"nlist": 256, "nprobe": 16}}
SETTINGS = ("policy: 1 thread", "a thread per core")


def unit_rows(rng, n: int, dim: int) -> np.ndarray:
    rows = rng.standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def per_query_ms(index, embedder, captions: list[str]) -> float:
    times = []
    for caption in captions:
        started = time.perf_counter()
        index.search(embedder.embed_texts([caption]), 10)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", required=True, help="an ONNX export (`mmretrieve export`)")
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--captions", default=str(CAPTIONS))
    args = parser.parse_args()
    load_before = os.getloadavg()
    threads.use_policy("search")  # the search policy's threads (onnxruntime spinning), faiss below
    embedder = OnnxEmbedder(args.export, device="cpu")
    with open(args.captions, encoding="utf-8") as lines:
        captions = [json.loads(line)["captions"][0] for line in lines][: args.queries]
    args.dim = embedder.embed_dim
    vectors = unit_rows(np.random.default_rng(0), args.count, args.dim)
    indexes = {}
    for kind, options in KINDS.items():
        index = create_index(kind, args.dim, **options)
        index.add(np.arange(args.count, dtype=np.int64), vectors)
        indexes[kind] = index
    times: dict[tuple[str, str], list[float]] = {}
    print("| round | index | faiss threads | ms/query |\n|---:|---|---|---:|")
    for round_ in range(1, args.rounds + 1):
        for kind, index in indexes.items():
            for label in SETTINGS:
                # the other side: the search policy with its few-queries rule switched off
                per_core = label == "a thread per core"
                threads.ThreadPolicy.faiss_threads = (lambda self, n: self.faiss) if per_core else FEW_QUERIES_RULE
                ms = per_query_ms(index, embedder, captions)
                times.setdefault((kind, label), []).append(ms)
                print(f"| {round_} | {kind} | {label} | {ms:.3f} |")
    cores = threads.available_cores()
    print(f"\n| index ({args.count:,} x {args.dim}) | policy: 1 thread (ms) | a thread per core (ms) | "
          f"per core / policy |\n|---|---:|---:|---:|")
    for kind in indexes:
        one, many = (statistics.median(times[(kind, label)]) for label in SETTINGS)
        print(f"| {kind} | {one:.3f} | {many:.3f} | {many / one:.2f}x |")
    load_after = os.getloadavg()
    print(f"\nmedian of {args.rounds} rounds of {len(captions)} captions embedded and searched one at a time, "
          f"k = 10; {cores} cores; "
          f"load average (1/5/15 min): before {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after {' '.join(f'{x:.2f}' for x in load_after)}")


if __name__ == "__main__":
    main()
