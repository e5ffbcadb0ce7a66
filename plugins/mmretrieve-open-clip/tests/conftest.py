"""Fixtures: the tiny pairs of tiny_open_clip, photos, and a pair cache of the session's own."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny_open_clip import TINY_CONFIG, save_open_clip_folder, save_tiny_xlm_roberta


@pytest.fixture(autouse=True)
def pair_cache(tmp_path_factory, monkeypatch):
    """Pair bundles are cached in one folder for the session, never in the user's cache."""
    root = tmp_path_factory.getbasetemp() / "open-clip-cache"
    monkeypatch.setenv("MMRETRIEVE_CACHE", str(root))
    return root


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return save_open_clip_folder(tmp_path_factory.mktemp("tiny-open-clip"), TINY_CONFIG)


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    """Four scikit-image photos of different sizes and aspect ratios."""
    import skimage.data
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="session")
def multilingual_dir(tmp_path_factory) -> Path:
    """An open_clip pair with an xlm-roberta text tower (mean pooling, linear projection), saved as
    open_clip saves such a pair: config, weights and the HF tokenizer's files in one folder."""
    import shutil

    hf = save_tiny_xlm_roberta(tmp_path_factory.mktemp("tiny-xlm-roberta"))
    config = {"embed_dim": 32, "vision_cfg": TINY_CONFIG["vision_cfg"],
              "text_cfg": {"hf_model_name": str(hf), "hf_tokenizer_name": str(hf), "hf_pooler_type": "mean_pooler",
                           "hf_proj_type": "linear"}}
    folder = save_open_clip_folder(tmp_path_factory.mktemp("tiny-open-clip-xlmr"), config)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf / name, folder / name)
    return folder
