"""Training step of the BERT text tower: one padded batch against length-sorted runs (issue 16).

``TextTower`` splits a training batch into runs of ``TRAINING_RUN`` captions sorted by length, each
cut to its longest caption (mmretrieve/encoders/bert.py). This times a forward and backward pass
of MiniLM with its last ``--top`` layers trainable (what ``text.mode = "top:N"`` trains) on random
batches of real captions, both ways, alternating which goes first per batch, and prints each
pair's times and the median ratio of the pairs (padded / runs), with the load average.

    python benchmarks/text_training_runs.py [--data ../shared/data/flickr8k-train/captions.jsonl]
        [--batches 12] [--batch-size 128] [--top 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared/data/flickr8k-train/captions.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DATA), help="captions JSONL")
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--top", type=int, default=2, help="trainable top layers")
    args = parser.parse_args()

    import torch

    from mmretrieve.encoders import create_encoder
    from mmretrieve.encoders.bert import TRAINING_RUN

    encoder = create_encoder("minilm-l6")
    tower = encoder.module.train()
    layers = tower.model.config.num_hidden_layers
    trainable = tuple(f".layer.{i}." for i in range(layers - args.top, layers))
    for name, parameter in tower.named_parameters():
        parameter.requires_grad = any(part in name for part in trainable)
    captions = [c for line in open(args.data) for c in json.loads(line)["captions"]]
    rng = np.random.default_rng(0)
    batches = [{k: torch.from_numpy(v) for k, v in encoder.preprocess(
        [captions[i] for i in rng.choice(len(captions), args.batch_size, replace=False)]).items()}
        for _ in range(args.batches)]

    def step(batch, runs: bool) -> float:
        start = time.perf_counter()
        out = tower(**batch) if runs else tower._forward(**batch)
        out.pow(2).sum().backward()
        tower.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    load_before = os.getloadavg()
    step(batches[0], True), step(batches[0], False)  # warm-up
    print(f"| batch | padded to | padded s | runs of {TRAINING_RUN} s | padded / runs |")
    print("|---:|---:|---:|---:|---:|")
    ratios = []
    for index, batch in enumerate(batches):
        order = (True, False) if index % 2 else (False, True)
        times = {runs: step(batch, runs) for runs in order}
        ratios.append(times[False] / times[True])
        print(f"| {index} | {batch['input_ids'].shape[1]} | {times[False]:.3f} | {times[True]:.3f} | {ratios[-1]:.2f}x |")
    print(f"\nmedian of the pairs: {statistics.median(ratios):.2f}x (top:{args.top}, batch {args.batch_size}); "
          f"load average before {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
