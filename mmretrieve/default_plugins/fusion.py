"""The built-in fusion strategies."""

from mmretrieve import hookimpl
from mmretrieve.specs import FusionSpec


@hookimpl
def register_fusion_strategies(register):
    register(FusionSpec(name="late", factory="mmretrieve.fusion.strategies:LateFusion",
                        description="weighted sum of per-modality similarities at search time"))
    register(FusionSpec(name="mean", factory="mmretrieve.fusion.strategies:MeanFusion", aliases=("average",),
                        description="normalised weighted average of the text and image embeddings"))
    register(FusionSpec(name="concat-projection", factory="mmretrieve.fusion.strategies:concat_projection",
                        aliases=("concat",), trainable=True,
                        description="learned matrix over [text; image], normalised"))
    register(FusionSpec(name="gated", factory="mmretrieve.fusion.strategies:gated", trainable=True,
                        description="learned per-dimension sigmoid gate between text and image"))
