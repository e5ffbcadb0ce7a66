"""The export folder's manifest (export.json): reading it needs neither torch nor onnxruntime."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ExportError
from ..formats import read_folder_manifest

FORMAT = "mmretrieve-onnx-export"
FORMAT_VERSION = 1
EXPORT_JSON = "export.json"
PRECISIONS = ("fp32", "fp16", "int8")
# Graph file, input names and output name of each tower; the runtime reads them from the manifest.
TOWER_GRAPHS = {
    "text": {"file": "text.onnx", "inputs": ["input_ids", "attention_mask"], "output": "text_embedding"},
    "image": {"file": "image.onnx", "inputs": ["pixel_values"], "output": "image_embedding"},
}


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
