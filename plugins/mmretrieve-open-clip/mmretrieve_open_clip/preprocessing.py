"""open_clip's tokenizer and image transform as mmretrieve's torch-free preprocessors.

Images: open_clip's eval transform (``open_clip.transform.image_transform`` with the model's
``preprocess_cfg``) resizes the shorter side to the model's size and centre-crops ("shortest"),
or resizes to the square ("squash"), with bicubic or bilinear resampling, then normalises with
the checkpoint's mean and std. mmretrieve's ``ImagePreprocessor`` does the same with Pillow.

Texts: CLIP-vocabulary models use ``tokenizer.clip_tokenizer``; models whose config names a
Hugging Face tokenizer (``hf_tokenizer_name``: xlm-roberta, SigLIP, ...) use its tokenizer.json,
behind the same text cleaning open_clip applies before calling it.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any

from mmretrieve.errors import InputError
from mmretrieve.preprocess import ImagePreprocessConfig, TextPreprocessConfig, TextPreprocessor

from .tokenizer import HTML_ENTITIES, clip_tokenizer

DEFAULT_CONTEXT_LENGTH = 77
# open_clip's PreprocessCfg defaults (OpenAI CLIP's normalisation), for configs that omit a field.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _square_size(size: Any) -> int:
    if isinstance(size, (list, tuple)):
        if len(set(size[-2:])) != 1:
            raise InputError(f"open_clip models with a non-square input ({tuple(size)}) are not supported: "
                             f"mmretrieve's image preprocessing makes square crops")
        size = size[-1]
    return int(size)


def image_config(preprocess_cfg: dict[str, Any]) -> ImagePreprocessConfig:
    """open_clip's ``preprocess_cfg`` (size, mean, std, interpolation, resize_mode) as mmretrieve's
    ``ImagePreprocessConfig``."""
    size = _square_size(preprocess_cfg.get("size", 224))
    interpolation = preprocess_cfg.get("interpolation") or "bicubic"
    # open_clip resamples with bilinear only when asked, bicubic otherwise ("random" is for training).
    interpolation = "bilinear" if interpolation == "bilinear" else "bicubic"
    mean = preprocess_cfg.get("mean") or OPENAI_MEAN
    std = preprocess_cfg.get("std") or OPENAI_STD
    mean = tuple(float(m) for m in (mean if isinstance(mean, (list, tuple)) else (mean,) * 3))
    std = tuple(float(s) for s in (std if isinstance(std, (list, tuple)) else (std,) * 3))
    mode = preprocess_cfg.get("resize_mode") or "shortest"
    config = ImagePreprocessConfig(size=size, crop_pct=1.0, interpolation=interpolation, mean=mean, std=std)
    if mode == "shortest":  # resize the shorter side to `size` (crop_pct 1), centre-crop
        return config
    if mode == "squash":  # the whole image resized to the square (SigLIP)
        return dataclasses.replace(config, resize="squash")
    raise InputError(f"open_clip's {mode!r} image resizing (letterboxing) is not supported by mmretrieve's image "
                     f"preprocessing; choose a model that resizes the shortest side or squashes")


def text_context_length(model_cfg: dict[str, Any]) -> int:
    return int(model_cfg.get("text_cfg", {}).get("context_length") or DEFAULT_CONTEXT_LENGTH)


def _clean_normalizer(clean: str):
    """open_clip's text cleaning before an HF tokenizer (``get_clean_fn``): ftfy's fixes for
    ordinary text, HTML unescaping, whitespace; "lower" lower-cases, "canonicalize" also drops
    punctuation and underscores."""
    from tokenizers import Regex, normalizers

    from .tokenizer import _ftfy_steps

    steps = _ftfy_steps()
    for _ in range(2):
        steps += [normalizers.Replace(entity, text) for entity, text in HTML_ENTITIES]
    if clean == "canonicalize":
        steps += [normalizers.Replace("_", " "),
                  normalizers.Replace(Regex("[" + "".join("\\" + c for c in string.punctuation) + "]"), "")]
    steps += [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    if clean in ("lower", "canonicalize"):
        steps.append(normalizers.Lowercase())
    return steps


def hf_text_tokenizer(name: str, tokenizer_kwargs: dict[str, Any] | None = None):
    """The ``tokenizers.Tokenizer`` behind open_clip's ``HFTokenizer(name, **tokenizer_kwargs)``."""
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    kwargs = dict(tokenizer_kwargs or {})
    clean = kwargs.pop("clean", "whitespace")
    unsupported = {k: v for k, v in kwargs.items() if k in ("strip_sep_token", "tokenizer_mode") and v}
    if unsupported or clean not in ("whitespace", "lower", "canonicalize"):
        raise InputError(f"open_clip tokenizer options {unsupported or {'clean': clean}} are not supported by "
                         f"mmretrieve's open-clip plugin")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as exc:
        raise InputError(f"cannot load the tokenizer {name!r}: {str(exc).splitlines()[0]} (offline? point the "
                         f"model's hf_tokenizer_name at a local folder, or set HF_HUB_OFFLINE=1 with a filled cache)"
                         ) from None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise InputError(f"the tokenizer {name!r} has no fast (tokenizers) version, which mmretrieve needs")
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(backend.to_str())  # a copy: the normalizer below is ours
    own = [backend.normalizer] if backend.normalizer is not None else []
    backend.normalizer = normalizers.Sequence(_clean_normalizer(clean) + own)
    return backend


def text_preprocessor(model_cfg: dict[str, Any], tokenizer_source: str | None = None) -> TextPreprocessor:
    """The TextPreprocessor that tokenizes as ``open_clip.get_tokenizer`` does for this config;
    ``tokenizer_source``: where an HF tokenizer is read instead of ``hf_tokenizer_name`` (open_clip
    reads a ``local-dir:`` model's tokenizer from its folder)."""
    text_cfg = model_cfg.get("text_cfg", {})
    length = text_context_length(model_cfg)
    name = text_cfg.get("hf_tokenizer_name")
    tokenizer = hf_text_tokenizer(tokenizer_source or name, text_cfg.get("tokenizer_kwargs")) if name \
        else clip_tokenizer()
    if not name and text_cfg.get("tokenizer_kwargs"):
        raise InputError(f"open_clip tokenizer options {text_cfg['tokenizer_kwargs']} are not supported by "
                         f"mmretrieve's open-clip plugin")
    return TextPreprocessor(tokenizer, TextPreprocessConfig(max_length=length))
