"""Plugins used by the tests: importable modules, as an entry point would load them."""

from __future__ import annotations

import click
import numpy as np

from mmretrieve import hookimpl
from mmretrieve.atomic import write_npy_atomic
from mmretrieve.index.base import VectorIndex, top_k_indices
from mmretrieve.index.idmap import SortedIds
from mmretrieve.specs import EncoderSpec, FusionSpec, IndexBackendSpec, LossSpec, ModelSpec, RuntimeSpec


def _fake_factory(**options):
    return options


class EveryHook:
    """Registers one thing through each hook."""

    @hookimpl
    def register_encoders(self, register):
        register(EncoderSpec(name="fake-text", modality="text", factory=_fake_factory, defaults={"dim": 8},
                             aliases=("fake",), description="a fake text encoder"))

    @hookimpl
    def register_fusion_strategies(self, register):
        register(FusionSpec(name="fake-fusion", factory=_fake_factory, trainable=True))

    @hookimpl
    def register_losses(self, register):
        register(LossSpec(name="fake-loss", factory=_fake_factory))

    @hookimpl
    def register_index_backends(self, register):
        register(IndexBackendSpec(name="fake-index", factory=_fake_factory))

    @hookimpl
    def register_runtimes(self, register):
        register(RuntimeSpec(name="fake-runtime", factory=_fake_factory))

    @hookimpl
    def register_models(self, register):
        register(ModelSpec(name="fake-model", factory=lambda: "/nonexistent/fake-model"))

    @hookimpl
    def register_commands(self, cli):
        @cli.command(name="fake-hello")
        @click.argument("who")
        def hello(who):
            """Say hello (registered by a test plugin)."""
            click.echo(f"hello {who}")


class ClashesWithBert:
    @hookimpl
    def register_encoders(self, register):
        register(EncoderSpec(name="bert", modality="text", factory=_fake_factory))
        register(EncoderSpec(name="clash-survivor", modality="text", factory=_fake_factory))


class RaisesInHook:
    @hookimpl
    def register_losses(self, register):
        register(LossSpec(name="never-seen", factory=_fake_factory))

    @hookimpl
    def register_encoders(self, register):
        raise RuntimeError("boom")


class MisspelledHook:
    @hookimpl
    def register_encoder(self, register):  # no such hook: register_encoders
        pass


class BadModality:
    @hookimpl
    def register_encoders(self, register):
        register(EncoderSpec(name="audio-thing", modality="audio", factory=_fake_factory))


# Module-level hook, so this module itself can be loaded as an entry point.
@hookimpl
def register_encoders(register):
    register(EncoderSpec(name="entry-point-encoder", modality="image", factory=_fake_factory))


class LouderModality:
    """A third-party fusion strategy: keeps, per dimension, whichever modality is larger in magnitude."""

    name = "louder"
    trainable = False
    late = False

    def __init__(self, dim=None, weights=None):
        pass

    def fuse(self, text, image):
        import numpy as np

        fused = np.where(np.abs(text) >= np.abs(image), text, image)
        return (fused / np.linalg.norm(fused, axis=1, keepdims=True)).astype(np.float32)


class BestOfBoth:
    """A third-party late strategy with no weights: an item scores its better modality's similarity."""

    name = "best-of-both"
    trainable = False
    late = True

    def __init__(self, dim=None, weights=None):
        pass

    def scores(self, queries, text, image):
        import numpy as np

        return np.maximum(queries @ text.T, queries @ image.T).astype(np.float32)


class FusionPlugin:
    """A third party's fusion strategies: one that fuses to a vector, one late one without weights."""

    @hookimpl
    def register_fusion_strategies(self, register):
        register(FusionSpec(name="louder", factory=LouderModality, description="per-dimension louder modality"))
        register(FusionSpec(name="best-of-both", factory=BestOfBoth, description="max of the two similarities"))


# -- A third party's index backend, runtime and loss --------------------------------------------
# Loaded by the tests through a real importlib.metadata entry point, ``third-party =
# plugin_fixtures:THIRD_PARTY``, next to the installed ones. Like a real plugin it declares its
# factories as "module:attribute" strings, so registering them imports nothing heavy.

CALLS: dict[str, int] = {}  # what the third party's code was asked to do, so tests see it was used


def _count(what: str) -> None:
    CALLS[what] = CALLS.get(what, 0) + 1


class NumpyIndex(VectorIndex):
    """An index backend: brute force over a numpy matrix, the five methods VectorIndex asks for."""

    kind = "numpy-brute"

    def __init__(self, dim, **options):
        super().__init__(dim, **options)
        self._ids = np.zeros(0, dtype=np.int64)
        self._vectors = np.zeros((0, self.dim), dtype=np.float32)

    def _add(self, ids, vectors):
        self._ids = np.concatenate([self._ids, ids])
        self._vectors = np.concatenate([self._vectors, vectors])
        self._live.insert(ids)

    def _remove(self, ids):
        keep = ~np.isin(self._ids, ids)
        self._ids, self._vectors = self._ids[keep], self._vectors[keep]
        self._live.discard(ids)

    def _search(self, queries, k):
        _count("index.search")
        scores = queries @ self._vectors.T
        top = top_k_indices(scores, k)
        pad = ((0, 0), (0, k - top.shape[1]))
        return (np.pad(np.take_along_axis(scores, top, axis=1), pad, constant_values=-np.inf),
                np.pad(self._ids[top], pad, constant_values=-1))

    def memory_bytes(self):
        return self._ids.nbytes + self._vectors.nbytes + self._live.nbytes

    def _save_files(self, folder):
        write_npy_atomic(folder / "ids.npy", self._ids)
        write_npy_atomic(folder / "vectors.npy", self._vectors)

    def _load_files(self, folder, mmap):
        _count("index.load")
        mode = "r" if mmap else None
        self._ids = np.load(folder / "ids.npy", mmap_mode=mode, allow_pickle=False)
        self._vectors = np.load(folder / "vectors.npy", mmap_mode=mode, allow_pickle=False)
        self._live = SortedIds.from_arrays(np.asarray(self._ids, dtype=np.int64))


class CountingEmbedder:
    """A runtime: the torch runtime's embedder, counting what it embeds."""

    def __init__(self, model_ref, device=None):
        from mmretrieve.runtime.torch_runtime import TorchEmbedder

        _count("runtime.build")
        self._inner = TorchEmbedder(model_ref, device="cpu" if device is None else device)
        self.runtime = "counting"
        for attribute in ("ref", "path", "fingerprint", "embed_dim", "image_preprocessor", "text_preprocessor"):
            setattr(self, attribute, getattr(self._inner, attribute))

    def embed_pixels(self, pixels):
        _count("runtime.embed_pixels")
        return self._inner.embed_pixels(pixels)

    def embed_texts(self, texts):
        _count("runtime.embed_texts")
        return self._inner.embed_texts(texts)

    def embed_images(self, images):
        return self.embed_pixels(self.image_preprocessor(images)["pixel_values"])


def counting_loss(dist_info=None, scale=1.0):
    """A loss: CLIP's InfoNCE times ``scale`` (a loss option), counting its calls."""
    from mmretrieve.train.losses import InfoNCELoss

    class CountingLoss(InfoNCELoss):
        def forward(self, image_features, text_features, logit_scale):
            _count("loss.forward")
            CALLS["loss.scale"] = scale
            return scale * super().forward(image_features, text_features, logit_scale)

    return CountingLoss(dist_info)


class ThirdPartyKinds:
    @hookimpl
    def register_index_backends(self, register):
        register(IndexBackendSpec(name="numpy-brute", factory="plugin_fixtures:NumpyIndex",
                                  description="brute force in numpy (a test plugin)"))

    @hookimpl
    def register_runtimes(self, register):
        register(RuntimeSpec(name="counting", factory="plugin_fixtures:CountingEmbedder",
                             description="torch, counting calls (a test plugin)"))

    @hookimpl
    def register_losses(self, register):
        register(LossSpec(name="counting-loss", factory="plugin_fixtures:counting_loss",
                          description="InfoNCE, counting calls (a test plugin)"))


THIRD_PARTY = ThirdPartyKinds()


# -- Encoder contracts ----------------------------------------------------------------------------

class SecondTimm:
    """Claims the built-in timm encoder's `timm:` prefix under another name."""

    @hookimpl
    def register_encoders(self, register):
        register(EncoderSpec(name="other-timm", modality="image", factory=_fake_factory, prefixes=("timm:",)))
        register(EncoderSpec(name="prefix-survivor", modality="image", factory=_fake_factory, prefixes=("mine:",)))


def _takes_dim_only(dim=8):
    return dim


class DefaultsTheFactoryRefuses:
    @hookimpl
    def register_encoders(self, register):
        register(EncoderSpec(name="no-size", modality="image", factory=_takes_dim_only, defaults={"size": 3}))
