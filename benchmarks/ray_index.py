"""`mmretrieve index` on this machine's process pool against `--engine ray` on a local Ray cluster.

Each run is the command a user types, into a fresh index folder; runs of the two engines
alternate (the order flips every round), and the table gives each run's images/s as the command
reports it (embedding and writing the index: model loading on the actors included, starting the
local Ray cluster not), its whole wall time, and the ratio of the medians.

    python benchmarks/ray_index.py --model EXPORT_DIR [--images DIR] [--limit 1000] [--rounds 2]
        [--ray-workers 2]

``--limit`` N indexes the first N images through a folder of symlinks to them (with
``--follow-links``: the data is read in place, never copied); 0 indexes ``--images`` itself.
"""

from __future__ import annotations

import argparse
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mmretrieve.images import list_images

ENGINES = ("local", "ray")


def command(engine: str, folder: Path, index_dir: Path, model: str, batch_size: int, ray_workers: int,
            links: bool) -> list[str]:
    args = ["mmretrieve", "index", str(folder), "--model", model, "--index-dir", str(index_dir),
            "--batch-size", str(batch_size)] + (["--follow-links"] if links else [])
    return args + (["--engine", "ray", "--workers", str(ray_workers)] if engine == "ray" else [])


def run(args: list[str]) -> tuple[float, float, str]:
    """(images/s the command reported, wall seconds, its report line)."""
    executable = str(Path(sys.executable).with_name(args[0]))
    started = time.perf_counter()
    done = subprocess.run([executable, *args[1:]], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{shlex.join(args)} failed:\n{done.stderr[-3000:]}")
    line = done.stdout.splitlines()[0]
    return float(re.search(r"([\d.]+) items/s", line).group(1)), wall, done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an ONNX export (or a bundle) every Ray worker can read")
    parser.add_argument("--images", default=str(Path(__file__).resolve().parents[2] / "shared/data/flickr8k-train/images"))
    parser.add_argument("--limit", type=int, default=1000, help="first N images through symlinks; 0: all of --images")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ray-workers", type=int, default=2, help="encoder actors of --engine ray")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.images)
        if args.limit:
            folder = Path(tmp) / "images"
            folder.mkdir()
            for path in list_images(Path(args.images))[: args.limit]:
                (folder / path.name).symlink_to(path.resolve())
        count = len(list_images(folder))
        for round_ in range(args.rounds):
            for engine in ENGINES if round_ % 2 == 0 else ENGINES[::-1]:
                args_ = command(engine, folder, Path(tmp) / f"index-{engine}-{round_}", args.model, args.batch_size,
                                args.ray_workers, bool(args.limit))
                rate, wall, report = run(args_)
                print(f"$ {shlex.join(args_)}\n{report}", file=sys.stderr)
                rows.append((engine, round_, rate, wall))
    print(f"\n{count} images from {args.images}, model {args.model}, batch {args.batch_size}, "
          f"ray: {args.ray_workers} actors on a local cluster\n")
    print("| engine | round | images/s (reported) | wall s (whole command) |")
    print("|---|---|---|---|")
    for engine, round_, rate, wall in rows:
        print(f"| {engine} | {round_ + 1} | {rate:.1f} | {wall:.1f} |")
    median = {e: statistics.median(r for name, _, r, _ in rows if name == e) for e in ENGINES}
    wall = {e: statistics.median(w for name, _, _, w in rows if name == e) for e in ENGINES}
    print(f"\nray / local: images/s {median['ray'] / median['local']:.2f}x, "
          f"wall time {wall['ray'] / wall['local']:.2f}x (medians)")


if __name__ == "__main__":
    main()
