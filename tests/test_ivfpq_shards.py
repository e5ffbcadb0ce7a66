"""IVF-PQ built from shards: the same index as one built in one go, one shard of floats in memory."""

from __future__ import annotations

import tracemalloc
import weakref

import numpy as np
import pytest

from mmretrieve.errors import InputError
from mmretrieve.index.backends import ArrayShard, build_index, create_index, load_index
from mmretrieve.index.faiss_lib import faiss
from mmretrieve.index.ivfpq import encode_shard, shard_sample

DIM = 16
OPTIONS = {"nlist": 16, "m": 4, "nbits": 6, "nprobe": 4, "rerank": 0, "train_size": 2500}


def unit_vectors(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class CountingShard:
    """A shard that records how many loaded shards are alive at once (freed arrays count down)."""

    def __init__(self, ids, vectors, tally: dict):
        self.ids, self.vectors, self.tally = ids, vectors, tally

    def __len__(self) -> int:
        return len(self.ids)

    def load(self):
        vectors = self.vectors.copy()
        self.tally["alive"] += 1
        self.tally["most"] = max(self.tally["most"], self.tally["alive"])
        self.tally["loads"] += 1
        weakref.finalize(vectors, lambda: self.tally.__setitem__("alive", self.tally["alive"] - 1))
        return self.ids.copy(), vectors


def counting_shards(ids, vectors, rows):
    tally = {"alive": 0, "most": 0, "loads": 0}
    shards = [CountingShard(ids[s:s + rows], vectors[s:s + rows], tally) for s in range(0, len(ids), rows)]
    return shards, tally


def test_shard_built_index_equals_one_built_in_one_go():
    vectors, ids = unit_vectors(6000), np.arange(100, 6100)
    sharded = build_index("ivfpq", DIM, ArrayShard.split(ids, vectors, 1000), **OPTIONS)
    whole = create_index("ivfpq", DIM, **OPTIONS)
    whole.add(ids, vectors)  # trains on the same seeded sample of all rows, then encodes them
    assert sharded.is_trained and whole.is_trained and len(sharded) == len(whole) == 6000
    queries = unit_vectors(50, seed=1)
    for rerank in (0, 20):  # the PQ scores themselves, and after exact re-ranking
        sharded.set_search_options(rerank=rerank)
        whole.set_search_options(rerank=rerank)
        (s1, i1), (s2, i2) = sharded.search(queries, 10), whole.search(queries, 10)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_allclose(s1, s2, rtol=0, atol=1e-6)


def test_shard_sample_is_the_sample_train_takes_from_the_whole_collection():
    vectors = unit_vectors(3000)
    shards = ArrayShard.split(np.arange(3000), vectors, 700)
    rows = np.sort(np.random.default_rng(0).choice(3000, 500, replace=False))
    np.testing.assert_array_equal(shard_sample(shards, 500), vectors[rows])
    np.testing.assert_array_equal(shard_sample(shards, 5000), vectors)  # fewer rows than asked: all of them


def test_encoded_shards_merge_into_the_same_lists():
    vectors = unit_vectors(4000)
    index = create_index("ivfpq", DIM, **OPTIONS)
    index.train(vectors)
    trained = index._index
    template = faiss().clone_index(trained)
    one = encode_shard(template, np.arange(0, 2000), vectors[:2000])
    two = encode_shard(template, np.arange(2000, 4000), vectors[2000:])
    trained.merge_from(one, 0)
    trained.merge_from(two, 0)
    whole = encode_shard(template, np.arange(4000), vectors)
    assert trained.ntotal == whole.ntotal == 4000 and one.ntotal == 0
    _, a = trained.search(vectors[:20], 5)
    _, b = whole.search(vectors[:20], 5)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="still empty"):
        encode_shard(whole, np.arange(1), vectors[:1])


def test_the_builder_holds_one_shard_of_floats_at_a_time():
    n = 40_000
    vectors, ids = unit_vectors(n, dim=32), np.arange(n)
    shards, tally = counting_shards(ids, vectors, 1000)
    tracemalloc.start()  # numpy's allocations are traced (faiss's own, the codes, are not)
    try:
        index = build_index("ivfpq", 32, shards, **{**OPTIONS, "m": 8})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert index.is_trained and len(index) == n
    assert tally["loads"] == 2 * len(shards)  # one pass to sample, one to add
    assert tally["most"] == 1 and tally["alive"] == 0  # never two loaded shards alive at once
    # All floats at once would be 5.1 MB; the builder holds the 320 kB training sample, one 128 kB
    # shard with its temporaries, and the int64 id tables (about 1.3 MB at 40k rows).
    assert peak < vectors.nbytes / 2


def test_a_shard_built_index_keeps_taking_adds_and_removals(tmp_path):
    vectors, ids = unit_vectors(5000), np.arange(5000)
    index = build_index("ivfpq", DIM, ArrayShard.split(ids, vectors, 1200), **{**OPTIONS, "nprobe": 16, "rerank": 20})
    index.remove(np.arange(0, 100))
    extra = unit_vectors(50, seed=7)
    index.add(np.arange(10_000, 10_050), extra)
    index.save(tmp_path / "ivf")
    loaded = load_index(tmp_path / "ivf")
    assert len(loaded) == 4950
    _, found = loaded.search(extra[:5], 1)
    np.testing.assert_array_equal(found[:, 0], np.arange(10_000, 10_005))
    _, found = loaded.search(vectors[:100], 10)
    assert not np.isin(found, np.arange(100)).any()


def test_fewer_vectors_than_the_training_sample_stay_exact_and_untrained():
    vectors, ids = unit_vectors(1500), np.arange(1500)
    index = build_index("ivfpq", DIM, ArrayShard.split(ids, vectors, 400), **OPTIONS)
    assert not index.is_trained and len(index) == 1500
    _, found = index.search(vectors[:10], 1)
    np.testing.assert_array_equal(found[:, 0], np.arange(10))


def test_fill_from_shards_refuses_an_index_that_holds_vectors():
    index = create_index("ivfpq", DIM, **OPTIONS)
    index.add([1], unit_vectors(1))
    with pytest.raises(InputError, match="already holds vectors"):
        index.fill_from_shards(ArrayShard.split(np.arange(2, 10), unit_vectors(8), 4))


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_other_kinds_take_the_shards_through_add(kind):
    vectors, ids = unit_vectors(900), np.arange(900)
    index = build_index(kind, DIM, ArrayShard.split(ids, vectors, 250))
    assert len(index) == 900
    _, found = index.search(vectors[:5], 1)
    np.testing.assert_array_equal(found[:, 0], np.arange(5))


@pytest.mark.slow
def test_stored_embeddings_come_back_as_shards(messy_image_folder, tmp_path, embedder):
    from mmretrieve.index.builder import index_images
    from mmretrieve.index.store import IndexStore

    index_dir = tmp_path / "idx"
    index_images(messy_image_folder / "holiday", index_dir, embedder, workers=0, progress=False)
    with IndexStore.open(index_dir, readonly=True) as store:
        ids, vectors = store.all_embeddings()
        shards = store.embedding_shards(2, exclude=[int(ids[1])])
        assert sum(map(len, shards)) == len(ids) - 1 and len(shards) == -(-(len(ids) - 1) // 2)
        loaded = [shard.load() for shard in shards]
    assert all(len(i) == len(s) <= 2 for (i, _), s in zip(loaded, shards))
    keep = np.arange(len(ids)) != 1
    np.testing.assert_array_equal(np.concatenate([i for i, _ in loaded]), ids[keep])
    np.testing.assert_array_equal(np.concatenate([v for _, v in loaded]), vectors[keep])
