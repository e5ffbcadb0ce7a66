"""End-to-end indexing rate against the encoder-only rate of the same model on the same runtime.

Encoder-only: images decoded and preprocessed beforehand (not timed), then only the model
runs, batch after batch. End to end: `index_images` on the folder into a fresh index (scan,
decode in worker processes, embed, SQLite, FAISS, publish). Runs alternate, and the table
gives each run, the ratio of medians and each round's ratio (end to end over the encoder-only run
of the same round) with their median. Target: end to end >= 85% of encoder-only. ``--workers``
takes a list (``0,1,2``): each round then runs end to end once per decode-worker count, and each
count gets its ratio. Earlier ways of running 0 workers can join the list: ``ahead`` (one thread
decoding a batch ahead of the caller), ``serial`` (embedding in the caller's thread between the
indexer's records of each batch) and ``before`` (both: what 0 workers ran before the embedding
thread; docs/benchmarks.md "Issue 17, fourth window").
Encoder-only is fed what the decode pool sends (uint8 from ``resize_crop``). The process takes
the ``index`` command's thread policy (mmretrieve.threads). It also prints the CPU time per image
of the encoder (every thread) and of decoding (one image after another), and the ceiling they
set: no overlap of the two can index faster than cores / (their sum).

    python benchmarks/index_throughput.py --model runs/x/best [--images DIR] [--limit 300] [--rounds 2]
        [--workers 0,1,2,ahead,serial,before]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

import mmretrieve.embedding
import mmretrieve.index.builder
from mmretrieve.decode import decode_one, ordered_map
from mmretrieve.embedding import ImageBatch
from mmretrieve.images import list_images, load_image
from mmretrieve.index.builder import index_images
from mmretrieve.runtime import load_embedder
from mmretrieve.threads import available_cores, use_policy

DECODE = mmretrieve.embedding.decode_images
BATCHES = mmretrieve.index.builder.embed_image_batches


def ahead_decode(paths, preprocessor, workers=0, read_ahead=64):
    """One thread decoding a batch ahead of the caller (0 workers before the embedding thread)."""
    return ordered_map(partial(decode_one, preprocessor=preprocessor), paths, 1, read_ahead=read_ahead, threads=True)


def serial_batches(paths, preprocessor, embed_pixels, batch_size, workers=0, bar=None, strict=False):
    """Embedding in the caller's thread between the indexer's records of each batch (what
    embed_image_batches did before it embedded the next batch on a thread of its own)."""
    decoded = mmretrieve.embedding.decode_images(paths, preprocessor, workers, read_ahead=batch_size)
    batch, failed = [], []
    for image in decoded:
        (failed if image.error else batch).append(image)
        if len(batch) >= batch_size:
            yield ImageBatch(batch, embed_pixels(np.stack([d.pixels for d in batch])), failed, final=False)
            batch, failed = [], []
    yield ImageBatch(batch, embed_pixels(np.stack([d.pixels for d in batch])) if batch else None, failed, final=True)


# earlier ways of running 0 workers: (how images are decoded, how batches are embedded)
EARLIER = {"ahead": (ahead_decode, BATCHES), "serial": (DECODE, serial_batches),
           "before": (ahead_decode, serial_batches)}


def encoder_only(embedder, pixels: np.ndarray, batch_size: int) -> tuple[float, float]:
    """(images/s, CPU ms per image over every thread of this process)."""
    started, cpu = time.perf_counter(), time.process_time()
    for start in range(0, len(pixels), batch_size):
        embedder.embed_pixels(pixels[start:start + batch_size])
    return len(pixels) / (time.perf_counter() - started), 1000 * (time.process_time() - cpu) / len(pixels)


def decode_cpu_ms(paths: list[Path], preprocessor) -> float:
    """CPU ms per image of reading, hashing, decoding and resizing, one image after another."""
    cpu = time.process_time()
    for path in paths:
        decode_one(str(path), preprocessor)
    return 1000 * (time.process_time() - cpu) / len(paths)


def end_to_end(embedder, folder: Path, batch_size: int, workers: str) -> float:
    mmretrieve.embedding.decode_images, mmretrieve.index.builder.embed_image_batches = \
        EARLIER.get(workers, (DECODE, BATCHES))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            report = index_images(folder, Path(tmp) / "index", embedder, batch_size=batch_size,
                                  workers=int(workers) if workers.isdigit() else 0,
                                  progress=False, follow_links=True)  # the subset is links to the data
            return report.total / (time.perf_counter() - started)
    finally:
        mmretrieve.embedding.decode_images = DECODE
        mmretrieve.index.builder.embed_image_batches = BATCHES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", default=str(Path(__file__).resolve().parents[2] / "shared/data/flickr8k-dev/images"))
    parser.add_argument("--limit", type=int, default=300, help="images to use (a subset keeps runs short)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", default="1", help="decode workers, or a comma-separated list to compare")
    parser.add_argument("--runtime", default="auto")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    worker_counts = [w.strip() for w in str(args.workers).split(",")]
    if any(w not in EARLIER and not w.isdigit() for w in worker_counts):
        parser.error(f"--workers takes whole numbers and {', '.join(EARLIER)}, separated by commas")
    use_policy("index")
    load_before = os.getloadavg()
    embedder = load_embedder(args.model, args.runtime)
    paths = list_images(Path(args.images))[: args.limit]
    with tempfile.TemporaryDirectory() as tmp:
        subset = Path(tmp) / "images"
        subset.mkdir()
        for path in paths:  # symlinks: the benchmark reads the data in place, never copies it
            (subset / path.name).symlink_to(path.resolve())
        # what the decode pool hands the embedder (older trees: normalised float32 from transform)
        prepare = getattr(embedder.image_preprocessor, "resize_crop", embedder.image_preprocessor.transform)
        pixels = np.stack([prepare(load_image(p)) for p in paths])
        encoder_only(embedder, pixels[: args.batch_size], args.batch_size)  # warm-up
        rows, encoder_cpu, decode_cpu = [], [], []
        for round_ in range(args.rounds):
            rate, cpu = encoder_only(embedder, pixels, args.batch_size)
            rows.append(("encoder only", round_, rate))
            encoder_cpu.append(cpu)
            decode_cpu.append(decode_cpu_ms(paths, embedder.image_preprocessor))
            for workers in worker_counts:
                rows.append((f"end to end, {workers} workers", round_,
                             end_to_end(embedder, subset, args.batch_size, workers)))
    print(f"\n{len(paths)} images from {args.images}, model {args.model}, runtime {args.runtime}, "
          f"batch {args.batch_size}, {pixels.dtype} pixels, decode workers {args.workers}, "
          f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after\n")
    print("| run | round | images/s |")
    print("|---|---|---|")
    for label, round_, rate in rows:
        print(f"| {label} | {round_ + 1} | {rate:.1f} |")
    encoder = statistics.median(r for label, _, r in rows if label == "encoder only")
    encoder_by_round = {round_: r for label, round_, r in rows if label == "encoder only"}
    for workers in worker_counts:
        runs = [(round_, r) for label, round_, r in rows if label == f"end to end, {workers} workers"]
        full = statistics.median(r for _, r in runs)
        # Each run against the encoder-only run of its own round, seconds before it: the machine's
        # speed drifts by a sixth over minutes here, which this ratio cancels and the medians' does not.
        paired = sorted(r / encoder_by_round[round_] for round_, r in runs)
        print(f"\nend to end vs encoder-only, {workers} workers: {full:.1f} / {encoder:.1f} img/s = "
              f"{full / encoder:.1%} (target >= 85%); per round: median {statistics.median(paired):.1%} "
              f"({', '.join(f'{ratio:.1%}' for ratio in paired)})")
    # The most any overlap can give: every core busy with the encoder's and the decoding's CPU work.
    cores = available_cores()
    enc_ms, dec_ms = statistics.median(encoder_cpu), statistics.median(decode_cpu)
    ceiling = min(encoder, 1000 * cores / (enc_ms + dec_ms))
    print(f"\nCPU per image (medians): encoder {enc_ms:.2f} ms ({enc_ms * encoder / 1000:.2f} of {cores} cores "
          f"busy while it runs), decoding {dec_ms:.2f} ms. Ceiling with the decoding perfectly overlapped: "
          f"{cores} cores / {enc_ms + dec_ms:.2f} ms = {ceiling:.1f} img/s = {ceiling / encoder:.1%} of encoder-only")


if __name__ == "__main__":
    main()
