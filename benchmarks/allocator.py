"""Torch image tower speed and memory with and without mmretrieve's allocator tuning and folded batch
norms (issue 17, item 3).

Each variant runs in a fresh child process (the allocator's state is per process), in turn, for
``--rounds`` interleaved rounds: the torch runtime's image tower (``--model``, default `default`)
embeds ``--batches`` batches of 32 random 224 px images after one warm-up batch. Printed per
run and as medians: images/s, images per CPU second (user + system time: steadier than the wall
clock when other processes share the cores), minor page faults per image, user and system CPU seconds, and
the child's peak resident memory (ru_maxrss), with the ratio to glibc's defaults.

    python benchmarks/allocator.py [--model default] [--batches 6] [--rounds 3] [--quick]

Variants: ``glibc defaults`` (MMRETRIEVE_MALLOC_TUNING=0, norms not folded: the tower as the
issue measured it), ``mallopt`` (mmretrieve/allocator.py, norms not folded), ``mallopt + folded
norms`` (what the torch runtime does: batch norms folded into the convolutions,
``torch_runtime.fold_batch_norms``) and ``env vars`` (the MALLOC_*_ variables the issue measured
with, set for the child, norms not folded; mmretrieve then leaves them alone).
Then, in one child (mallopt), the tower with and without folded norms on alternating batches
(``--rounds`` x 4 batches each): the steadier ratio for the folding alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

# name -> (environment for the child, whether it folds the batch norms)
VARIANTS = {
    "glibc defaults": ({"MMRETRIEVE_MALLOC_TUNING": "0"}, False),
    "mallopt": ({}, False),
    "mallopt + folded norms": ({}, True),
    "env vars": ({"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
                  "MALLOC_TOP_PAD_": str(64 << 20)}, False),
}


def child(model: str, batches: int, batch: int, fold: bool) -> None:
    import numpy as np

    from mmretrieve.runtime.torch_runtime import TorchEmbedder
    from mmretrieve.allocator import tune_allocator

    embedder = TorchEmbedder(model, device="cpu", fold_norms=fold)
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 256, (batch, 320, 400, 3), dtype=np.uint8)
    # whatever the bundle's preprocessing makes (float pixels or bytes), as the runtime is fed
    pixels = embedder.image_preprocessor([Image.fromarray(array) for array in noise])["pixel_values"]
    embedder.embed_pixels(pixels)  # warm-up: builds the tower, first allocations
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(batches):
        embedder.embed_pixels(pixels)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    images = batches * batch
    print(json.dumps({"img_s": images / seconds, "faults_per_img": (after.ru_minflt - before.ru_minflt) / images,
                      "user_s": after.ru_utime - before.ru_utime, "sys_s": after.ru_stime - before.ru_stime,
                      "peak_rss_mb": after.ru_maxrss / 1024, "tuned": tune_allocator()}))


def alternate(model: str, batches: int, batch: int) -> None:
    """Both image towers in one process, one batch each in turn: img/s per batch of each."""
    import numpy as np
    from PIL import Image

    from mmretrieve.runtime.torch_runtime import TorchEmbedder

    towers = {"mallopt": TorchEmbedder(model, device="cpu", fold_norms=False),
              "mallopt + folded norms": TorchEmbedder(model, device="cpu")}
    noise = np.random.default_rng(0).integers(0, 256, (batch, 320, 400, 3), dtype=np.uint8)
    pixels = towers["mallopt"].image_preprocessor([Image.fromarray(array) for array in noise])["pixel_values"]
    rows = {name: embedder.embed_pixels(pixels) for name, embedder in towers.items()}  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in towers}
    for _ in range(batches):
        for name, embedder in towers.items():
            started = time.perf_counter()
            embedder.embed_pixels(pixels)
            rates[name].append(batch / (time.perf_counter() - started))
    print(json.dumps({"rates": rates, "max_abs_diff": float(abs(rows["mallopt"] - rows["mallopt + folded norms"]).max())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--batches", type=int, default=6, help="timed batches of 32 per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="3 batches, 2 rounds (about a minute)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fold", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--alternate", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.batches, args.rounds = 3, 2
    if args.child:
        child(args.model, args.batches, 32, args.fold)
        return
    if args.alternate:
        alternate(args.model, args.batches, 32)
        return
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    print("| round | variant | img/s | img per CPU s | minor faults/img | user s | sys s | peak RSS MB |\n"
          "|---:|---|---:|---:|---:|---:|---:|---:|")
    for round_ in range(1, args.rounds + 1):
        for name, (extra, fold) in VARIANTS.items():
            env = {k: v for k, v in os.environ.items() if k != "MMRETRIEVE_MALLOC_TUNING" and not k.startswith("MALLOC_")}
            env.update(extra)
            done = subprocess.run([sys.executable, __file__, "--child", "--model", args.model, "--batches",
                                   str(args.batches)] + (["--fold"] if fold else []), env=env, capture_output=True,
                                  text=True)
            if done.returncode != 0:
                sys.exit(f"{name} failed:\n{done.stderr}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            runs[name].append(result)
            result["img_cpu_s"] = args.batches * 32 / (result["user_s"] + result["sys_s"])
            print(f"| {round_} | {name} | {result['img_s']:.1f} | {result['img_cpu_s']:.1f} | "
                  f"{result['faults_per_img']:.0f} | "
                  f"{result['user_s']:.2f} | {result['sys_s']:.2f} | {result['peak_rss_mb']:.0f} |", flush=True)
    base = statistics.median(r["img_s"] for r in runs["glibc defaults"])
    base_rss = statistics.median(r["peak_rss_mb"] for r in runs["glibc defaults"])
    base_cpu = statistics.median(r["img_cpu_s"] for r in runs["glibc defaults"])
    print(f"\n| variant (median of {args.rounds}) | img/s | vs glibc defaults | img per CPU s | vs defaults | "
          f"minor faults/img | peak RSS MB | RSS vs defaults |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, results in runs.items():
        rate = statistics.median(r["img_s"] for r in results)
        rss = statistics.median(r["peak_rss_mb"] for r in results)
        faults = statistics.median(r["faults_per_img"] for r in results)
        cpu = statistics.median(r["img_cpu_s"] for r in results)
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x | {cpu:.1f} | {cpu / base_cpu:.2f}x | {faults:.0f} | "
              f"{rss:.0f} | {rss / base_rss:.2f}x |")
    done = subprocess.run([sys.executable, __file__, "--alternate", "--model", args.model, "--batches",
                           str(4 * args.rounds)], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"alternating run failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    plain, folded = result["rates"]["mallopt"], result["rates"]["mallopt + folded norms"]
    pairs = [b / a for a, b in zip(plain, folded)]  # a pair's two batches ran under the same load
    print(f"\nOne process, alternating batches of 32 ({len(plain)} each): mallopt {statistics.median(plain):.1f} img/s, "
          f"mallopt + folded norms {statistics.median(folded):.1f} img/s (medians); folded / not, median of the "
          f"pairs: {statistics.median(pairs):.2f}x (each: {', '.join(f'{r:.2f}' for r in pairs)}); "
          f"rows differ by {result['max_abs_diff']:.1g}")
    load_after = os.getloadavg()
    print(f"\nload average (1/5/15 min): before {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after {' '.join(f'{x:.2f}' for x in load_after)}; {os.cpu_count()} cores; batch 32, "
          f"{args.batches} timed batches per run")


if __name__ == "__main__":
    main()
