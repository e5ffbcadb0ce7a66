"""Training throughput on this machine: pairs/s and the share of step time spent waiting for data.

Full fine-tuning of small towers on a generated set of JPEG photos (decoded, resized and
cropped every step, as real training does), with 0, 1 and 2 data-loading workers, and with
frozen towers on cached features for comparison. Prints a Markdown table.

    python benchmarks/train_throughput.py [--images 512] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import WORDS, make_tiny_bert  # noqa: E402

from mmretrieve.config import ModelConfig, TowerConfig, TowerTraining, TrainConfig  # noqa: E402
from mmretrieve.train.loop import run_training  # noqa: E402


def make_photos(folder: Path, count: int, seed: int = 0) -> Path:
    """Smooth random images saved as 640x480 JPEGs: realistic decode and resize cost."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((640, 480), Image.Resampling.BICUBIC).save(folder / f"images/{i}.jpg", quality=90)
        captions = [" ".join(rng.choice(WORDS, 10)) for _ in range(5)]
        lines.append(json.dumps({"image": f"images/{i}.jpg", "captions": captions}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "captions.jsonl"


def measure(data: Path, bert: Path, out: Path, image_model: str, workers: int, steps: int, batch: int,
            frozen: bool) -> dict:
    mode = "frozen" if frozen else "full"
    config = TrainConfig(
        data=str(data), val_size=batch, batch_size=batch, max_steps=steps, eval_every=10_000, warmup_steps=2,
        workers=workers, log_every=5, output=str(out),
        text=TowerTraining(mode), image=TowerTraining(mode),
        model=ModelConfig(text=TowerConfig("bert", {"model_name": str(bert), "max_length": 32}),
                          image=TowerConfig(f"timm:{image_model}", {"pretrained": False}), embed_dim=128),
    )
    started = time.perf_counter()
    run_training(config)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "pairs_per_s" in r][1:]  # the first window includes worker start-up
    return {"pairs_per_s": float(np.mean([r["pairs_per_s"] for r in train])),
            "data_wait": float(np.mean([r["data_wait"] for r in train])), "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-model", default="mobilenetv3_small_100")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_photos(root / "data", args.images)
        bert = make_tiny_bert(root / "bert", hidden=128, layers=4, heads=4)
        rows = []
        # Twice over, interleaved: timings on this machine drift by 2x over minutes.
        for round_, (frozen, workers) in enumerate(((False, 0), (False, 1), (False, 2), (True, 0)) * 2):
            result = measure(data, bert, root / f"run-{round_}", args.image_model, workers, args.steps,
                             args.batch, frozen)
            rows.append((("frozen, cached features" if frozen else "full fine-tuning"), workers, result))
    print(f"\nimage tower timm:{args.image_model} (224 px), text tower 4-layer 128-wide BERT, batch {args.batch}, "
          f"{args.steps} steps\n")
    print("| towers | data workers | pairs/s | waiting for data |")
    print("|---|---|---|---|")
    for label, workers, result in rows:
        print(f"| {label} | {workers} | {result['pairs_per_s']:.1f} | {100 * result['data_wait']:.1f}% |")


if __name__ == "__main__":
    main()
