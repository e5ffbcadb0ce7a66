"""Judging a reduced-precision export by what users see: retrieval recall on a captioned set."""

from __future__ import annotations

from pathlib import Path

from ..errors import ExportError

MAX_RECALL_DROP = 1.0  # points of Recall@5, in either direction, against the fp32 export
GATED = "R@5"


def onnx_embedder(folder: Path):
    """The export in ``folder`` as the registered onnx runtime runs it, on CPU. Found through the
    runtime registry: export sits below the runtimes (STYLE.md) and never imports them."""
    from ..plugins import get_host

    return get_host().registry("runtime").get("onnx").build(model_ref=str(folder), device="cpu")


def recall_report(folder: Path, items, progress: bool = False) -> dict[str, dict[str, float]]:
    """Recall@1/5/10 both ways (CLIP_benchmark protocol) of the export in ``folder``, on CPU."""
    from ..evaluate import evaluate_embedder

    return evaluate_embedder(onnx_embedder(folder), items, progress=progress)


def require_recall(fp32: dict, reduced: dict, precision: str, force: bool) -> None:
    drops = {direction: fp32[direction][GATED] - reduced[direction][GATED] for direction in ("t2i", "i2t")}
    worst = max(drops, key=drops.get)
    if drops[worst] > MAX_RECALL_DROP and not force:
        raise ExportError(
            f"the {precision} export loses {drops[worst]:.2f} points of {worst} {GATED} "
            f"({fp32[worst][GATED]:.2f} -> {reduced[worst][GATED]:.2f}; at most {MAX_RECALL_DROP} allowed), "
            f"so it was not written; export fp32, or pass --force to keep it anyway"
        )
