"""Plugins used by the tests: importable modules, as an entry point would load them."""

from __future__ import annotations

import click

from mmretrieve import hookimpl
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
