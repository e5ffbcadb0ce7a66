"""The loss and validation-recall curves of a run, as a PNG beside its metrics."""

from __future__ import annotations

import json
from pathlib import Path


def plot_curves(metrics_file: Path, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    from ..atomic import write_bytes_atomic

    if not Path(metrics_file).is_file():
        return None
    records = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val" in r]
    figure, (loss_ax, recall_ax) = plt.subplots(1, 2, figsize=(11, 4))
    loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue")
    loss_ax.set(title="training loss", xlabel="step", ylabel="loss")
    for direction, style in (("t2i", "-"), ("i2t", "--")):
        for k, color in (("R@1", "tab:red"), ("R@5", "tab:green"), ("R@10", "tab:purple")):
            recall_ax.plot([r["step"] for r in val], [r["val"][direction][k] for r in val], style, color=color,
                           marker="o", label=f"{direction} {k}")
    recall_ax.set(title="validation recall (%)", xlabel="step", ylabel="recall")
    recall_ax.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    write_bytes_atomic(out, buffer.getvalue())
    return out
