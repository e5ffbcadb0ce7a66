"""The hooks: names and "module:attribute" factories only, so listing plugins never imports
torch or open_clip (the factories' modules do, when a model is first built)."""

from mmretrieve import hookimpl
from mmretrieve.specs import EncoderSpec, ModelSpec


@hookimpl
def register_encoders(register):
    register(EncoderSpec(
        name="open-clip-text",
        modality="text",
        factory="mmretrieve_open_clip.towers:OpenClipTextEncoder",
        prefixes=("open-clip-text:",),
        description="an open_clip text tower (pooled, before its projection); open-clip-text:ARCH:TAG",
    ))
    register(EncoderSpec(
        name="open-clip-image",
        modality="image",
        factory="mmretrieve_open_clip.towers:OpenClipImageEncoder",
        prefixes=("open-clip-image:",),
        description="an open_clip image tower (pooled, before its projection); open-clip-image:ARCH:TAG",
    ))


@hookimpl
def register_models(register):
    register(ModelSpec(
        name="open-clip",
        prefixes=("open-clip:",),
        factory="mmretrieve_open_clip.pair:open_clip_model",
        description="any open_clip pair, zero-shot: open-clip:ARCH:TAG, open-clip:ARCH:/path/to/checkpoint, "
                    "open-clip:hf-hub:ORG/REPO, open-clip:local-dir:PATH",
    ))


@hookimpl
def register_commands(cli):
    from mmretrieve_open_clip.commands import add_commands  # click only

    add_commands(cli)
