"""ONNX exports: a model bundle's two towers as onnxruntime graphs, in a self-describing folder.

    export.json          format, source bundle fingerprint, embed_dim, precision, opset, parity
                         and recall figures, file hashes
    text.onnx            input_ids, attention_mask int64 [batch, sequence] -> text_embedding [batch, D]
    image.onnx           pixels uint8 [batch, H, W, 3] -> image_embedding [batch, D]; the graph
                         normalises them (format 1 exports: normalised pixel_values float32
                         [batch, 3, H, W]; the manifest's towers.image.input_dtype says which)
    text/                tokenizer.json, text_preprocess.json
    image/               image_preprocess.json

Each graph holds the tower, its projection head and the L2 normalisation, so a runtime only
preprocesses (mmretrieve.preprocess) and runs it. Reading an export never imports torch; writing
one does (``mmretrieve.export.exporter``).
"""

from ..errors import ExportError, ParityError
from .manifest import EXPORT_JSON, FORMAT, FORMAT_VERSION, ExportInfo, is_export, read_export_info

__all__ = ["EXPORT_JSON", "FORMAT", "FORMAT_VERSION", "ExportError", "ExportInfo", "ParityError", "is_export",
           "read_export_info"]
