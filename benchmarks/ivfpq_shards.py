"""An IVF-PQ index built from shards in bounded memory: peak RSS against the float data, build time,
recall@10 against exact search and single-query latency.

Data: ``--n`` unit vectors (default 2M x 256-d float32, 2 GB) from the Gaussian mixture of
``benchmarks/index_backends.py``, written to a ``.npy`` file ``--shard-rows`` at a time by one
process (so generating is bounded too). A second process computes the exact top 10 of the
queries by brute force, one shard at a time (faiss ``knn`` per shard, merged). A third builds the index the way a rebuild does,
``mmretrieve.index.backends.build_index("ivfpq", ...)`` over shards that each read their rows
from the file only when loaded (plain reads, no memory map), with the nlist/nprobe/m that
``choose.ivfpq_options`` picks for n, while a thread samples its anonymous resident memory
(``RssAnon``: the heap, not page cache or mapped files) every 20 ms. Then it searches one
query per call (re-ranking reads ``vectors.f32`` through a memory map, as serving does).
Prints a Markdown table and the JSON it came from.

    python benchmarks/ivfpq_shards.py --workdir DIR              # 2M x 256-d: ~15 minutes on 2 cores
    python benchmarks/ivfpq_shards.py --n 100000 --workdir DIR   # a quick run
    python benchmarks/ivfpq_shards.py --reuse-data DIR          # keep the 2 GB of data in DIR for reruns
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from index_backends import K, draw, mixture, one_query_at_a_time, recall  # noqa: E402

from mmretrieve.index.backends import build_index  # noqa: E402
from mmretrieve.index.choose import ivfpq_options  # noqa: E402
from mmretrieve.index.faiss_lib import faiss  # noqa: E402


DRAW_ROWS = 20_000  # rows drawn at once (the mixture's float64 temporaries are ~10x the float32 rows)


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class PeakSampler:
    """The highest RssAnon seen by a thread polling /proc/self/status."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak, self._stop = every, status_bytes("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, status_bytes("RssAnon"))

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status_bytes("RssAnon"))


class FileShard:
    """Rows ``start:stop`` of a 2-d float32 ``.npy`` file, read with plain reads when loaded."""

    def __init__(self, path: Path, offset: int, dim: int, start: int, stop: int):
        self.path, self.offset, self.dim, self.start, self.stop = path, offset, dim, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        vectors = np.fromfile(self.path, dtype=np.float32, count=len(self) * self.dim,
                              offset=self.offset + 4 * self.dim * self.start).reshape(len(self), self.dim)
        return np.arange(self.start, self.stop, dtype=np.int64), vectors


def npy_layout(path: Path) -> tuple[int, tuple[int, ...]]:
    """(byte offset of the data, shape) of a C-ordered float32 .npy file; mapping it reads no rows."""
    mapped = np.load(path, mmap_mode="r")
    assert mapped.dtype == np.float32 and mapped.flags.c_contiguous
    return mapped.offset, mapped.shape


def file_shards(path: Path, rows: int) -> list[FileShard]:
    offset, (n, dim) = npy_layout(path)
    return [FileShard(path, offset, dim, start, min(start + rows, n)) for start in range(0, n, rows)]


# -- the three steps, each in its own process ---------------------------------------------------

def generate(args) -> dict:
    model = mixture(args.clusters, args.dim, 16.0, seed=0)
    data = np.lib.format.open_memmap(args.workdir / "data.npy", mode="w+", dtype=np.float32, shape=(args.n, args.dim))
    with PeakSampler() as peak:
        for number, start in enumerate(range(0, args.n, args.shard_rows)):
            stop = min(start + args.shard_rows, args.n)
            data[start:stop] = draw(model, stop - start, seed=1000 + number, chunk=DRAW_ROWS)
            data.flush()
        del data
        np.save(args.workdir / "queries.npy", draw(model, args.queries, seed=1))
    return {"peak_rss_anon": peak.peak}


def exact(args) -> dict:
    """Each shard's exact top 10 (faiss brute force), merged into the collection's."""
    queries = np.load(args.workdir / "queries.npy")
    scores, ids = [], []
    for shard in file_shards(args.workdir / "data.npy", args.shard_rows):
        rows, vectors = shard.load()
        shard_scores, shard_rows = faiss().knn(queries, vectors, K, metric=faiss().METRIC_INNER_PRODUCT)
        scores.append(shard_scores)
        ids.append(rows[shard_rows])
        del vectors
    scores, ids = np.concatenate(scores, axis=1), np.concatenate(ids, axis=1)
    keep = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    np.save(args.workdir / "truth.npy", np.take_along_axis(ids, keep, axis=1))
    return {}


def build(args) -> dict:
    shards = file_shards(args.workdir / "data.npy", args.shard_rows)
    n, dim = sum(len(s) for s in shards), shards[0].dim
    options = ivfpq_options(n, dim)
    queries, truth = np.load(args.workdir / "queries.npy"), np.load(args.workdir / "truth.npy")
    before = status_bytes("RssAnon")
    with PeakSampler() as peak:
        started = time.perf_counter()
        index = build_index("ivfpq", dim, shards, progress=True, **options)
        build_s = time.perf_counter() - started
    result = {"n": n, "dim": dim, "options": index.options, "shards": len(shards), "shard_rows": args.shard_rows,
              "build_s": build_s, "rss_anon_before": before, "peak_rss_anon": peak.peak,
              "memory_bytes": index.memory_bytes(), "omp_threads": faiss().omp_get_max_threads(), "points": []}
    for rerank in (0, options["rerank"]):
        index.set_search_options(rerank=rerank)
        millis, found = one_query_at_a_time(index, queries, len(queries))
        result["points"].append({"nprobe": options["nprobe"], "rerank": rerank, "recall": recall(found, truth),
                                 "p50_ms": float(np.percentile(millis, 50)),
                                 "p95_ms": float(np.percentile(millis, 95)), "queries": len(queries)})
    return result


STEPS = {"generate": generate, "exact": exact, "build": build}


def run_step(args, step: str) -> dict:
    command = [sys.executable, __file__, "--step", step, "--n", str(args.n), "--dim", str(args.dim),
               "--queries", str(args.queries), "--clusters", str(args.clusters),
               "--shard-rows", str(args.shard_rows), "--workdir", str(args.workdir)]
    started = time.perf_counter()
    out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - started
    return result


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--clusters", type=int, default=5000)
    parser.add_argument("--shard-rows", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, default=None, help="where the data file goes (default: a temporary folder)")
    parser.add_argument("--reuse-data", type=Path, default=None,
                        help="keep the generated data in this folder and reuse it when it is there with the same --n/--dim")
    parser.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(STEPS[args.step](args)))
        return
    with tempfile.TemporaryDirectory(prefix="ivfpq-shards-", dir=args.workdir) as tmp:
        data_dir = args.reuse_data or Path(tmp)
        args.workdir = data_dir
        load_before = os.getloadavg()
        if args.reuse_data and (data_dir / "data.npy").is_file() and npy_layout(data_dir / "data.npy")[1] == (args.n, args.dim):
            generated = {"peak_rss_anon": 0, "wall_s": 0.0, "reused": True}
            print(f"reusing the data in {data_dir}", file=sys.stderr)
        else:
            data_dir.mkdir(parents=True, exist_ok=True)
            generated = run_step(args, "generate")
            print(f"generated {args.n:,} x {args.dim} in {generated['wall_s']:.0f} s "
                  f"(peak RssAnon {mib(generated['peak_rss_anon'])} MiB)", file=sys.stderr)
        exact_run = run_step(args, "exact")
        print(f"exact top-{K} in {exact_run['wall_s']:.0f} s", file=sys.stderr)
        built = run_step(args, "build")
        load_after = os.getloadavg()
    floats = args.n * args.dim * 4
    opts = built["options"]
    print(f"\nIVF-PQ from {built['shards']} shards of {args.shard_rows:,} rows; {args.n:,} x {args.dim}-d float32 = "
          f"{mib(floats)} MiB; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"faiss {faiss().__version__} with {built['omp_threads']} threads; load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} / {load_after[1]:.1f} / {load_after[2]:.1f} after\n")
    print("| n | options | build (s) | peak RssAnon (MiB) | growth in build (MiB) | float data (MiB) | "
          "memory_bytes (MiB) | nprobe | rerank | recall@10 | p50 (ms) | p95 (ms) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for number, point in enumerate(built["points"]):
        head = (f"| {args.n:,} | nlist={opts['nlist']}, m={opts['m']}, nbits={opts['nbits']}, "
                f"train_size={opts['train_size']:,} | {built['build_s']:.0f} | {mib(built['peak_rss_anon'])} | "
                f"{mib(built['peak_rss_anon'] - built['rss_anon_before'])} | {mib(floats)} | "
                f"{mib(built['memory_bytes'])} |") if number == 0 else "| | | | | | | |"
        print(f"{head} {point['nprobe']} | {point['rerank']} | {point['recall']:.3f} | {point['p50_ms']:.2f} | "
              f"{point['p95_ms']:.2f} |")
    print(json.dumps({"generate": generated, "build": built, "load_before": load_before, "load_after": load_after}))


if __name__ == "__main__":
    main()
