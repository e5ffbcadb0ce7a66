"""Tiny open_clip pairs built from configs with random weights (no hub), saved as open_clip saves
them: a folder with open_clip_config.json and open_clip_model.safetensors. (Not named conftest:
the repository's tests/conftest.py is imported under that name in the same session.)"""

from __future__ import annotations

import json
from pathlib import Path

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


MULTILINGUAL = ["a dog runs on the beach", "un chien court sur la plage", "ein Hund läuft am Strand",
                "一只狗在海滩上奔跑", "два кота спят на диване", "deux chats dorment sur le canapé",
                "zwei Katzen schlafen auf dem Sofa", "两只猫在沙发上睡觉"]


def save_tiny_xlm_roberta(folder: Path) -> Path:
    """A 2-layer XLM-RoBERTa config and a Unigram tokenizer trained on a few sentences in five
    languages (special tokens where XLM-R has them: <s>=0, <pad>=1, </s>=2), saved as
    transformers saves them."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, XLMRobertaConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.train_from_iterator(MULTILINGUAL * 5, trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], unk_token="<unk>"))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                             special_tokens=[("<s>", 0), ("</s>", 2)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>", mask_token="<mask>", cls_token="<s>", sep_token="</s>"
                            ).save_pretrained(folder)
    XLMRobertaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=80, pad_token_id=1, bos_token_id=0,
                     eos_token_id=2).save_pretrained(folder)
    return folder


def variant_config(kind: str, hf_tokenizer_dir: Path | None = None) -> tuple[dict, dict]:
    """(model_cfg, preprocess_cfg) of tiny pairs built the way two other open_clip families are.

    "siglip": a timm ViT trunk whose linear head projects (split off), a bidirectional text tower
    pooling its *last* position (padding included) through a projection with a bias (kept in the
    tower), an HF tokenizer behind open_clip's "canonicalize" cleaning, a logit bias, squashed
    images. "mobileclip": a timm CNN whose classifier is the projection (kept in the tower), a
    bidirectional CLIP text tower pooling at the end token (the 77-token padding matters).
    """
    if kind == "siglip":
        vocab = json.loads((Path(hf_tokenizer_dir) / "config.json").read_text())["vocab_size"]
        return ({"embed_dim": 32, "init_logit_bias": -10, "custom_text": True,
                 "vision_cfg": {"image_size": 32, "timm_model_name": "test_vit", "timm_model_pretrained": False,
                                "timm_pool": "", "timm_proj": "linear"},
                 "text_cfg": {"context_length": 16, "vocab_size": vocab, "hf_tokenizer_name": str(hf_tokenizer_dir),
                              "tokenizer_kwargs": {"clean": "canonicalize"}, "width": 64, "heads": 2, "layers": 2,
                              "no_causal_mask": True, "proj_bias": True, "pool_type": "last",
                              "norm_kwargs": {"eps": 1e-6}}},
                {"resize_mode": "squash", "mean": [0.5] * 3, "std": [0.5] * 3})
    if kind == "mobileclip":
        return ({"embed_dim": 32, "custom_text": True,
                 "vision_cfg": {"timm_model_name": "test_efficientnet", "timm_model_pretrained": False,
                                "timm_pool": "avg", "timm_proj": None, "image_size": 32},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1,
                              "no_causal_mask": True}},
                {"mean": [0.0] * 3, "std": [1.0] * 3})
    raise ValueError(kind)
