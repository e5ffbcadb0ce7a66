"""Texts through the torch runtime: padded batches as given vs runs sorted by length.

    python benchmarks/torch_text_batching.py [--model default] [--data CAPTIONS.jsonl] [--texts 1024] [--rounds 4]

Embeds the first --texts captions of a captions file in batches of 32 (as `index --texts` and
`search` hand them over), both ways, interleaved per round; prints captions/s, the ratio and
the largest difference between the two results as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", default="../shared/data/flickr8k-dev/captions.jsonl")
    parser.add_argument("--texts", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    import torch

    from mmretrieve.runtime.torch_runtime import TorchEmbedder

    with open(args.data) as handle:
        captions = [c for line in handle if line.strip() for c in json.loads(line)["captions"]][:args.texts]
    embedder = TorchEmbedder(args.model, device="cpu")

    @torch.inference_mode()
    def padded(texts):  # the runtime before sorting: one forward per batch, padded to its longest
        inputs = {k: torch.from_numpy(v) for k, v in embedder.text_preprocessor(texts).items()}
        return embedder.model.encode_text(inputs).float().numpy()

    def run(fn):
        started = time.perf_counter()
        out = np.concatenate([fn(captions[i:i + args.batch]) for i in range(0, len(captions), args.batch)])
        return out, len(captions) / (time.perf_counter() - started)

    run(padded), run(embedder.embed_texts)  # warm-up
    print(f"{len(captions)} captions, batches of {args.batch}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| round | padded captions/s | sorted captions/s | ratio | max abs diff |")
    print("|---|---:|---:|---:|---:|")
    for round_ in range(1, args.rounds + 1):
        a, padded_rate = run(padded)
        b, sorted_rate = run(embedder.embed_texts)
        print(f"| {round_} | {padded_rate:.0f} | {sorted_rate:.0f} | {sorted_rate / padded_rate:.2f} | "
              f"{np.abs(a - b).max():.1e} |")


if __name__ == "__main__":
    main()
