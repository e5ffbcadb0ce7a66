"""Vector index backends on clustered embeddings: build time, memory, single-query latency, recall@10.

Data: ``--n`` 256-d unit vectors from a Gaussian mixture shaped like real embeddings (which
are clustered and anisotropic): ``--clusters`` centres with log-normal sizes, each point its
centre plus noise of a per-cluster spread, both drawn with a decaying per-dimension scale,
then normalised. Queries are ``--queries`` held-out draws from the same mixture. Recall@10
is measured against exact search. Each kind is built and measured in its own process, with
the data memory-mapped from disk, so its resident-memory growth is the index alone.
Latency is one query per ``search`` call (what a user's query costs); faiss keeps its own
thread count. Prints Markdown tables.

    python benchmarks/index_backends.py                # 1M vectors: ~20 minutes on 2 cores
    python benchmarks/index_backends.py --n 100000     # a quick run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mmretrieve.index.backends import create_index, load_index
from mmretrieve.index.choose import ivfpq_options
from mmretrieve.index.faiss_lib import faiss

K = 10
WARMUP_QUERIES = 20
BATCH = 100_000
# The targets this benchmark checks (docs/benchmarks.md).
HNSW_TARGET = {"recall": 0.95, "p50_ms": 2.0}
IVFPQ_TARGET = {"recall": 0.85, "memory_share": 1 / 8}


# -- data --------------------------------------------------------------------------------------

def mixture(n_clusters: int, dim: int, noise_decay: float, seed: int) -> dict[str, np.ndarray]:
    """Centres spread over many directions; noise whose variance falls off with the dimension.

    Noise scale ``(1 + i / noise_decay) ** -1`` along dimension ``i`` gives a local effective
    dimension (participation ratio) of ~40 at the default 16: points vary along a few tens
    of directions around their centre, as learned embeddings do, rather than all 256.
    """
    rng = np.random.default_rng(seed)
    centre_scale = (1 + np.arange(dim) / 16) ** -0.5
    centres = rng.standard_normal((n_clusters, dim)) * centre_scale
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise_scale = (1 + np.arange(dim) / noise_decay) ** -1.0
    noise_scale /= np.linalg.norm(noise_scale)
    weights = rng.lognormal(0.0, 1.0, n_clusters)  # uneven cluster sizes, as in real collections
    return {"centres": centres, "noise_scale": noise_scale, "weights": weights / weights.sum(),
            "spread": rng.uniform(0.5, 1.0, n_clusters)}  # noise norm relative to the centre's


def draw(model: dict[str, np.ndarray], n: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dim = model["centres"].shape[1]
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        which = rng.choice(len(model["weights"]), size, p=model["weights"])
        noise = rng.standard_normal((size, dim)) * model["noise_scale"] * model["spread"][which, None]
        points = model["centres"][which] + noise
        out[start:start + size] = points / np.linalg.norm(points, axis=1, keepdims=True)
    return out


def effective_dim(scale: np.ndarray) -> float:
    variance = scale ** 2
    return float(variance.sum() ** 2 / (variance ** 2).sum())


def exact_top_k(data: np.ndarray, queries: np.ndarray, k: int, chunk: int = 200_000) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores and row numbers of the ``k`` nearest rows, best first."""
    best_scores = np.empty((len(queries), 0), dtype=np.float32)
    best_ids = np.empty((len(queries), 0), dtype=np.int64)
    for start in range(0, len(data), chunk):
        block = np.asarray(data[start:start + chunk])
        scores = np.concatenate([best_scores, queries @ block.T], axis=1)
        block_ids = np.broadcast_to(np.arange(start, start + len(block)), (len(queries), len(block)))
        ids = np.concatenate([best_ids, block_ids], axis=1)
        keep = np.argsort(-scores, axis=1)[:, :k]
        best_scores = np.take_along_axis(scores, keep, axis=1)
        best_ids = np.take_along_axis(ids, keep, axis=1)
    return best_scores, best_ids


# -- measuring, inside a worker process --------------------------------------------------------

def rss_anon_bytes() -> int:
    """Anonymous resident memory: the heap, not the memory-mapped data file."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f, t)) / len(t) for f, t in zip(found, truth)]))


def one_query_at_a_time(index, queries: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    for q in queries[:WARMUP_QUERIES]:
        index.search(q[None], K)
    times, found = [], []
    for q in queries[:limit]:
        started = time.perf_counter()
        _, ids = index.search(q[None], K)
        times.append(time.perf_counter() - started)
        found.append(ids[0])
    return np.array(times) * 1000, np.array(found)


def measure_point(index, queries, truth, limit) -> dict:
    millis, found = one_query_at_a_time(index, queries, limit)
    return {"p50_ms": float(np.percentile(millis, 50)), "p99_ms": float(np.percentile(millis, 99)),
            "recall": recall(found, truth[:limit]), "queries": int(min(limit, len(queries)))}


def build_worker(args: argparse.Namespace, spec: dict) -> dict:
    """Build, time and save one index; the caller serves it from a fresh process."""
    data = np.load(args.data, mmap_mode="r")
    started = time.perf_counter()
    index = create_index(spec["kind"], data.shape[1], **spec["options"])
    for start in range(0, len(data), BATCH):  # in batches, as the indexing pipeline adds them
        index.add(np.arange(start, min(start + BATCH, len(data))), data[start:start + BATCH])
    build_s = time.perf_counter() - started
    index.save(Path(spec["folder"]))
    return {"build_s": build_s, "options": index.options}


def serve_worker(args: argparse.Namespace, spec: dict) -> dict:
    """Load a saved index in a fresh process: its resident size, then latency and recall."""
    queries = np.load(args.queries_file)
    truth = np.load(args.truth)
    gc.collect()
    rss_before = rss_anon_bytes()
    index = load_index(Path(spec["folder"]))
    result = {"memory_bytes": index.memory_bytes(), "rss_delta": rss_anon_bytes() - rss_before, "points": []}
    for point in spec["sweep"]:
        index.set_search_options(**point)
        result["points"].append({**point, **measure_point(index, queries, truth, spec["latency_queries"])})
    return result


def worker(args: argparse.Namespace) -> None:
    if args.threads:
        faiss().omp_set_num_threads(args.threads)
    spec = json.loads(args.worker)
    result = build_worker(args, spec) if spec["phase"] == "build" else serve_worker(args, spec)
    print("RESULT " + json.dumps(result), flush=True)


# -- the driver --------------------------------------------------------------------------------

def run_worker(args: argparse.Namespace, paths: dict[str, str], spec: dict) -> dict:
    command = [sys.executable, __file__, "--worker", json.dumps(spec), "--data", paths["data"],
               "--queries-file", paths["queries"], "--truth", paths["truth"], "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{spec['kind']} {spec['phase']} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def benchmark_kind(args, paths, kind: str, options: dict, sweep: list[dict], latency_queries: int) -> dict:
    folder = str(Path(paths["root"]) / kind)
    built = run_worker(args, paths, {"phase": "build", "kind": kind, "options": options, "folder": folder})
    print(f"  {kind}: built in {built['build_s']:.0f}s", file=sys.stderr, flush=True)
    served = run_worker(args, paths, {"phase": "serve", "kind": kind, "folder": folder, "sweep": sweep,
                                      "latency_queries": latency_queries})
    shutil.rmtree(folder)
    return {"kind": kind, **built, **served}


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--clusters", type=int, default=5000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--flat-latency-queries", type=int, default=200, help="exact search is slow; time fewer")
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--ef-search", default="16,24,32,48,64,96,128")
    parser.add_argument("--nlist", type=int, default=0, help="0: as choose_index_type picks for --n")
    parser.add_argument("--m", type=int, default=0, help="PQ bytes per vector; 0: dim/8")
    parser.add_argument("--nprobe", default="16,32,64,128")
    parser.add_argument("--rerank", default="0,10,20,40")
    parser.add_argument("--noise-decay", type=float, default=16.0,
                        help="noise scale (1 + i/decay)^-1 per dimension; larger is more isotropic, harder")
    parser.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads; 0 keeps faiss's default")
    parser.add_argument("--kinds", default="flat,hnsw,ivfpq")
    parser.add_argument("--workdir", default=None, help="where the data and indexes go (default: a temp dir)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--queries-file", help=argparse.SUPPRESS)
    parser.add_argument("--truth", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        started = time.perf_counter()
        model = mixture(args.clusters, args.dim, args.noise_decay, seed=0)
        data = draw(model, args.n, seed=1)
        queries = draw(model, args.queries, seed=2)
        exact_scores, truth = exact_top_k(data, queries, K)
        paths = {name: str(Path(tmp) / f"{name}.npy") for name in ("data", "queries", "truth")}
        for name, array in (("data", data), ("queries", queries), ("truth", truth)):
            np.save(paths[name], array)
        paths["root"] = tmp
        del data
        print(f"data ready in {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)

        kinds = args.kinds.split(",")
        results = []
        if "flat" in kinds:
            results.append(benchmark_kind(args, paths, "flat", {}, [{}], args.flat_latency_queries))
        if "hnsw" in kinds:
            hnsw = {"M": args.hnsw_m, "ef_construction": args.ef_construction}
            sweep = [{"ef_search": ef} for ef in parse_ints(args.ef_search)]
            results.append(benchmark_kind(args, paths, "hnsw", hnsw, sweep, args.queries))
        if "ivfpq" in kinds:
            ivf = ivfpq_options(args.n, args.dim, args.m or None)  # what choose_index_type picks
            if args.nlist:
                ivf["nlist"] = args.nlist
            sweep = [{"nprobe": p, "rerank": r} for p in parse_ints(args.nprobe) for r in parse_ints(args.rerank)]
            results.append(benchmark_kind(args, paths, "ivfpq", ivf, sweep, args.queries))

    report(args, results, exact_scores, effective_dim(model["noise_scale"]))


def report(args, results: list[dict], exact_scores: np.ndarray, noise_dim: float) -> None:
    threads = args.threads or faiss().omp_get_max_threads()
    print(f"\n{args.n:,} x {args.dim}-d unit vectors, {args.clusters:,}-component Gaussian mixture "
          f"(noise effective dimension {noise_dim:.0f}); "
          f"{args.queries:,} held-out queries (mean cosine to their 1st / 10th exact neighbour: "
          f"{exact_scores[:, 0].mean():.2f} / {exact_scores[:, -1].mean():.2f}); k={K}; "
          f"faiss {faiss().__version__}, {threads} OpenMP threads, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})\n")
    flat_bytes = next((r["memory_bytes"] for r in results if r["kind"] == "flat"), None)
    print("| index | build options | build (s) | memory_bytes (MiB) | RSS on load (MiB) | search options | "
          "p50 (ms) | p99 (ms) | recall@10 |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|")
    for r in results:
        build_opts = ", ".join(f"{k}={v}" for k, v in r["options"].items()
                               if k not in ("ef_search", "nprobe", "rerank")) or "-"
        share = ""
        if flat_bytes and r["kind"] != "flat":
            ratio = r["memory_bytes"] / flat_bytes
            share = f" (1/{1 / ratio:.0f} of flat)" if ratio < 1 else f" ({ratio:.2f}x flat)"
        for i, p in enumerate(r["points"]):
            search_opts = ", ".join(f"{k}={p[k]}" for k in ("ef_search", "nprobe", "rerank") if k in p) or "-"
            head = (f"| {r['kind']} | {build_opts} | {r['build_s']:.0f} | {mib(r['memory_bytes'])}{share} | "
                    f"{mib(r['rss_delta'])} |") if i == 0 else "| | | | | |"
            note = f" ({p['queries']} queries)" if p["queries"] != args.queries else ""
            print(f"{head} {search_opts} | {p['p50_ms']:.2f} | {p['p99_ms']:.2f} | {p['recall']:.3f}{note} |")
    print()
    for line in target_lines(results, flat_bytes):
        print(line)


def target_lines(results: list[dict], flat_bytes: int | None) -> list[str]:
    """Whether the targets are met, and by which search options (the fastest that qualify)."""
    lines = []
    for r in results:
        if r["kind"] == "hnsw":
            good = [p for p in r["points"]
                    if p["recall"] >= HNSW_TARGET["recall"] and p["p50_ms"] <= HNSW_TARGET["p50_ms"]]
            best = min(good, key=lambda p: p["p50_ms"]) if good else None
            lines.append(f"- HNSW target (recall@10 >= {HNSW_TARGET['recall']} at p50 <= {HNSW_TARGET['p50_ms']} ms): "
                         + (f"met with ef_search={best['ef_search']} (recall {best['recall']:.3f}, "
                            f"p50 {best['p50_ms']:.2f} ms)" if best else "NOT met"))
        if r["kind"] == "ivfpq":
            share = r["memory_bytes"] / flat_bytes if flat_bytes else None
            good = [p for p in r["points"] if p["rerank"] and p["recall"] >= IVFPQ_TARGET["recall"]]
            best = min(good, key=lambda p: p["p50_ms"]) if good else None
            memory_ok = share is not None and share <= IVFPQ_TARGET["memory_share"]
            lines.append(f"- IVF-PQ target (memory <= 1/8 of flat, recall@10 >= {IVFPQ_TARGET['recall']} re-ranked): "
                         + ("memory " + (f"1/{1 / share:.0f} of flat" if share else "not compared (flat not run)"))
                         + (f"; recall met with nprobe={best['nprobe']}, rerank={best['rerank']} "
                            f"(recall {best['recall']:.3f}, p50 {best['p50_ms']:.2f} ms)"
                            if best else "; recall NOT met")
                         + ("" if memory_ok or share is None else "; memory NOT met"))
    return lines


if __name__ == "__main__":
    main()
