"""What caching augmented views costs (``train --set image_views=N``): seconds per image for the
plain one-view cache and for N views, on the first ``--images`` images of a captions file, with a
registered image encoder (default: the offline EfficientNet-Lite0 of the `default` model).

Each file is decoded once for all its views and the tower runs N times (N - 1 when the plain cache
of the same images is in the folder), so N views cost between 1x (decoding-bound) and Nx
(tower-bound) the plain cache. The two are timed in alternation,
``--rounds`` times each, into fresh cache folders; the table gives the median and the full data
set's time extrapolated from it. Timings drift with the machine's load: read the ratio.

    python benchmarks/view_cache.py [--data ../shared/data/flickr8k-train/captions.jsonl] [--images 200]
        [--views 4] [--workers 2] [--rounds 2] [--encoder efficientnet-lite0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared/data/flickr8k-train/captions.jsonl"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DATA), help="captions file (JSONL, CSV, COCO JSON or a folder)")
    parser.add_argument("--images", type=int, default=200, help="images timed (the first of the data)")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="decoding processes, as train's `workers`")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--encoder", default="efficientnet-lite0", help="a registered image encoder")
    args = parser.parse_args(argv)

    import torch

    from mmretrieve.augment import ViewAugmentation
    from mmretrieve.bundle import tower_fingerprint
    from mmretrieve.data import load_captions
    from mmretrieve.embedding import cached_tower_features, cached_view_features, tower_features
    from mmretrieve.encoders.factory import create_encoder

    items = load_captions(args.data, progress=False).items
    paths = [item.image for item in items[:args.images]]
    encoder = create_encoder(args.encoder)
    fingerprint = tower_fingerprint(encoder)
    device = torch.device("cpu")
    settings = ViewAugmentation()

    def plain(folder: Path):
        return cached_tower_features(encoder, paths, folder, 64, device, "image-train", fingerprint, args.workers)

    def views(folder: Path):
        return cached_view_features(encoder, paths, folder, 64, device, "image-train", fingerprint, args.views,
                                    settings, args.workers)

    # The third runs where the plain cache was just written, so view 0 is read from it.
    names = ("1 view (plain)", f"{args.views} views", f"{args.views} views, plain cache beside")
    times: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        tower_features(encoder, paths[:8], 8, device, progress=False)  # first-call costs out of the timing
        results = {}
        for round_ in range(args.rounds):
            for name, run, folder in zip(names, (plain, views, views), ("plain", "views", "plain")):
                start = time.perf_counter()
                results[name] = run(Path(tmp) / f"{round_}-{folder}")
                times[name].append(time.perf_counter() - start)
    plain_rows, view_rows, _ = results.values()
    # View 0 is the plain preprocessing: the same features up to batch composition.
    gap = (view_rows[:, 0] - plain_rows).abs().max().item()
    load = os.getloadavg()[0]
    print(f"{len(paths)} images of {len(items)}, encoder {args.encoder} (dim {encoder.dim}), {args.workers} workers, "
          f"torch threads {torch.get_num_threads()}, load average {load:.1f}; view 0 vs plain: max |diff| {gap:.2e}\n")
    print(f"| cache | median s | ms/image | est. all {len(items)} images | vs plain |")
    print("|---|---:|---:|---:|---:|")
    base = statistics.median(times["1 view (plain)"])
    for name, values in times.items():
        median = statistics.median(values)
        per_image = median / len(paths)
        print(f"| {name} | {median:.1f} | {1000 * per_image:.0f} | {per_image * len(items) / 60:.1f} min | "
              f"{median / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
