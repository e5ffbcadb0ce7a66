"""The export folder's manifest (export.json): reading it needs neither torch nor onnxruntime."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..formats import check_format
from ..errors import ExportError

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


def read_export_info(ref: str | Path) -> ExportInfo:
    from ..atomic import recover_directory

    folder = Path(ref)
    recover_directory(folder)
    path = folder / EXPORT_JSON
    if not path.is_file():
        raise ExportError(f"{folder} is not an ONNX export (no {EXPORT_JSON}); create one with "
                          f"`mmretrieve export --model MODEL --out {folder}`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{folder}: unreadable {EXPORT_JSON} ({exc})") from None
    check_format(manifest, folder, FORMAT, FORMAT_VERSION, "ONNX export", ExportError)
    return ExportInfo(folder, manifest)
