"""The export folder's manifest (export.json): reading it needs neither torch nor onnxruntime."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ExportError
from ..formats import read_folder_manifest

FORMAT = "mmretrieve-onnx-export"
# 2: the image graph takes uint8 pixels (input_dtype "uint8", layout NHWC) and normalises them
# itself; format 1's took normalised float32 NCHW pixel_values (still read: FLOAT_IMAGE_GRAPH).
FORMAT_VERSION = 2
EXPORT_JSON = "export.json"
PRECISIONS = ("fp32", "fp16", "int8")
# Graph file, input names and output name of each tower (and the image input's dtype and layout);
# the runtime reads them from the manifest.
TOWER_GRAPHS = {
    "text": {"file": "text.onnx", "inputs": ["input_ids", "attention_mask"], "output": "text_embedding"},
    "image": {"file": "image.onnx", "inputs": ["pixels"], "output": "image_embedding", "input_dtype": "uint8",
              "input_layout": "NHWC"},
}
# The image graph of format-1 exports: normalised float32 (n, 3, h, w) pixel_values.
FLOAT_IMAGE_GRAPH = {"file": "image.onnx", "inputs": ["pixel_values"], "output": "image_embedding"}


def input_dtype(graph: dict[str, Any]) -> str:
    """What a tower's graph (a manifest's ``towers`` entry) takes as pixels: "uint8" or "float32"."""
    return str(graph.get("input_dtype", "float32"))


@dataclass
class ExportInfo:
    path: Path
    manifest: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        """The source bundle's: an index built with either can be searched with the other."""
        return self.manifest["fingerprint"]

    @property
    def embed_dim(self) -> int:
        return int(self.manifest["embed_dim"])

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    def graph(self, tower: str) -> dict[str, Any]:
        return self.manifest["towers"][tower]


def is_export(ref: str | Path) -> bool:
    from ..atomic import recover_directory

    recover_directory(ref)  # an export killed between its renames leaves the folder aside
    return (Path(ref) / EXPORT_JSON).is_file()


def read_export_info(ref: str | Path, verify: bool = False) -> ExportInfo:
    """The export's manifest, checked; ``verify`` re-hashes every file it lists."""
    folder = Path(ref)
    manifest = read_folder_manifest(
        folder, EXPORT_JSON, FORMAT, FORMAT_VERSION, "ONNX export", ExportError, recover=True, verify=verify,
        missing=f"{folder} is not an ONNX export (no {EXPORT_JSON}); create one with "
                f"`mmretrieve export --model MODEL --out {folder}`",
        damaged=lambda problem: ExportError(f"{folder}: {problem}; export the model again with "
                                            f"`mmretrieve export --model MODEL --out {folder}`"))
    return ExportInfo(folder, manifest)
