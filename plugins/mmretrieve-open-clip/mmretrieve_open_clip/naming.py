"""How an open_clip model is named after ``open-clip:`` (imports nothing heavy).

    open-clip:ARCH:TAG                 a pretrained tag of a built-in architecture
                                       (open-clip:ViT-B-32:laion2b_s34b_b79k; `mmretrieve open-clip-models`)
    open-clip:ARCH:/path/to/ckpt.pt    a local checkpoint file for a built-in architecture
                                       (.pt/.pth/.bin/.safetensors; open_clip or OpenAI format)
    open-clip:hf-hub:ORG/REPO          a Hub repository with open_clip_config.json and weights
    open-clip:local-dir:PATH           a local folder with open_clip_config.json and weights
                                       (what open_clip's push_to_hf_hub writes), fully offline

The architecture name is everything before the first ``:``; open_clip's names contain none.
"""

from __future__ import annotations

from pathlib import Path

HF_HUB = "hf-hub:"
LOCAL_DIR = "local-dir:"
SYNTAX = "open-clip:ARCH:TAG, open-clip:ARCH:/path/to/checkpoint, open-clip:hf-hub:ORG/REPO or open-clip:local-dir:PATH"


def split_model_name(name: str) -> tuple[str, str | None]:
    """``"ViT-B-32:laion2b_s34b_b79k"`` -> ``("ViT-B-32", "laion2b_s34b_b79k")``; a schema name
    (``hf-hub:``, ``local-dir:``) or a bare architecture -> ``(name, None)``. A checkpoint path
    is made absolute (``~`` expanded), so the name means the same file from any folder."""
    name = str(name).strip()
    if name.startswith((HF_HUB, LOCAL_DIR)):
        if name.startswith(LOCAL_DIR):
            return LOCAL_DIR + str(Path(name[len(LOCAL_DIR):]).expanduser().resolve()), None
        return name, None
    arch, sep, weights = name.partition(":")
    if not sep or not weights:
        return arch, None
    if "/" in weights or "\\" in weights or weights.startswith("~") or Path(weights).suffix in (
            ".pt", ".pth", ".bin", ".safetensors", ".npz"):
        weights = str(Path(weights).expanduser().resolve())
    return arch, weights


def join_model_name(model_name: str, weights: str | None) -> str:
    return f"{model_name}:{weights}" if weights else model_name
