"""``auto``: pick an index kind and its options from the collection size and a memory budget."""

from __future__ import annotations

import math
from typing import Any

from ..errors import ConfigError
from .flat import FlatIndex
from .hnsw import HNSWIndex
from .ivfpq import MIN_POINTS_PER_CENTROID, IVFPQIndex, default_m

# An exact scan reads n * dim floats per query: 50k x 256-d (51 MB) takes about 5 ms on one
# core of a 2-core EPYC VM (faiss IndexFlatIP, one query per call). Below that, exact search
# is fast enough for interactive use, is always right and builds instantly; above it, scan
# time grows linearly while HNSW stays near a millisecond. Scaled by dim, so a 768-d
# collection switches at ~17k vectors.
FLAT_MAX_FLOATS = 50_000 * 256
HNSW_OPTIONS = {"M": 32, "ef_construction": 80, "ef_search": 96}
MIN_NLIST, MAX_NLIST = 16, 65536
# At 1M x 256-d (docs/benchmarks.md) recall@10 is bound by the PQ codes, not by nprobe:
# nprobe 32 -> 128 gains ~0.01, rerank 10 -> 20 gains ~0.07 for ~0.15 ms.
RERANK = 20
NLIST_PER_PROBE = 128


def _power_of_two_at_most(value: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(value, 1)))))


def ivfpq_options(n_vectors: int, dim: int, m: int | None = None) -> dict[str, Any]:
    """nlist ~ 4*sqrt(n) as a power of two, with >= 39 training points per cluster; nprobe = nlist/128."""
    nlist = 1 << round(math.log2(4 * math.sqrt(max(n_vectors, 1))))
    nlist = min(nlist, _power_of_two_at_most(n_vectors / MIN_POINTS_PER_CENTROID), MAX_NLIST)
    nlist = max(nlist, MIN_NLIST)
    nprobe = max(8, nlist // NLIST_PER_PROBE)
    return {"nlist": nlist, "m": m or default_m(dim), "nbits": 8, "nprobe": nprobe, "rerank": RERANK}


def choose_index_type(n_vectors: int, dim: int, memory_budget_bytes: int | None = None) -> tuple[str, dict[str, Any]]:
    """The index kind and options for ``n_vectors`` ``dim``-d vectors, autofaiss-style.

    Rules, first match wins (sizes are ``estimate_memory_bytes`` of each kind, ids included):

    1. ``flat`` when ``n_vectors * dim <= 50,000 * 256`` (an exact scan then takes ~5 ms per
       query) and it fits the budget: exact, nothing to tune, instant to build.
    2. ``hnsw`` (M=32, ef_construction=80, ef_search=96) when it fits the budget, or there is
       no budget: the fastest queries for ~4*dim + 300 bytes per vector.
    3. ``ivfpq`` otherwise: nlist = 4*sqrt(n) rounded to a power of two (16 to 65536, at most
       n/39 so k-means has 39 points per cluster), nprobe = nlist/128 (at least 8), rerank 20x
       from the vectors on disk, and m = dim/8 byte codes, or the largest divisor of dim below
       that which fits the budget. A budget too small even for 1-byte codes is a ConfigError.

    With no budget, memory is taken as no constraint, so ``ivfpq`` is never chosen.
    """
    if n_vectors < 0 or dim < 1:
        raise ConfigError(f"cannot size an index for {n_vectors} vectors of dimension {dim}")

    def fits(size: int) -> bool:
        return memory_budget_bytes is None or size <= memory_budget_bytes

    if n_vectors * dim <= FLAT_MAX_FLOATS and fits(FlatIndex.estimate_memory_bytes(n_vectors, dim)):
        return "flat", {}
    if fits(HNSWIndex.estimate_memory_bytes(n_vectors, dim, HNSW_OPTIONS["M"])):
        return "hnsw", dict(HNSW_OPTIONS)
    options = ivfpq_options(n_vectors, dim)
    for m in sorted((m for m in range(1, options["m"] + 1) if dim % m == 0), reverse=True):
        if fits(IVFPQIndex.estimate_memory_bytes(n_vectors, dim, options["nlist"], m, options["nbits"])):
            return "ivfpq", {**options, "m": m}
    smallest = IVFPQIndex.estimate_memory_bytes(n_vectors, dim, options["nlist"], 1, options["nbits"])
    raise ConfigError(f"a memory budget of {memory_budget_bytes:,} bytes is too small for {n_vectors:,} vectors: "
                      f"the most compressed index (ivfpq with 1-byte codes) needs about {smallest:,}")
