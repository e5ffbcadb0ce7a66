"""mmretrieve-open-clip: open_clip's pretrained pairs as mmretrieve models and encoders.

Importing this package (or its ``plugin`` module) is cheap; torch and open_clip are imported by
``towers`` and ``pair`` when a model is first built.
"""

__version__ = "0.1.0"
