"""Tiny random pretrained pairs, written with ``save_pretrained`` as a hub checkpoint would be.

Each builder writes a folder that ``--model clip:local-dir:FOLDER`` (or ``--model FOLDER``) loads:
config.json + model.safetensors (2 layers, widths 32-48, 32 px images), the processor's
preprocessor_config.json, and a tokenizer trained here on a few sentences (BPE for CLIP,
SentencePiece for SigLIP, WordPiece with Chinese characters for Chinese-CLIP). Seeded: the same
call writes the same weights.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

SENTENCES = [
    "a dog runs on the grass", "a black cat sleeps on a red sofa", "two children play football in the park",
    "a man rides a bicycle down the street", "a woman with a blue umbrella in the rain",
    "a boat on a calm lake at sunset", "an old red car parked near the beach", "people walk across the bridge",
    "a bird sits on a branch", "green trees and a white house", "the coffee is hot", "astronaut on the moon",
]
CHINESE = ["一只狗在草地上跑", "红色的汽车", "猫在沙发上睡觉", "湖上的小船", "孩子们在公园里踢足球", "天空和白云"]
TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
VISION = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)


def _randomise_scale(model, scale: float, bias: float | None = None) -> None:
    import torch

    with torch.no_grad():
        model.logit_scale.fill_(scale)
        if bias is not None:
            model.logit_bias.fill_(bias)


def _clip_bpe():
    """(vocab, merges) of a byte-level BPE with CLIP's pre-tokenisation, trained on SENTENCES; every
    byte symbol also at a word end, so no text meets the unknown token (which is CLIP's EOS)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tokenizer = Tokenizer(BPE(end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                                 normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer.train_from_iterator(SENTENCES, BpeTrainer(vocab_size=400, special_tokens=["<|startoftext|>",
                                                                                         "<|endoftext|>"],
                                                        initial_alphabet=alphabet, end_of_word_suffix="</w>",
                                                        show_progress=False))
    model = json.loads(tokenizer.to_str())["model"]
    vocab = dict(model["vocab"])
    for symbol in sorted(alphabet):
        for token in (symbol, symbol + "</w>"):
            vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return vocab, merges


def tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = Path(folder)
    vocab, merges = _clip_bpe()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    config = CLIPConfig(text_config=dict(TEXT, vocab_size=len(vocab), max_position_embeddings=77,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id),
                        vision_config=VISION, projection_dim=24)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    _randomise_scale(model, 3.1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _sentencepiece_model() -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([s.replace("'", "") for s in SENTENCES] * 4),
                                   model_writer=model, vocab_size=64, model_type="unigram", hard_vocab_limit=False, pad_id=0, eos_id=1,
                                   unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=3)
    return model.getvalue()


def tiny_siglip(folder: str | Path, seed: int = 0) -> Path:
    import tempfile

    import torch
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipTokenizer

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spiece.model").write_bytes(_sentencepiece_model())
        tokenizer = SiglipTokenizer(vocab_file=str(Path(tmp) / "spiece.model"), model_max_length=64)
        tokenizer.save_pretrained(folder)
    config = SiglipConfig(text_config=dict(TEXT, vocab_size=len(tokenizer), max_position_embeddings=64, projection_size=32,
                                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id),
                          vision_config=dict(VISION, hidden_size=32))
    torch.manual_seed(seed)
    model = SiglipModel(config).eval()
    _randomise_scale(model, 2.3, -4.0)
    model.save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def tiny_chinese_clip(folder: str | Path, seed: int = 0) -> Path:
    import torch
    from transformers import BertTokenizer, ChineseCLIPConfig, ChineseCLIPImageProcessor, ChineseCLIPModel

    folder = Path(folder)
    words = sorted({w for s in SENTENCES for w in s.split()})
    chars = sorted({c for s in CHINESE for c in s})
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *words, *letters, *(f"##{c}" for c in letters)]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    tokenizer = BertTokenizer(vocab=vocab, model_max_length=52)
    config = ChineseCLIPConfig(text_config=dict(TEXT, vocab_size=len(vocab), max_position_embeddings=64,
                                                type_vocab_size=2, pad_token_id=0),
                               vision_config=VISION, projection_dim=24)
    torch.manual_seed(seed)
    model = ChineseCLIPModel(config).eval()
    _randomise_scale(model, 2.9)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ChineseCLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


BUILDERS = {"clip": tiny_clip, "siglip": tiny_siglip, "chinese-clip": tiny_chinese_clip}
