"""The built-in `bert` and `timm` encoders, and the two towers of a pretrained transformers pair."""

from mmretrieve import hookimpl
from mmretrieve.specs import EncoderSpec


@hookimpl
def register_encoders(register):
    register(EncoderSpec(
        name="bert",
        modality="text",
        factory="mmretrieve.encoders.bert:BertEncoder",
        description="any BERT-family checkpoint via transformers (hub id or local folder), CLS or mean pooling",
        defaults={"model_name": "bert-base-uncased", "pooling": "mean", "max_length": 77},
        prefixes=("hf-hub:", "local-dir:"),
    ))
    register(EncoderSpec(
        name="timm",
        modality="image",
        factory="mmretrieve.encoders.timm_image:TimmEncoder",
        description="any timm architecture; preprocessing from the model's data config",
        defaults={"model_name": "resnet50", "pretrained": True},
        prefixes=("timm:",),
    ))
    register(EncoderSpec(
        name="hf-pair-text",
        modality="text",
        factory="mmretrieve.pairs.hf:PairTextEncoder",
        description="the text tower of a transformers CLIP, SigLIP or Chinese-CLIP checkpoint (pooled, before "
                    "its projection)",
        defaults={"checkpoint": "openai/clip-vit-base-patch32"},
    ))
    register(EncoderSpec(
        name="hf-pair-image",
        modality="image",
        factory="mmretrieve.pairs.hf:PairImageEncoder",
        description="the image tower of a transformers CLIP, SigLIP or Chinese-CLIP checkpoint (pooled, before "
                    "its projection)",
        defaults={"checkpoint": "openai/clip-vit-base-patch32"},
    ))
