"""The built-in model prefixes: pretrained transformers pairs as ready-made models.

``--model clip:openai/clip-vit-base-patch32`` (or ``clip:local-dir:PATH``, or a bare ``clip`` for
that default checkpoint) builds the pair's bundle once, in the user's cache (mmretrieve.pairs).
"""

from mmretrieve import hookimpl
from mmretrieve.specs import ModelSpec


@hookimpl
def register_models(register):
    register(ModelSpec(
        name="clip", prefixes=("clip:",), factory="mmretrieve.pairs.hf:clip",
        description="a transformers CLIP checkpoint, zero-shot (clip:HUB_ID or clip:local-dir:PATH; "
                    "bare: openai/clip-vit-base-patch32)",
    ))
    register(ModelSpec(
        name="siglip", prefixes=("siglip:",), factory="mmretrieve.pairs.hf:siglip",
        description="a transformers SigLIP checkpoint, zero-shot (siglip:HUB_ID or siglip:local-dir:PATH; "
                    "bare: google/siglip-base-patch16-224)",
    ))
    register(ModelSpec(
        name="siglip2", prefixes=("siglip2:",), factory="mmretrieve.pairs.hf:siglip2",
        description="a fixed-resolution SigLIP 2 checkpoint, zero-shot (siglip2:HUB_ID; "
                    "bare: google/siglip2-base-patch16-224)",
    ))
    register(ModelSpec(
        name="chinese-clip", prefixes=("chinese-clip:",), factory="mmretrieve.pairs.hf:chinese_clip",
        description="a transformers Chinese-CLIP checkpoint, Chinese queries (chinese-clip:HUB_ID or "
                    "chinese-clip:local-dir:PATH; bare: OFA-Sys/chinese-clip-vit-base-patch16)",
    ))
