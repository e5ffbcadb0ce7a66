"""Vector index backends: flat, hnsw and ivfpq through the plugin registry, and ``auto``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from mmretrieve.errors import ConfigError, IndexDamagedError, InputError, UnknownNameError
from mmretrieve.index.backends import (
    FlatIndex,
    HNSWIndex,
    IVFPQIndex,
    VectorIndex,
    choose_index_type,
    create_index,
    load_index,
)
from mmretrieve.plugins import get_host

DIM = 32
# Small enough to train on a few thousand vectors: 64 PQ centroids, 16 coarse clusters.
IVFPQ_SMALL = {"nlist": 16, "m": 8, "nbits": 6, "nprobe": 8, "rerank": 10, "train_size": 2500}
KIND_OPTIONS = {"flat": {}, "hnsw": {"M": 16, "ef_construction": 64, "ef_search": 64}, "ivfpq": IVFPQ_SMALL}


def clustered(n: int, dim: int, clusters: int = 50, spread: float = 0.5, seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres, like real embeddings (which are clustered).

    The centres depend only on ``clusters`` and ``dim``, so another ``seed`` draws held-out
    points from the same mixture.
    """
    centres = np.random.default_rng([clusters, dim]).standard_normal((clusters, dim))
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((n, dim)) * spread
    points = (centres[rng.integers(0, clusters, n)] + noise) / np.sqrt(dim)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points.astype(np.float32)


def build(kind: str, n: int = 3000, dim: int = DIM, **options) -> tuple[VectorIndex, np.ndarray, np.ndarray]:
    vectors = clustered(n, dim)
    ids = np.arange(n, dtype=np.int64) * 7 + 3  # not row numbers, to catch id/row mix-ups
    index = create_index(kind, dim, **{**KIND_OPTIONS[kind], **options})
    index.add(ids, vectors)
    return index, ids, vectors


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


# -- registration ------------------------------------------------------------------------------

def test_builtin_plugin_registers_the_three_kinds():
    registry = get_host().registry("index_backend")
    assert {"flat", "hnsw", "ivfpq"} <= set(registry.names())
    for name in ("flat", "hnsw", "ivfpq"):
        assert registry.get(name).plugin == "mmretrieve.default_plugins.index_backends"
    assert type(create_index("flat", 8)) is FlatIndex
    assert type(create_index("exact", 8)) is FlatIndex
    assert type(create_index("hnsw", 8)) is HNSWIndex
    assert type(create_index("ivfpq", 8, nlist=4)) is IVFPQIndex


def test_unknown_kind_raises_unknown_name_error_with_suggestion():
    with pytest.raises(UnknownNameError, match="hnsw"):
        create_index("hnws", 8)


def test_only_faiss_lib_imports_faiss():
    package = Path(__file__).resolve().parents[1] / "mmretrieve"
    pattern = re.compile(r"^\s*(import faiss|from faiss\b)", re.MULTILINE)
    offenders = [str(p.relative_to(package)) for p in package.rglob("*.py")
                 if pattern.search(p.read_text(encoding="utf-8")) and p.name != "faiss_lib.py"]
    assert offenders == []


# -- the round trip, for every kind ------------------------------------------------------------

@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_add_search_remove_save_load(kind, tmp_path):
    index, ids, vectors = build(kind)
    if kind == "ivfpq":
        assert index.is_trained  # 3000 added >= train_size
    assert len(index) == 3000
    assert np.array_equal(index.ids(), np.sort(ids))
    assert index.memory_bytes() > 0

    scores, found = index.search(vectors[:50], 5)
    assert scores.shape == found.shape == (50, 5)
    assert scores.dtype == np.float32 and found.dtype == np.int64
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    assert np.mean(found[:, 0] == ids[:50]) >= 0.95  # a vector finds itself
    np.testing.assert_allclose(scores[found[:, 0] == ids[:50], 0], 1.0, atol=1e-4)

    gone = ids[:100]
    assert index.remove(np.concatenate([gone, gone[:5], [10**12]])) == 100  # repeats and unknowns ignored
    assert index.remove(gone) == 0
    assert len(index) == 2900
    _, after = index.search(vectors[:100], 10)
    assert not np.isin(after, gone).any()

    folder = tmp_path / kind
    index.save(folder)
    meta = json.loads((folder / "index.json").read_text())
    assert (meta["kind"], meta["dim"], meta["count"]) == (kind, DIM, 2900)
    for mmap in (False, True):
        loaded = load_index(folder, mmap=mmap)
        assert type(loaded) is type(index) and loaded.options == index.options
        assert np.array_equal(loaded.ids(), index.ids())
        again_scores, again = loaded.search(vectors[100:150], 5)
        expected_scores, expected = index.search(vectors[100:150], 5)
        assert np.array_equal(again, expected)
        np.testing.assert_allclose(again_scores, expected_scores, rtol=1e-5, atol=1e-6)

    mapped = load_index(folder, mmap=True)
    assert mapped.memory_bytes() < load_index(folder).memory_bytes()  # the bulk is page cache
    with pytest.raises(InputError, match="read-only"):
        mapped.add([1], vectors[:1])
    with pytest.raises(InputError, match="read-only"):
        mapped.remove([ids[200]])

    # A plain load stays writable, and growing it leaves the saved folder as it was.
    saved = {p.name: p.read_bytes() for p in folder.iterdir()}
    loaded = type(index).load(folder)
    extra = clustered(10, DIM, seed=9)
    loaded.add(np.arange(10) + 10**9, extra)
    assert np.mean(loaded.search(extra, 10)[1][:, 0] == np.arange(10) + 10**9) >= 0.9
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == saved
    loaded.save(folder)  # saving over the folder it reads from
    assert len(load_index(folder)) == 2910


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_fewer_results_than_k_are_padded(kind):
    index = create_index(kind, DIM, **KIND_OPTIONS[kind])
    empty_scores, empty_ids = index.search(clustered(2, DIM), 4)
    assert (empty_ids == -1).all() and np.isneginf(empty_scores).all()

    vectors = clustered(5, DIM, seed=1)
    index.add([10, 11, 12, 13, 14], vectors)
    index.remove([12])
    scores, found = index.search(vectors, 8)
    assert found.shape == (5, 8)
    for row_scores, row in zip(scores, found):
        assert sorted(row[:4].tolist()) == [10, 11, 13, 14]
        assert (row[4:] == -1).all() and np.isneginf(row_scores[4:]).all()
        assert np.isfinite(row_scores[:4]).all()


def test_trained_ivfpq_pads_when_k_exceeds_the_collection():
    index, ids, _ = build("ivfpq", n=3000, nprobe=16)  # every list probed: all 3000 reachable
    scores, found = index.search(clustered(2, DIM, seed=5), 3500)
    for row_scores, row in zip(scores, found):
        assert sorted(row[:3000].tolist()) == sorted(ids.tolist())
        assert (row[3000:] == -1).all() and np.isneginf(row_scores[3000:]).all()


def test_single_query_vector_is_accepted():
    index, ids, vectors = build("flat", n=20)
    scores, found = index.search(vectors[3], 2)
    assert found.shape == (1, 2) and found[0, 0] == ids[3]


# -- hnsw tombstones ---------------------------------------------------------------------------

def test_hnsw_tombstones_are_never_returned_and_compaction_rebuilds():
    index, ids, vectors = build("hnsw", n=2000)
    first = ids[::10]  # 10%: below the compaction threshold, kept as tombstones
    assert index.remove(first) == 200
    assert index.tombstones == 200 and len(index) == 1800
    # Querying with the removed vectors themselves: each would be its own best match.
    _, found = index.search(vectors[::10], 20)
    assert not np.isin(found, first).any()
    assert (found >= 0).all()  # the filter still fills k with live results

    second = ids[1::10][:150]  # 350 of 2000 rows (17.5%): still tombstones
    index.remove(second)
    assert index.tombstones == 350
    third = ids[2::10][:100]  # 450 of 2000 rows > 20%: rebuilt without them
    index.remove(third)
    assert index.tombstones == 0 and len(index) == 1550
    assert index.memory_bytes() < build("hnsw", n=2000)[0].memory_bytes()
    removed = np.concatenate([first, second, third])
    _, found = index.search(vectors, 10)
    assert not np.isin(found, removed).any()
    keep = ~np.isin(ids, removed)
    assert np.mean(found[keep, 0] == ids[keep]) >= 0.95


def test_hnsw_tombstones_survive_save_and_load(tmp_path):
    index, ids, vectors = build("hnsw", n=1000)
    index.remove(ids[:50])
    index.save(tmp_path / "h")
    loaded = load_index(tmp_path / "h")
    assert loaded.tombstones == 50 and len(loaded) == 950
    _, found = loaded.search(vectors[:50], 10)
    assert not np.isin(found, ids[:50]).any()


# -- ivfpq -------------------------------------------------------------------------------------

def test_ivfpq_recall_with_exact_rerank():
    n, dim = 20_000, 64
    vectors = clustered(n, dim, clusters=200, spread=0.6, seed=3)
    queries = clustered(200, dim, clusters=200, spread=0.6, seed=4)  # held out, same mixture
    ids = np.arange(n) + 1000
    exact = create_index("flat", dim)
    exact.add(ids, vectors)
    _, truth = exact.search(queries, 10)

    # 6-bit codes train in about a second; 8 bytes per vector against 256 for the floats.
    index = create_index("ivfpq", dim, nlist=128, m=8, nbits=6, nprobe=16, rerank=10, train_size=5000)
    index.add(ids, vectors)
    assert index.is_trained
    _, found = index.search(queries, 10)
    reranked = recall_at(found, truth)
    index.set_search_options(rerank=0)
    _, raw = index.search(queries, 10)
    assert reranked >= 0.9
    assert reranked > recall_at(raw, truth)
    assert index.memory_bytes() < exact.memory_bytes() / 4


def test_ivfpq_trains_once_enough_small_batches_arrive():
    vectors = clustered(3000, DIM)
    exact = create_index("flat", DIM)
    exact.add(np.arange(3000), vectors)
    index = create_index("ivfpq", DIM, **IVFPQ_SMALL)
    for start in range(0, 2000, 250):  # below train_size=2500: untrained, searched exactly
        index.add(np.arange(start, start + 250), vectors[start:start + 250])
    assert not index.is_trained
    index.remove([5, 6])
    scores, found = index.search(vectors[:20], 10)
    partial = create_index("flat", DIM)
    partial.add(np.setdiff1d(np.arange(2000), [5, 6]), np.delete(vectors[:2000], [5, 6], axis=0))
    expected_scores, expected = partial.search(vectors[:20], 10)
    assert np.array_equal(found, expected)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)

    for start in range(2000, 3000, 250):  # crossing train_size trains and encodes every live row
        index.add(np.arange(start, start + 250), vectors[start:start + 250])
    assert index.is_trained and len(index) == 2998
    _, found = index.search(vectors[:200], 10)
    _, truth = exact.search(vectors[:200], 10)
    truth = np.where(np.isin(truth, [5, 6]), -2, truth)
    assert not np.isin(found, [5, 6]).any()
    assert recall_at(found, truth) >= 0.85


def test_ivfpq_explicit_training_sample():
    vectors = clustered(3000, DIM)
    index = create_index("ivfpq", DIM, **{**IVFPQ_SMALL, "train_size": 100_000})
    index.add(np.arange(100), vectors[:100])
    with pytest.raises(InputError, match="at least 2496"):
        index.train(vectors[:1000])
    index.train(vectors)
    assert index.is_trained and len(index) == 100
    index.add(np.arange(100, 3000), vectors[100:])
    _, found = index.search(vectors[:50], 1)
    assert np.mean(found[:, 0] == np.arange(50)) >= 0.95
    with pytest.raises(InputError, match="already trained"):
        index.train(vectors)


def test_search_options_change_without_rebuilding():
    index, _, vectors = build("hnsw", n=500)
    index.set_search_options(ef_search=16)
    assert index.options["ef_search"] == 16
    with pytest.raises(ConfigError, match="cannot change"):
        index.set_search_options(M=8)
    with pytest.raises(ConfigError, match="ef_search"):
        index.set_search_options(ef_search=0)


# -- input and configuration errors ------------------------------------------------------------

def test_bad_input_is_refused_clearly():
    index = create_index("flat", 4)
    unit = np.eye(4, dtype=np.float32)
    index.add([1, 2], unit[:2])
    with pytest.raises(InputError, match="already in the index"):
        index.add([2], unit[2:3])
    with pytest.raises(InputError, match="appears twice"):
        index.add([7, 7], unit[2:4])
    with pytest.raises(InputError, match="L2-normalised"):
        index.add([3], unit[2:3] * 2)
    with pytest.raises(InputError, match=r"shape \(n, 4\)"):
        index.add([3], np.ones((1, 5), dtype=np.float32) / np.sqrt(5))
    with pytest.raises(InputError, match="3 ids for 2"):
        index.add([3, 4, 5], unit[2:4])
    with pytest.raises(InputError, match=">= 0"):
        index.add([-1], unit[2:3])
    with pytest.raises(InputError, match="integers"):
        index.add([1.5], unit[2:3])
    with pytest.raises(InputError, match="NaN"):
        index.search(np.full((1, 4), np.nan), 1)
    with pytest.raises(InputError, match="k must be"):
        index.search(unit, 0)
    assert len(index) == 2


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="no option 'ef'"):
        create_index("hnsw", 8, ef=3)
    with pytest.raises(ConfigError, match="must divide"):
        create_index("ivfpq", 10, m=3)
    with pytest.raises(ConfigError, match="train_size"):
        create_index("ivfpq", 8, nlist=100, train_size=10)
    with pytest.raises(ConfigError, match="dim"):
        create_index("flat", 0)


def test_loading_a_folder_of_another_kind_or_a_corrupt_one(tmp_path):
    index, _, _ = build("hnsw", n=300)
    folder = tmp_path / "h"
    index.save(folder)
    with pytest.raises(InputError, match="holds a 'hnsw' index, not a 'flat' one"):
        FlatIndex.load(folder)
    assert type(load_index(folder)) is HNSWIndex  # load_index follows index.json

    with pytest.raises(InputError, match="index.json is missing"):
        load_index(tmp_path / "nowhere")

    meta = folder / "index.json"
    good = meta.read_text()
    meta.write_text(good[: len(good) // 2])
    with pytest.raises(InputError, match="cannot be read as JSON"):
        load_index(folder)
    meta.write_text(json.dumps({**json.loads(good), "format_version": 99}))
    with pytest.raises(InputError, match="format 99, newer than"):
        load_index(folder)
    meta.write_text(json.dumps({**json.loads(good), "format": "something-else"}))
    with pytest.raises(InputError, match="not an mmretrieve vector index"):
        load_index(folder)
    meta.write_text(json.dumps({**json.loads(good), "kind": "annoy"}))
    with pytest.raises(UnknownNameError, match="annoy"):
        load_index(folder)
    meta.write_text(json.dumps({**json.loads(good), "count": 301}))
    with pytest.raises(InputError, match="says 301 vectors"):
        load_index(folder)
    meta.write_text(json.dumps({**json.loads(good), "options": {"M": "many"}}))
    with pytest.raises(InputError, match="invalid options"):
        load_index(folder)
    meta.write_text(good)

    graph = folder / "hnsw.faiss"
    graph.write_bytes(graph.read_bytes()[:1000])
    with pytest.raises(IndexDamagedError, match="hnsw.faiss holds 1,000 bytes, index.json recorded"):
        load_index(folder)  # the recorded size catches a truncated file before faiss reads it
    meta.write_text(json.dumps({k: v for k, v in json.loads(good).items() if k != "files"}))
    with pytest.raises(IndexDamagedError, match="cannot be read"):
        load_index(folder)  # a folder saved before sizes were recorded: faiss refuses the file
    graph.unlink()
    with pytest.raises(InputError, match="hnsw.faiss is missing"):
        load_index(folder)


def test_ivfpq_folder_with_mismatched_files_is_refused(tmp_path):
    index, _, _ = build("ivfpq", n=3000)
    index.save(tmp_path / "p")
    vectors = tmp_path / "p" / "vectors.f32"
    vectors.write_bytes(vectors.read_bytes()[: 4 * DIM * 10])
    with pytest.raises(IndexDamagedError, match=f"vectors.f32 holds {4 * DIM * 10:,} bytes"):
        load_index(tmp_path / "p")
    meta = tmp_path / "p" / "index.json"
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "files"}))
    with pytest.raises(IndexDamagedError, match="vectors.f32 has 10 rows"):
        load_index(tmp_path / "p")  # without recorded sizes the backend's own check still refuses it


# -- auto --------------------------------------------------------------------------------------

def test_choose_index_type_rules():
    assert choose_index_type(10_000, 256) == ("flat", {})
    assert choose_index_type(50_000, 256)[0] == "flat"
    assert choose_index_type(50_001, 256)[0] == "hnsw"
    assert choose_index_type(20_000, 768)[0] == "hnsw"  # the threshold scales with dim

    kind, options = choose_index_type(1_000_000, 256)
    assert kind == "hnsw" and options["M"] == 32
    hnsw_bytes = HNSWIndex.estimate_memory_bytes(1_000_000, 256, options["M"])
    assert choose_index_type(1_000_000, 256, hnsw_bytes)[0] == "hnsw"

    kind, options = choose_index_type(1_000_000, 256, hnsw_bytes - 1)
    assert kind == "ivfpq"
    assert options["nlist"] == 4096 and options["m"] == 32 and options["nprobe"] == 32
    assert options["rerank"] == 20
    index = create_index(kind, 256, **options)  # the options are valid as they stand
    assert index.options["train_size"] >= 39 * 4096

    tight = IVFPQIndex.estimate_memory_bytes(1_000_000, 256, 4096, 8)
    kind, options = choose_index_type(1_000_000, 256, tight)
    assert kind == "ivfpq" and options["m"] == 8
    with pytest.raises(ConfigError, match="too small"):
        choose_index_type(1_000_000, 256, 10_000_000)

    # A small collection that does not fit flat in the budget is compressed, with enough
    # training points per cluster.
    kind, options = choose_index_type(20_000, 256, 2_000_000)
    assert kind == "ivfpq" and options["nlist"] * 39 <= 20_000
    assert choose_index_type(10**9, 128, 100 * 10**9)[1]["nlist"] == 65536
