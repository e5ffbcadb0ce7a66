"""Judging a reduced-precision export by what users see: retrieval recall on a captioned set."""

from __future__ import annotations

from pathlib import Path

from ..errors import ExportError

MAX_RECALL_DROP = 1.0  # points of each gated Recall@K, in either direction, against the fp32 export
# Every R@K is gated: an int8 export of `default` passed on R@5 and lost 2.2 points of i2t R@10.
GATED_METRICS = ("R@1", "R@5", "R@10")
GATED = "R@5"  # the one `info` shows as a line of figures; the gate checks all of GATED_METRICS
DIRECTIONS = ("t2i", "i2t")


def onnx_embedder(folder: Path):
    """The export in ``folder`` as the registered onnx runtime runs it, on CPU. Found through the
    runtime registry: export sits below the runtimes (STYLE.md) and never imports them."""
    from ..plugins import get_host

    return get_host().registry("runtime").get("onnx").build(model_ref=str(folder), device="cpu")


def recall_report(folder: Path, items, progress: bool = False) -> dict[str, dict[str, float]]:
    """Recall@1/5/10 both ways (CLIP_benchmark protocol) of the export in ``folder``, on CPU."""
    from ..evaluate import evaluate_embedder

    return evaluate_embedder(onnx_embedder(folder), items, progress=progress)


def recall_drops(fp32: dict, reduced: dict) -> dict[str, dict[str, float]]:
    """Points lost from fp32 to the reduced export: {direction: {metric: drop}} (negative: a gain)."""
    return {d: {metric: fp32[d][metric] - reduced[d][metric] for metric in GATED_METRICS} for d in DIRECTIONS}


def worst_drop(fp32: dict, reduced: dict) -> tuple[str, str, float]:
    """(direction, metric, points) of the largest loss; on a tie the first of t2i/i2t, then R@1/5/10."""
    drops = recall_drops(fp32, reduced)
    return max(((d, metric, drops[d][metric]) for d in DIRECTIONS for metric in GATED_METRICS),
               key=lambda row: row[2])


def require_recall(fp32: dict, reduced: dict, precision: str, force: bool) -> None:
    direction, metric, drop = worst_drop(fp32, reduced)
    if drop > MAX_RECALL_DROP and not force:
        raise ExportError(
            f"the {precision} export loses {drop:.2f} points of {direction} {metric} "
            f"({fp32[direction][metric]:.2f} -> {reduced[direction][metric]:.2f}; at most {MAX_RECALL_DROP} allowed "
            f"on each of {', '.join(GATED_METRICS)}), so it was not written; export fp32, or pass --force to keep "
            f"it anyway"
        )
