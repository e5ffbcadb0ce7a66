"""Load on `mmretrieve serve` over loopback: bounded concurrent clients against a 10k-image index.

Synthesises N small JPEGs (or takes --images DIR) and an index of them for --model (default:
the registered `default` model). The index holds the files' real metadata (size, mtime,
SHA-256, width, height) but random unit vectors, which cost nothing to make and as much to
search as real ones; --embed embeds the images with the model instead (`mmretrieve index`;
~25 min for 10k on a busy 2-core CPU). Queries are always embedded by the real model. Then it
starts `mmretrieve serve` on 127.0.0.1, warms it up, and runs
--clients concurrent clients for --seconds, each sending its next request as soon as the
last is answered: text searches, image searches (uploads) and thumbnail fetches, mixed by
--mix. Prints a Markdown table: requests, throughput, p50/p99 latency and errors per kind,
and the server's resident memory after warm-up, after the first load run and after a second
one (no growth expected). Targets only 127.0.0.1; the run stops by itself.

    python benchmarks/serve_load.py [--model default] [--images-count 10000] [--clients 32] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = ("dog", "cat", "child", "man", "woman", "ball", "beach", "grass", "snow", "water", "street", "bike",
         "red", "black", "white", "brown", "running", "jumping", "sitting", "playing", "two", "a", "the", "on",
         "in", "with", "near", "small", "big", "shirt", "car", "park", "field", "mountain", "rock", "crowd")


def synthesise(folder: Path, count: int, seed: int = 0) -> None:
    """``count`` distinct 128x96 JPEGs (smooth colour fields with noise), made once."""
    folder.mkdir(parents=True, exist_ok=True)
    have = sum(1 for _ in folder.rglob("*.jpg"))
    if have >= count:
        return
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:96, 0:128].astype(np.float32)
    for i in range(count):
        a, b, c = rng.uniform(0, 255, 3), rng.uniform(-1.5, 1.5, 3), rng.uniform(-1.5, 1.5, 3)
        pixels = a + b * x[..., None] + c * y[..., None] + rng.normal(0, 12, (96, 128, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        sub = folder / f"{i // 1000:02d}"
        sub.mkdir(exist_ok=True)
        image.save(sub / f"{i:05d}.jpg", quality=85)


def synthetic_index(folder: Path, images: Path, model: str, runtime: str) -> None:
    """A published image index of every image below ``images``, with random unit vectors,
    stamped with the model's fingerprint so that `serve` accepts it."""
    from mmretrieve.formats import sha256_file
    from mmretrieve.index.builder import publish
    from mmretrieve.index.store import MANIFEST, IndexStore, Item
    from mmretrieve.runtime import load_embedder

    if (folder / MANIFEST).is_file():
        return
    embedder = load_embedder(model, runtime)
    store = IndexStore.create(folder, {
        "modality": "image", "model": {"ref": embedder.ref, "path": getattr(embedder, "path", embedder.ref),
                                       "fingerprint": embedder.fingerprint},
        "embed_dim": int(embedder.embed_dim), "metric": "inner_product", "normalized": True,
        "requested_index_type": "auto"})
    paths = sorted(images.rglob("*.jpg"))
    vectors = np.random.default_rng(0).standard_normal((len(paths), int(embedder.embed_dim))).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    items = []
    for path in paths:
        info, (width, height) = path.stat(), Image.open(path).size
        items.append(Item(0, str(path.resolve()), info.st_size, info.st_mtime_ns, sha256_file(path), width, height))
    store.stage(items, vectors)
    publish(store, [])
    store.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024


def query_images(folder: Path, count: int = 16) -> list[bytes]:
    rng = random.Random(1)
    paths = sorted(folder.rglob("*.jpg"))
    out = []
    for path in rng.sample(paths, min(count, len(paths))):
        buffer = io.BytesIO()
        Image.open(path).convert("RGB").rotate(rng.choice((0, 90, 180))).save(buffer, "JPEG", quality=80)
        out.append(buffer.getvalue())
    return out


async def load(base: str, clients: int, seconds: float, mix: dict[str, float], items: int, uploads: list[bytes],
               max_requests: int) -> dict[str, dict]:
    import httpx

    rng = random.Random(0)
    kinds, weights = zip(*mix.items())
    stats = {kind: {"latencies": [], "errors": 0, "statuses": {}} for kind in kinds}
    deadline = time.perf_counter() + seconds
    sent = 0

    async def one(client: httpx.AsyncClient) -> None:
        nonlocal sent
        while time.perf_counter() < deadline and sent < max_requests:
            sent += 1
            kind = rng.choices(kinds, weights)[0]
            started = time.perf_counter()
            try:
                if kind == "text":
                    q = " ".join(rng.choices(WORDS, k=rng.randint(3, 8)))
                    response = await client.get("/api/search", params={"q": q, "k": 24})
                elif kind == "image":
                    response = await client.post("/api/search/image", params={"k": 24},
                                                 files={"image": ("q.jpg", rng.choice(uploads), "image/jpeg")})
                else:
                    response = await client.get(f"/thumb/{rng.randint(1, items)}")
                ok = response.status_code == 200
                status = response.status_code
            except httpx.HTTPError as exc:
                ok, status = False, type(exc).__name__
            elapsed = time.perf_counter() - started
            stats[kind]["latencies"].append(elapsed)
            stats[kind]["statuses"][status] = stats[kind]["statuses"].get(status, 0) + 1
            if not ok:
                stats[kind]["errors"] += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
        started = time.perf_counter()
        await asyncio.gather(*(one(client) for _ in range(clients)))
        stats["_elapsed"] = time.perf_counter() - started
    return stats


def table(stats: dict, label: str) -> list[str]:
    elapsed = stats.pop("_elapsed")
    rows = []
    every = []
    for kind, s in stats.items():
        lat = sorted(s["latencies"])
        every += lat
        if not lat:
            continue
        rows.append(f"| {label} | {kind} | {len(lat)} | {len(lat) / elapsed:.1f} | {1000 * statistics.median(lat):.1f} "
                    f"| {1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]:.1f} | {s['errors']} |")
    every.sort()
    errors = sum(s["errors"] for s in stats.values())
    rows.append(f"| {label} | **all** | {len(every)} | {len(every) / elapsed:.1f} | "
                f"{1000 * statistics.median(every):.1f} | {1000 * every[int(0.99 * len(every))]:.1f} | {errors} |")
    return rows


def scrape(base: str, name: str) -> dict[str, float]:
    import httpx

    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf"^{name}(\S*) (\S+)$", text, re.M)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="bundle, export folder or registered model")
    parser.add_argument("--runtime", default="auto")
    parser.add_argument("--work", default="/tmp/mmretrieve-serve-load", help="images, index and thumbnails go here")
    parser.add_argument("--images", help="index this folder instead of synthetic JPEGs (read in place)")
    parser.add_argument("--images-count", type=int, default=10_000)
    parser.add_argument("--embed", action="store_true", help="embed the images with the model (slow on a CPU)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max-requests", type=int, default=200_000, help="a hard cap per run")
    parser.add_argument("--runs", type=int, default=3, help="load runs, back to back (memory is read after each)")
    parser.add_argument("--mix", default="text=0.7,image=0.1,thumb=0.2", help="share of each request kind")
    args = parser.parse_args()
    mix = {k: float(v) for k, v in (part.split("=") for part in args.mix.split(","))}
    work = Path(args.work)
    images = Path(args.images) if args.images else work / "images"
    if not args.images:
        synthesise(images, args.images_count)
    kind = "embedded" if args.embed else "random-vectors"
    index_dir = work / f"index-{kind}-{re.sub(r'[^A-Za-z0-9]+', '_', args.model)[-40:]}"
    mmretrieve = [sys.executable, "-m", "mmretrieve"]
    started = time.perf_counter()
    if args.embed:
        subprocess.run([*mmretrieve, "index", str(images), "--index-dir", str(index_dir), "--model", args.model,
                        "--runtime", args.runtime], check=True, stdout=subprocess.DEVNULL)
    else:
        synthetic_index(index_dir, images, args.model, args.runtime)
    print(f"index ready in {time.perf_counter() - started:.0f}s", file=sys.stderr)

    import httpx

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([*mmretrieve, "serve", "--index-dir", str(index_dir), "--port", str(port),
                               "--model", args.model, "--runtime", args.runtime,
                               "--thumb-cache", str(work / "thumbs"), "--log-level", "warning"])
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                health = httpx.get(f"{base}/health", timeout=2)
                if health.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit("the server did not start")
            time.sleep(0.5)
        items = health.json()["indexes"]["images"]["items"]
        uploads = query_images(images)
        asyncio.run(load(base, 4, 5, mix, items, uploads, 2_000))  # warm-up: lazy imports, first batches
        memory = [("after warm-up", rss_mb(server.pid))]
        rows = []
        for run in range(1, args.runs + 1):
            stats = asyncio.run(load(base, args.clients, args.seconds, mix, items, uploads, args.max_requests))
            rows += table(stats, f"run {run}")
            memory.append((f"after run {run}", rss_mb(server.pid)))
        batches = scrape(base, "mmretrieve_search_batch_size")
        stages = scrape(base, "mmretrieve_search_stage_seconds")
    finally:
        server.terminate()
        server.wait(30)

    mean_batch = batches.get("_sum", 0) / max(batches.get("_count", 1), 1)
    print(f"\n{items} images ({'synthetic 128x96 JPEGs' if not args.images else images}; {kind} index), "
          f"model {args.model}, "
          f"runtime {args.runtime}, {args.clients} clients x {args.seconds:g}s per run, mix {args.mix}, loopback\n")
    print("| run | request | requests | req/s | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n| server resident memory | MB |")
    print("|---|---|")
    for label, value in memory:
        print(f"| {label} | {value:.0f} |")
    embed_ms = 1000 * stages.get('_sum{stage="embed"}', 0) / max(stages.get('_count{stage="embed"}', 1), 1)
    search_ms = 1000 * stages.get('_sum{stage="search"}', 0) / max(stages.get('_count{stage="search"}', 1), 1)
    print(f"\nserver side, over the whole session: {batches.get('_count', 0):.0f} search batches, mean "
          f"{mean_batch:.1f} queries per batch, {embed_ms:.1f} ms embedding and {search_ms:.1f} ms searching per batch")


if __name__ == "__main__":
    main()
