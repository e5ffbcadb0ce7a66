from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import TINY_TIMM, make_colour_dataset, make_tiny_bert  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_plugin_host(monkeypatch):
    """Each test sees plugins loaded from scratch, with no plugin environment leaking in."""
    from mmretrieve import plugins

    for name in (plugins.ENV_LOAD, plugins.ENV_BLOCK, plugins.ENV_STRICT):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(plugins.ENV_CACHE, "0")  # tests fake entry points; test_plugins tests the cache itself
    plugins.reset_host()
    yield
    plugins.reset_host()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory) -> dict[str, Path]:
    """Tiny random CLIP, SigLIP and Chinese-CLIP checkpoints (tests/tiny_pairs.py), written once per
    session; their cached bundles go to a session folder ($MMRETRIEVE_CACHE), not the user's cache."""
    from tiny_pairs import BUILDERS

    patch = pytest.MonkeyPatch()
    patch.setenv("MMRETRIEVE_CACHE", str(tmp_path_factory.mktemp("mmretrieve-cache")))
    root = tmp_path_factory.mktemp("tiny-pairs")
    yield {name: build(root / name) for name, build in BUILDERS.items()}
    patch.undo()


@pytest.fixture(scope="session")
def tiny_model_config(tiny_bert_dir):
    from mmretrieve.config import ModelConfig, TowerConfig

    return ModelConfig(
        text=TowerConfig("bert", {"model_name": str(tiny_bert_dir), "max_length": 32}),
        image=TowerConfig(f"timm:{TINY_TIMM}", {"pretrained": False, "image_size": 64}),
        embed_dim=16,
    )


@pytest.fixture
def tiny_model(tiny_model_config):
    import torch

    from mmretrieve.model import build_model

    torch.manual_seed(0)
    return build_model(tiny_model_config)


@pytest.fixture
def bundle(tiny_model, tmp_path):
    """The tiny model saved as a bundle (modules may define their own ``bundle``)."""
    from mmretrieve.bundle import save_bundle

    return save_bundle(tiny_model, tmp_path / "bundle").path


@pytest.fixture
def embedder(bundle):
    """The torch runtime over ``bundle``."""
    from mmretrieve.runtime.torch_runtime import TorchEmbedder

    return TorchEmbedder(str(bundle), device="cpu")


def random_image(seed: int, size=(80, 60)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture
def messy_image_folder(tmp_path) -> Path:
    """Good images in nested folders and with non-ASCII names, next to every kind of bad file."""
    root = tmp_path / "photos"
    (root / "holiday" / "day 2").mkdir(parents=True)
    random_image(1).save(root / "a.jpg")
    random_image(2).save(root / "holiday" / "b.png")
    random_image(3).save(root / "holiday" / "day 2" / "café ☕.webp")
    random_image(4, (40, 90)).save(root / "holiday" / "tall.bmp")
    (root / "zero.jpg").write_bytes(b"")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    full = root / "full.jpg"
    random_image(5, (200, 200)).save(full, quality=95)
    data = full.read_bytes()
    full.unlink()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.jpg").write_bytes(b"")
    return root


GOOD_IMAGES = {"a.jpg", "b.png", "café ☕.webp", "tall.bmp"}
BAD_IMAGES = {"zero.jpg", "corrupt.png", "truncated.jpg"}


@pytest.fixture
def run():
    """The CLI in this process: run("index", folder, ...) -> click's Result (exceptions propagate)."""
    from click.testing import CliRunner

    from mmretrieve.cli import cli

    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)

    return invoke


# -- training runs on a tiny model (tests/test_train*.py) --------------------------------------------

@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    return make_colour_dataset(tmp_path_factory.mktemp("colours"), per_colour=6)


@pytest.fixture
def make_config(tiny_bert_dir, colour_data, tmp_path):
    """``make(**overrides)``: a TrainConfig for a two-epoch run of a tiny model on ``colour_data``."""
    from mmretrieve.config import ModelConfig, TowerConfig, TrainConfig

    def make(**overrides) -> TrainConfig:
        model = ModelConfig(
            text=TowerConfig("bert", {"model_name": str(tiny_bert_dir), "max_length": 16}),
            image=TowerConfig(f"timm:{TINY_TIMM}", {"pretrained": False, "image_size": 48}),
            embed_dim=16,
        )
        settings = dict(data=str(colour_data), model=model, val_size=14, batch_size=7, epochs=2, warmup_steps=2,
                        workers=0, head_lr=0.01, output=str(tmp_path / "run"), log_every=1)
        settings.update(overrides)
        return TrainConfig(**settings)
    return make
