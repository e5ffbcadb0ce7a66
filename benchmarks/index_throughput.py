"""End-to-end indexing rate against the encoder-only rate of the same model on the same runtime.

Encoder-only: images decoded and preprocessed beforehand (not timed), then only the model
runs, batch after batch. End to end: `index_images` on the folder into a fresh index (scan,
decode in worker processes, embed, SQLite, FAISS, publish). Runs alternate, and the table
gives each run and the ratio of medians. Target: end to end >= 85% of encoder-only.

    python benchmarks/index_throughput.py --model runs/x/best [--images DIR] [--limit 300] [--rounds 2]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from mmretrieve.images import list_images, load_image
from mmretrieve.index.builder import index_images
from mmretrieve.runtime import load_embedder


def encoder_only(embedder, pixels: np.ndarray, batch_size: int) -> float:
    started = time.perf_counter()
    for start in range(0, len(pixels), batch_size):
        embedder.embed_pixels(pixels[start:start + batch_size])
    return len(pixels) / (time.perf_counter() - started)


def end_to_end(embedder, folder: Path, batch_size: int, workers: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        report = index_images(folder, Path(tmp) / "index", embedder, batch_size=batch_size, workers=workers,
                              progress=False)
        return report.total / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", default=str(Path(__file__).resolve().parents[2] / "shared/data/flickr8k-dev/images"))
    parser.add_argument("--limit", type=int, default=300, help="images to use (a subset keeps runs short)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--runtime", default="auto")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    embedder = load_embedder(args.model, args.runtime)
    paths = list_images(Path(args.images))[: args.limit]
    with tempfile.TemporaryDirectory() as tmp:
        subset = Path(tmp) / "images"
        subset.mkdir()
        for path in paths:  # symlinks: the benchmark reads the data in place, never copies it
            (subset / path.name).symlink_to(path.resolve())
        pixels = np.stack([embedder.image_preprocessor.transform(load_image(p)) for p in paths])
        encoder_only(embedder, pixels[: args.batch_size], args.batch_size)  # warm-up
        rows = []
        for round_ in range(args.rounds):
            rows.append(("encoder only", round_, encoder_only(embedder, pixels, args.batch_size)))
            rows.append(("end to end", round_, end_to_end(embedder, subset, args.batch_size, args.workers)))
    print(f"\n{len(paths)} images from {args.images}, model {args.model}, runtime {args.runtime}, "
          f"batch {args.batch_size}, {args.workers} decode worker(s)\n")
    print("| run | round | images/s |")
    print("|---|---|---|")
    for label, round_, rate in rows:
        print(f"| {label} | {round_ + 1} | {rate:.1f} |")
    encoder = statistics.median(r for label, _, r in rows if label == "encoder only")
    full = statistics.median(r for label, _, r in rows if label == "end to end")
    print(f"\nend to end / encoder only = {full / encoder:.1%} (target >= 85%)")


if __name__ == "__main__":
    main()
