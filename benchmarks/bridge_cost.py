"""What a wider embedding costs: query latency, image throughput, search time and index size, model against model.

Two models (e.g. the default before and after its label bridge) are compared in one process,
their timings interleaved round by round (timings here drift by 2x over minutes, so only the
ratios of one run mean much):

- text query: one caption embedded by the model's runtime (what `mmretrieve search "..."` does per query);
- images: a batch of 32 preprocessed photos embedded;
- search: one query against a flat inner-product index (faiss IndexFlatIP) of ``--index-size``
  synthetic unit vectors of the model's width;
- index size: the vectors' bytes (float32), which is what grows with the width.

    python benchmarks/bridge_cost.py --models BUNDLE_A BUNDLE_B [--rounds 5] [--index-size 100000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared/data/flickr8k-dev/captions.jsonl"


def timed(function, repeats: int) -> float:
    """Median seconds of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs=2, required=True, help="two models: bundles, exports or registered names")
    parser.add_argument("--runtime", default="auto")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--index-size", type=int, default=100_000)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args(argv)

    from mmretrieve.data import load_captions
    from mmretrieve.index import faiss_lib
    from mmretrieve.runtime import load_embedder

    faiss = faiss_lib.faiss()
    items = load_captions(args.data).items
    captions = [item.captions[0] for item in items[:args.rounds * 4]]
    embedders = [load_embedder(model, args.runtime) for model in args.models]
    pixels = embedders[0].image_preprocessor([str(item.image) for item in items[:32]])["pixel_values"]
    rng = np.random.default_rng(0)
    indexes = []
    for embedder in embedders:
        vectors = rng.standard_normal((args.index_size, embedder.embed_dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        index = faiss.IndexFlatIP(embedder.embed_dim)
        index.add(vectors)
        indexes.append(index)
        embedder.embed_texts(captions[:1])  # build each tower once before timing
        embedder.embed_pixels(pixels[:2])
    results = [{"query": [], "images": [], "search": []} for _ in embedders]
    for round_ in range(args.rounds):
        for embedder, index, result in zip(embedders, indexes, results):
            caption = captions[round_ % len(captions)]
            result["query"].append(timed(lambda: embedder.embed_texts([caption]), 3))
            result["images"].append(timed(lambda: embedder.embed_pixels(pixels), 1))
            query = embedder.embed_texts([caption])
            result["search"].append(timed(lambda: index.search(query, 10), 5))
        print(f"round {round_ + 1}/{args.rounds}", file=sys.stderr)
    rows = []
    for model, embedder, result in zip(args.models, embedders, results):
        rows.append({"model": model, "dim": embedder.embed_dim,
                     "query_ms": 1000 * statistics.median(result["query"]),
                     "images_per_s": 32 / statistics.median(result["images"]),
                     "search_ms": 1000 * statistics.median(result["search"]),
                     "index_mb": args.index_size * embedder.embed_dim * 4 / 1e6})
    print(f"{args.rounds} interleaved rounds, {embedders[0].runtime} runtime, flat index of {args.index_size:,} vectors\n")
    print("| model | dim | text query (ms) | images/s (batch 32) | search (ms) | index (MB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {Path(row['model']).name or row['model']} | {row['dim']} | {row['query_ms']:.1f} | "
              f"{row['images_per_s']:.1f} | {row['search_ms']:.2f} | {row['index_mb']:.0f} |")
    a, b = rows
    print(f"| ratio (second / first) | {b['dim'] / a['dim']:.2f} | {b['query_ms'] / a['query_ms']:.2f} | "
          f"{b['images_per_s'] / a['images_per_s']:.2f} | {b['search_ms'] / a['search_ms']:.2f} | "
          f"{b['index_mb'] / a['index_mb']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
