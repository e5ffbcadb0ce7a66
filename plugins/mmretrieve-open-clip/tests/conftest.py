"""Tiny open_clip pairs built from configs with random weights (no hub), saved as open_clip saves
them: a folder with open_clip_config.json and open_clip_model.safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# A ViT pair small enough to build in a fraction of a second; the text tower keeps CLIP's
# 49408-token vocabulary and 77-token context, so open_clip's own tokenizer applies.
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def save_open_clip_folder(folder: Path, model_cfg: dict, preprocess_cfg: dict | None = None, seed: int = 0) -> Path:
    """open_clip's random-initialised model of ``model_cfg``, saved for ``local-dir:`` loading."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg,
                                                               "preprocess_cfg": preprocess_cfg or {}}))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = open_clip.create_model(f"local-dir:{folder}", pretrained_text=False)
        with torch.no_grad():  # a temperature that is not open_clip's default, so the test sees it is read
            model.logit_scale.fill_(3.0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


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
