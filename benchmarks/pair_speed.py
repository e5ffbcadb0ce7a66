"""CPU speed of a ViT-B/32-sized CLIP pair's towers: PyTorch fp32 against onnxruntime fp32.

The pair is transformers' ``CLIPModel(CLIPConfig())`` with random weights: its defaults are
ViT-B/32's (12-layer 768-wide vision transformer on 224 px, 32 px patches) and CLIP's
12-layer 512-wide text transformer, so the cost per image and per caption is that of
openai/clip-vit-base-patch32 (weights do not change the arithmetic). Each tower is measured
as mmretrieve runs it: tower, the checkpoint's projection and L2 normalisation in one graph,
exported to ONNX the way ``mmretrieve export`` does (TorchScript exporter, opset 18, batch
and sequence length dynamic, constant folding) and run with mmretrieve's onnxruntime session
options.

Captions are Flickr8k captions tokenised with CLIP's BPE vocabulary (open_clip ships it in
its wheel), padded to the longest in each batch; images are Flickr8k photos preprocessed
beforehand (CLIP's 224 px resize, crop and normalisation), so the image rate is the model's.
Rates are items/s at batch 32 and latency at batch 1, the two backends interleaved round
after round (this machine's timings drift by 2x over minutes: only ratios within one run
mean much). Prints a Markdown table.

    python benchmarks/pair_speed.py [--rounds 3] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared/data/flickr8k-dev"
# Items per timed call, by batch size.
WORK = {1: {"text": 16, "image": 4}, 32: {"text": 64, "image": 32}}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_pair():
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig()).eval().requires_grad_(False)

    class TextGraph(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            pooled = model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
            return torch.nn.functional.normalize(model.text_projection(pooled), dim=-1)

    class ImageGraph(torch.nn.Module):
        def forward(self, pixel_values):
            pooled = model.vision_model(pixel_values=pixel_values).pooler_output
            return torch.nn.functional.normalize(model.visual_projection(pooled), dim=-1)

    parameters = {"text": sum(p.numel() for p in (*model.text_model.parameters(), *model.text_projection.parameters())),
                  "image": sum(p.numel() for p in (*model.vision_model.parameters(),
                                                   *model.visual_projection.parameters()))}
    return {"text": TextGraph().eval(), "image": ImageGraph().eval()}, parameters


def inputs(count_texts: int, count_images: int) -> tuple[list[dict], np.ndarray]:
    """Tokenised caption batches source (ids per caption) and preprocessed photos."""
    import json

    import open_clip

    from mmretrieve.preprocess import ImagePreprocessConfig, ImagePreprocessor

    records = [json.loads(line) for line in (DATA / "captions.jsonl").read_text().splitlines() if line.strip()]
    captions = [c for r in records for c in r["captions"]][:count_texts]
    tokens = open_clip.get_tokenizer("ViT-B-32")(captions).numpy()  # (n, 77), 0-padded, EOT = 49407
    preprocess = ImagePreprocessor(ImagePreprocessConfig(size=224, crop_pct=1.0, interpolation="bicubic",
                                                         mean=CLIP_MEAN, std=CLIP_STD))
    pixels = preprocess([DATA / r["image"] for r in records[:count_images]])["pixel_values"]
    return tokens, pixels


def text_batch(tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Pad to the longest caption of the batch, as mmretrieve's text preprocessing does."""
    mask = (tokens != 0).astype(np.int64)
    length = int(mask.sum(axis=1).max())
    return {"input_ids": tokens[:, :length].astype(np.int64), "attention_mask": mask[:, :length]}


def export(graphs: dict, work: Path) -> dict[str, Path]:
    import warnings

    import onnx
    import torch

    paths = {}
    examples = {"text": (torch.randint(1, 49000, (2, 9)), torch.ones(2, 9, dtype=torch.int64)),
                "image": (torch.randn(2, 3, 224, 224),)}
    names = {"text": (["input_ids", "attention_mask"], {"input_ids": {0: "batch", 1: "sequence"},
                                                        "attention_mask": {0: "batch", 1: "sequence"}}),
             "image": (["pixel_values"], {"pixel_values": {0: "batch"}})}
    for tower, graph in graphs.items():
        path = work / f"{tower}.onnx"
        input_names, axes = names[tower]
        print(f"exporting the {tower} tower ...", file=sys.stderr)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, examples[tower], str(path), dynamo=False, input_names=input_names,
                              output_names=[f"{tower}_embedding"], dynamic_axes={**axes, f"{tower}_embedding": {0: "batch"}},
                              opset_version=18, do_constant_folding=True)
        onnx.checker.check_model(str(path))
        paths[tower] = path
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, help="Folder for the ONNX files (default: a temporary one).")
    args = parser.parse_args()

    import onnxruntime as ort
    import torch

    from mmretrieve.runtime.onnx_runtime import session_options

    graphs, parameters = build_pair()
    tokens, pixels = inputs(max(w["text"] for w in WORK.values()), max(w["image"] for w in WORK.values()))
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        paths = export(graphs, work)
        sessions = {tower: ort.InferenceSession(str(path), session_options(ort), providers=["CPUExecutionProvider"])
                    for tower, path in paths.items()}

        def run_torch(tower, feed):
            with torch.inference_mode():
                return graphs[tower](*(torch.from_numpy(v) for v in feed.values())).numpy()

        def run_ort(tower, feed):
            return sessions[tower].run(None, feed)[0]

        backends = {"torch fp32": run_torch, "onnxruntime fp32": run_ort}

        def feeds(tower, batch):
            count = WORK[batch][tower]
            if tower == "text":
                return [text_batch(tokens[s:s + batch]) for s in range(0, count, batch)]
            return [{"pixel_values": pixels[s:s + batch]} for s in range(0, count, batch)]

        # Parity of the exports (what export's gate checks), on real inputs.
        parity = {}
        for tower in ("text", "image"):
            feed = feeds(tower, 32)[0]
            a, b = run_torch(tower, feed), run_ort(tower, feed)
            parity[tower] = (float(np.abs(a - b).max()), float((a * b).sum(axis=1).min()))
        for tower in ("text", "image"):  # warm-up: allocators, oneDNN kernels
            for run in backends.values():
                run(tower, feeds(tower, 32)[0])
        timings: dict[tuple, list[float]] = {}
        for round_ in range(args.rounds):
            for tower in ("text", "image"):
                for batch in (1, 32):
                    batches = feeds(tower, batch)
                    for name, run in backends.items():
                        started = time.perf_counter()
                        for feed in batches:
                            run(tower, feed)
                        timings.setdefault((tower, batch, name), []).append(
                            (time.perf_counter() - started) / WORK[batch][tower])
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)

    load = os.getloadavg()[0]
    print(f"ViT-B/32-sized CLIP pair, random weights (text {parameters['text'] / 1e6:.1f}M parameters, "
          f"image {parameters['image'] / 1e6:.1f}M); torch {torch.__version__}, onnxruntime {ort.__version__}, "
          f"{os.cpu_count()} CPU threads, load average {load:.1f} at the end; {args.rounds} interleaved rounds, medians")
    print(f"export parity: text max |diff| {parity['text'][0]:.1e} (min cosine {parity['text'][1]:.6f}), "
          f"image max |diff| {parity['image'][0]:.1e} (min cosine {parity['image'][1]:.6f})")
    print()
    print("| tower | backend | batch 32: items/s | vs torch | batch 1: ms/item | vs torch |")
    print("|---|---|---:|---:|---:|---:|")
    for tower, unit in (("text", "captions"), ("image", "images")):
        for name in backends:
            row = [f"{tower} ({unit})", name]
            for batch in (32, 1):
                seconds = timings[(tower, batch, name)]
                base = timings[(tower, batch, "torch fp32")]
                ratio = statistics.median(b / s for s, b in zip(seconds, base))  # speed-up within each round
                value = 1 / statistics.median(seconds) if batch == 32 else 1000 * statistics.median(seconds)
                row += [f"{value:.1f}", f"{ratio:.2f}x"]
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
