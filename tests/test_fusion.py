"""Fusion strategies: registration, shapes and normalisation, weights, training, bundles, ONNX, eval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmretrieve.errors import BundleError, ConfigError, InputError
from mmretrieve.fusion import create_fusion, is_trainable, list_fusion_strategies
from mmretrieve.fusion.embeddings import CaptionedEmbeddings
from mmretrieve.fusion.evaluation import evaluate_fusion, format_table, split_items_and_queries
from mmretrieve.fusion.training import FusionTrainConfig, train_fusion
from mmretrieve.fusion.weights import parse_weights
from mmretrieve.plugins import PluginHost

STRATEGIES = ("late", "mean", "concat-projection", "gated")
EMBEDDING_STRATEGIES = ("mean", "concat-projection", "gated")


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def random_pair(n=5, d=12, seed=0):
    rng = np.random.default_rng(seed)
    return unit(rng.normal(size=(n, d))), unit(rng.normal(size=(n, d)))


def toy_set(seed: int, images=300, captions=5, dim=16) -> CaptionedEmbeddings:
    """Captions see the whole latent through noise; images see only its first half and carry
    loud noise in the second, so averaging them in blindly hurts and a learned head can do better."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(images, dim))
    half = dim // 2
    image = np.concatenate([latent[:, :half] + 0.3 * rng.normal(size=(images, half)),
                            3.0 * rng.normal(size=(images, dim - half))], axis=1)
    owners = np.repeat(np.arange(images), captions)
    texts = latent[owners] + 1.0 * rng.normal(size=(len(owners), dim))
    return CaptionedEmbeddings(unit(image), unit(texts), owners)


# -- registration ----------------------------------------------------------------------------
def test_builtins_are_registered_through_the_fusion_hook():
    host = PluginHost()
    host.load_builtins()
    registry = host.registry("fusion")
    assert set(STRATEGIES) <= set(registry.names())
    for name in STRATEGIES:
        assert registry.get(name).plugin == "mmretrieve.default_plugins.fusion"
    assert {name for name in STRATEGIES if registry.get(name).trainable} == {"concat-projection", "gated"}
    assert host.records["mmretrieve.default_plugins.fusion"].registered["fusion"] == list(STRATEGIES)
    assert set(STRATEGIES) <= set(list_fusion_strategies()) and is_trainable("gated") and not is_trainable("mean")


def test_blocking_the_builtin_fusion_plugin_removes_the_strategies(monkeypatch):
    from mmretrieve import plugins

    monkeypatch.setenv(plugins.ENV_BLOCK, "mmretrieve.default_plugins.fusion")
    host = PluginHost()
    host.load_builtins()
    assert "mean" not in host.registry("fusion")


# -- shapes, normalisation, the arithmetic ------------------------------------------------
@pytest.mark.parametrize("name", EMBEDDING_STRATEGIES)
def test_fuse_returns_one_normalised_vector_per_pair(name):
    text, image = random_pair(n=5, d=12)
    fused = create_fusion(name, dim=12).fuse(text, image)
    assert fused.shape == (5, 12) and fused.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(fused, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", ["concat-projection", "gated"])
def test_untrained_heads_start_as_the_mean(name):
    text, image = random_pair(n=4, d=8, seed=1)
    np.testing.assert_allclose(create_fusion(name, dim=8).fuse(text, image),
                               create_fusion("mean").fuse(text, image), atol=1e-6)


def test_mean_weights_tilt_towards_a_modality():
    text, image = random_pair(n=3, d=6, seed=2)
    np.testing.assert_allclose(create_fusion("mean", weights=(1, 0)).fuse(text, image), text, atol=1e-6)
    np.testing.assert_allclose(create_fusion("mean", weights="0,2").fuse(text, image), image, atol=1e-6)
    np.testing.assert_allclose(create_fusion("mean", weights=(1, 3)).fuse(text, image), unit(text + 3 * image), atol=1e-6)


def test_late_fusion_weighs_the_similarities_and_has_no_single_vector():
    text, image = random_pair(n=4, d=6, seed=3)
    queries, _ = random_pair(n=2, d=6, seed=4)
    late = create_fusion("late", weights=(0.25, 0.75))
    np.testing.assert_allclose(late.scores(queries, text, image),
                               0.25 * queries @ text.T + 0.75 * queries @ image.T, atol=1e-6)
    with pytest.raises(ConfigError, match="no fused embedding"):
        late.fuse(text, image)


def test_mismatched_embeddings_are_refused():
    text, image = random_pair(n=4, d=6)
    with pytest.raises(InputError, match="one shape"):
        create_fusion("mean").fuse(text, image[:3])
    with pytest.raises(InputError, match="8-d"):
        create_fusion("gated", dim=8).fuse(text, image)


# -- weights ------------------------------------------------------------------------------
@pytest.mark.parametrize("weights, message", [
    ((-0.5, 1.5), "must not be negative"),
    ((0, 0), "all zero"),
    ("0,0", "all zero"),
    ((1.0,), "takes 2 weights"),
    ((0.2, 0.3, 0.5), "takes 2 weights"),
    ((float("nan"), 1.0), "finite"),
    ("0.5,inf", "finite"),
    ("heavy,light", "must be numbers"),
])
@pytest.mark.parametrize("name", ["late", "mean"])
def test_bad_weights_are_refused_with_one_sentence(name, weights, message):
    with pytest.raises(ConfigError, match=message) as caught:
        create_fusion(name, weights=weights)
    assert "\n" not in str(caught.value)


def test_weights_are_normalised_and_default_to_equal():
    np.testing.assert_allclose(parse_weights("1,3"), [0.25, 0.75])
    np.testing.assert_allclose(parse_weights(None), [0.5, 0.5])


def test_trainable_strategies_refuse_weights():
    with pytest.raises(ConfigError, match="takes no weights"):
        create_fusion("gated", dim=4, weights=(0.5, 0.5))


# -- training -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["concat-projection", "gated"])
def test_training_beats_the_untrained_mean_on_held_out_toy_data(name):
    strategy = create_fusion(name, dim=16)
    summary = train_fusion(strategy, toy_set(seed=0), FusionTrainConfig(epochs=30, batch_size=64, lr=1e-2))
    assert summary["steps"] == 30 * (300 // 64) and np.isfinite(summary["final_loss"])
    table = evaluate_fusion(toy_set(seed=1), {"mean": create_fusion("mean"), name: strategy})
    assert table[name]["R@1"] > table["mean"]["R@1"] + 5, format_table(table)
    assert table[name]["R@5"] > table["mean"]["R@5"], format_table(table)


def test_training_needs_images_with_two_captions():
    single = CaptionedEmbeddings(*random_pair(n=4, d=8), owners=np.arange(4))
    with pytest.raises(InputError, match="two or more captions"):
        train_fusion(create_fusion("gated", dim=8), single)


# -- bundles ------------------------------------------------------------------------------------
@pytest.fixture
def trained_gated():
    strategy = create_fusion("gated", dim=16)
    train_fusion(strategy, toy_set(seed=0, images=64), FusionTrainConfig(epochs=3, batch_size=32, lr=1e-2))
    return strategy


def test_fusion_bundle_round_trips_and_refuses_another_model(tmp_path, trained_gated):
    from mmretrieve.fusion.store import load_fusion, save_fusion

    folder = save_fusion(trained_gated, tmp_path / "gated", base_fingerprint="abc123", training={"steps": 6})
    assert sorted(p.name for p in folder.iterdir()) == ["fusion.json", "fusion.onnx", "manifest.json",
                                                       "weights.safetensors"]
    loaded = load_fusion(folder, base_fingerprint="abc123")
    assert loaded.digest == json.loads((folder / "fusion.json").read_text())["head_digest"]
    text, image = random_pair(n=6, d=16, seed=5)
    np.testing.assert_allclose(loaded.fuse(text, image), trained_gated.fuse(text, image), atol=1e-6)
    assert json.loads((folder / "fusion.json").read_text())["training"] == {"steps": 6}
    with pytest.raises(BundleError, match="trained on the embeddings of model abc123"):
        load_fusion(folder, base_fingerprint="other")


@pytest.mark.onnx
def test_the_onnx_head_of_a_bundle_fuses_like_pytorch(tmp_path, trained_gated):
    from mmretrieve.runtime.onnx_fusion import OnnxFusion
    from mmretrieve.fusion.store import save_fusion

    folder = save_fusion(trained_gated, tmp_path / "gated", base_fingerprint="abc123")
    head = OnnxFusion(folder, base_fingerprint="abc123")
    text, image = random_pair(n=9, d=16, seed=2)
    expected = trained_gated.fuse(text, image)
    np.testing.assert_allclose(head.fuse(text, image), expected, atol=1e-5)
    assert head.name == "gated" and head.digest == trained_gated_digest(trained_gated)
    with pytest.raises(BundleError, match="trained on the embeddings of model abc123"):
        OnnxFusion(folder, base_fingerprint="other")
    with pytest.raises(InputError, match="16-d"):
        head.fuse(*random_pair(n=2, d=8))


def test_a_trained_head_is_loaded_by_the_embedders_runtime(tmp_path, trained_gated):
    """resolve_fusion asks the embedder for the head (no branching on its runtime's name); an
    embedder that cannot say gets the PyTorch head."""
    from types import SimpleNamespace

    from mmretrieve.fusion.resolve import resolve_fusion
    from mmretrieve.fusion.store import save_fusion
    from mmretrieve.fusion.strategies import LearnedFusion

    folder = save_fusion(trained_gated, tmp_path / "gated", base_fingerprint="abc123")
    asked = []

    def load_fusion_head(where):
        asked.append(Path(where))
        head = create_fusion("gated", dim=16)
        head.digest = "from-the-runtime"
        return head

    onnx_named = SimpleNamespace(runtime="onnx", ref="m", path=str(tmp_path), fingerprint="abc123", embed_dim=16,
                                 load_fusion_head=load_fusion_head)
    strategy = resolve_fusion(onnx_named, "gated", fusion_bundle=folder)
    assert asked == [folder] and strategy.digest == "from-the-runtime"
    plain = SimpleNamespace(runtime="third-party", ref="m", path=str(tmp_path), fingerprint="abc123", embed_dim=16)
    strategy = resolve_fusion(plain, "gated", fusion_bundle=folder)
    assert isinstance(strategy, LearnedFusion) and strategy.digest == trained_gated_digest(trained_gated)
    with pytest.raises(BundleError, match="trained on the embeddings of model abc123"):
        resolve_fusion(SimpleNamespace(**{**vars(plain), "fingerprint": "other"}), "gated", fusion_bundle=folder)


def trained_gated_digest(strategy) -> str:
    from mmretrieve.fusion.store import head_digest

    return head_digest(strategy.head.state_dict())


def test_a_corrupted_fusion_bundle_is_refused(tmp_path, trained_gated):
    from mmretrieve.fusion.store import load_fusion, save_fusion

    folder = save_fusion(trained_gated, tmp_path / "gated", base_fingerprint="abc123")
    (folder / "weights.safetensors").write_bytes(b"not tensors")
    with pytest.raises(BundleError, match="does not match its recorded hash"):
        load_fusion(folder)
    with pytest.raises(BundleError, match="not a fusion bundle"):
        load_fusion(tmp_path)


def test_a_failed_save_keeps_the_previous_bundle(tmp_path, trained_gated, monkeypatch):
    from mmretrieve.fusion import store

    folder = store.save_fusion(trained_gated, tmp_path / "gated", base_fingerprint="first")
    monkeypatch.setattr(store, "sha256_file", lambda path: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        store.save_fusion(trained_gated, folder, base_fingerprint="second")
    monkeypatch.undo()
    assert store.read_fusion_info(folder)["base_model_fingerprint"] == "first"


# -- ONNX -----------------------------------------------------------------------------------------
@pytest.mark.onnx
@pytest.mark.parametrize("name", ["concat-projection", "gated"])
def test_trained_head_exports_to_onnx_with_parity(tmp_path, name):
    from mmretrieve.fusion.onnx import export_fusion_onnx, fusion_parity
    from mmretrieve.metrics import PARITY_MIN_COSINE as MIN_COSINE

    strategy = create_fusion(name, dim=16)
    train_fusion(strategy, toy_set(seed=0, images=64), FusionTrainConfig(epochs=3, batch_size=32, lr=1e-2))
    report = export_fusion_onnx(strategy, tmp_path / f"{name}.onnx")
    assert report["min_cosine"] >= MIN_COSINE and report["embeddings"] == 1 + 7 + 64
    assert fusion_parity(strategy, tmp_path / f"{name}.onnx")["min_cosine"] >= MIN_COSINE


@pytest.mark.onnx
def test_an_export_that_computes_something_else_is_not_written(tmp_path, trained_gated, monkeypatch):
    from mmretrieve.errors import ParityError
    from mmretrieve.fusion import onnx as fusion_onnx

    # PyTorch's side now fuses differently from the graph that gets exported.
    monkeypatch.setattr(trained_gated, "fuse", lambda t, i: create_fusion("mean").fuse(-t, i))
    with pytest.raises(ParityError, match="differs from PyTorch"):
        fusion_onnx.export_fusion_onnx(trained_gated, tmp_path / "gated.onnx")
    assert not list(tmp_path.iterdir())


# -- evaluation ---------------------------------------------------------------------------------
def test_items_take_one_caption_and_the_rest_are_queries():
    embeddings = toy_set(seed=0, images=4, captions=3)
    items, queries, truth = split_items_and_queries(embeddings)
    assert items.tolist() == [0, 3, 6, 9]
    assert len(queries) == 8 and not set(items) & set(queries.tolist())
    assert truth.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_evaluation_table_has_baselines_and_every_strategy():
    embeddings = toy_set(seed=0, images=50)
    strategies = {name: create_fusion(name, dim=16) for name in STRATEGIES}
    table = evaluate_fusion(embeddings, strategies)
    assert list(table) == ["image-only", "text-only", *STRATEGIES]
    for row in table.values():
        assert list(row) == ["R@1", "R@5", "R@10"] and 0 <= row["R@1"] <= row["R@5"] <= row["R@10"] <= 100
    # Untrained heads start as the mean; late fusion with equal weights ranks like the unnormalised sum.
    assert table["gated"] == table["mean"] == table["concat-projection"]
    assert "| image-only |" in format_table(table)


def test_recall_is_perfect_when_queries_equal_their_item():
    rng = np.random.default_rng(0)
    images = unit(rng.normal(size=(20, 8)))
    owners = np.repeat(np.arange(20), 2)
    table = evaluate_fusion(CaptionedEmbeddings(images, images[owners], owners), {})
    assert table["image-only"] == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0}


# -- multimodal queries -----------------------------------------------------------------------
class FakeEmbedder:
    """Texts and images map to fixed unit vectors; the fingerprint is what bundles are checked against."""

    fingerprint = "abc123"
    ref = path = "fake-model"
    embed_dim = 16

    def __init__(self, dim=16):
        self.text_vector, self.image_vector = random_pair(n=1, d=dim, seed=7)

    def embed_texts(self, texts):
        return np.repeat(self.text_vector, len(texts), axis=0)

    def embed_images(self, images):
        return np.repeat(self.image_vector, len(images), axis=0)


class FakeReader:
    def __init__(self, items):
        self.embedder, self.items = FakeEmbedder(), items

    def search_vectors(self, queries, k=10, min_score=None):
        scores = queries @ self.items.T
        return [[(float(row[i]), int(i)) for i in np.argsort(-row)[:k]] for row in scores]


def test_a_multimodal_query_ranks_by_the_weighted_similarities():
    from mmretrieve.index.search import IndexReader

    search_fused = IndexReader.search_fused  # the reader's method, on a reader of fixed items
    reader = FakeReader(unit(np.random.default_rng(3).normal(size=(30, 16))))
    text, image = reader.embedder.text_vector[0], reader.embedder.image_vector[0]
    hits = search_fused(reader, "q.jpg", "at night", k=5, fusion="late", weights=(0.3, 0.7))
    expected = 0.3 * reader.items @ text + 0.7 * reader.items @ image
    assert [i for _, i in hits] == np.argsort(-expected)[:5].tolist()
    np.testing.assert_allclose([s for s, _ in hits], np.sort(expected)[::-1][:5], atol=1e-5)
    # mean ranks like late fusion with the same weights (a normalised query vector, same order).
    assert [i for _, i in search_fused(reader, "q.jpg", "at night", k=5, fusion="mean", weights=(0.3, 0.7))] == \
        [i for _, i in hits]
    only_text = search_fused(reader, "q.jpg", "at night", k=3, fusion="mean", weights=(1, 0))
    assert [i for _, i in only_text] == np.argsort(-(reader.items @ text))[:3].tolist()


def test_a_multimodal_query_with_a_trained_head_needs_its_bundle(tmp_path, trained_gated):
    from mmretrieve.fusion.query import fused_query_vector
    from mmretrieve.fusion.store import save_fusion

    embedder = FakeEmbedder()
    with pytest.raises(ConfigError, match="has no gated head"):
        fused_query_vector(embedder, "q.jpg", "at night", fusion="gated")
    folder = save_fusion(trained_gated, tmp_path / "gated", base_fingerprint="abc123")
    vector = fused_query_vector(embedder, "q.jpg", "at night", fusion="gated", fusion_bundle=folder)
    np.testing.assert_allclose(vector, trained_gated.fuse(embedder.text_vector, embedder.image_vector), atol=1e-6)
    with pytest.raises(ConfigError, match="holds a gated head"):
        fused_query_vector(embedder, "q.jpg", "at night", fusion="concat-projection", fusion_bundle=folder)
    embedder.fingerprint = "another-model"
    with pytest.raises(BundleError, match="trained on the embeddings of model abc123"):
        fused_query_vector(embedder, "q.jpg", "at night", fusion="gated", fusion_bundle=folder)
    with pytest.raises(InputError, match="must not be empty"):
        fused_query_vector(embedder, "q.jpg", "  ")
