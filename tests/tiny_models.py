"""Tiny transformers and timm models built from configs with random weights: no downloads."""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "a an the of on in with and is are at to two three dog dogs cat cats black white brown red blue green "
    "yellow man woman boy girl child children people person running runs sitting sits jumping jumps playing "
    "beach grass water snow street park field ball keyboard table sofa car bike bicycle shirt dress hat "
    "small big little young old near over under through front its their his her picture photo image"
).split()


def make_tiny_bert(folder: Path, hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0) -> Path:
    """A 2-layer BERT with a word-level vocabulary, saved like a hub checkpoint; ``seed`` fixes its
    random weights, so tests see the same model whatever order they run in."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    ids = {token: i for i, token in enumerate(vocab)}
    tokenizer = Tokenizer(models.WordPiece(vocab=ids, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=hidden * 2, max_position_embeddings=64)
    import torch

    with torch.random.fork_rng():  # the same weights whichever test creates it first
        torch.manual_seed(seed)
        BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


# timm ships small test architectures; test_efficientnet has 0.1M parameters.
TINY_TIMM = "test_efficientnet"


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 40),
           "black": (15, 15, 15), "white": (240, 240, 240), "brown": (120, 70, 20)}
THINGS = ("dog", "cat", "car", "ball", "bike", "hat")


def make_colour_dataset(folder: Path, per_colour: int = 6, size: int = 48, seed: int = 0) -> Path:
    """Images that are mostly one colour, captioned with that colour: learnable in a few steps.

    Returns a captions.jsonl in the format of the shared Flickr8k data.
    """
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for colour, rgb in COLOURS.items():
        for i in range(per_colour):
            noise = rng.integers(-25, 26, (size, size, 3))
            pixels = np.clip(np.array(rgb)[None, None, :] + noise, 0, 255).astype(np.uint8)
            name = f"images/{colour}_{i}.png"
            Image.fromarray(pixels).save(folder / name)
            things = rng.choice(THINGS, size=3, replace=False)
            captions = [f"a {colour} {thing}" for thing in things]
            lines.append(json.dumps({"image": name, "captions": captions}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "captions.jsonl"


def tiny_train_config(bert_dir, embed_dim: int = 16, image_size: int = 48, **settings) -> dict:
    """A `train --config` file's settings over the tiny BERT and timm towers, plus ``settings``."""
    return {**settings, "model": {
        "embed_dim": embed_dim,
        "text": {"encoder": "bert", "options": {"model_name": str(bert_dir), "max_length": 16}},
        "image": {"encoder": f"timm:{TINY_TIMM}", "options": {"pretrained": False, "image_size": image_size}}}}


def model_state(folder):
    """The model weights of a training run's checkpoint (``folder/checkpoint``)."""
    from mmretrieve.train import checkpoint

    return checkpoint.load_checkpoint(folder / "checkpoint")["model"]
