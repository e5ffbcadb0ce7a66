"""mmretrieve: text-to-image and image-to-text search.

Importing the package is cheap: torch, transformers, timm, faiss and onnxruntime are
imported only by the modules that use them.
"""

__version__ = "0.1.0"

from .hookspecs import hookimpl  # noqa: E402  (plugins import it from here)

__all__ = ["__version__", "hookimpl"]
