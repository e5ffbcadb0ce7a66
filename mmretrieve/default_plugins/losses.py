"""The built-in contrastive losses."""

from mmretrieve import hookimpl
from mmretrieve.specs import LossSpec


@hookimpl
def register_losses(register):
    register(LossSpec(name="infonce", factory="mmretrieve.train.losses:InfoNCELoss", aliases=("clip",),
                      description="CLIP's symmetric InfoNCE (softmax cross-entropy both ways)"))
    register(LossSpec(name="siglip", factory="mmretrieve.train.losses:SigLIPLoss", aliases=("sigmoid",),
                      description="SigLIP's pairwise sigmoid loss with a learnable bias"))
