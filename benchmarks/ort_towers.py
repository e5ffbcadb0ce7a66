"""Each tower of an ONNX export in onnxruntime: session settings, int8, and the share of the compute limit
(issue 17, items 5 and 7).

Variants run interleaved, round after round, on one export (``--export``, fp32):
  text, batch 32 of Flickr8k captions (tokenised beforehand, identical for every variant):
    padded     one run per 32, padded to the longest caption (onnxruntime defaults)
    policy     what mmretrieve runs: its session options (mmretrieve.threads: spinning off) and
               runs of 8 captions of similar length (mmretrieve.runtime.embed_by_length)
    spinning   runs of 8 by length in onnxruntime's default session (threads spin-wait)
    +denormal  policy with session.set_denormal_as_zero=1
    int8       the int8 text graph (`mmretrieve export --int8`'s quantize_int8), policy settings
  image, batch 32 and batch 1 of 224 px inputs:
    defaults   onnxruntime's own session options (ORT_ENABLE_ALL, spinning on)
    policy     mmretrieve's session options (spinning off), the batch in one run
    runs of N  policy, the batch of 32 in runs of N (mmretrieve runs 4: IMAGE_SUB_BATCH)
    extended   ORT_ENABLE_EXTENDED: no NCHWc layout transformation
    +denormal  policy with session.set_denormal_as_zero=1
    int8       the image graph quantised as int8 exports did before (MatMul: its head)
    int8 QDQ   static QDQ int8 on the convolutions, as `export --int8 --calibration` writes it
               (calibrated on the first 64 --calibration images), with --static
  --compare OTHER: the same inputs through another export's graphs (policy settings), e.g. one
  made by an earlier commit, to tell a change of graph from a change of machine or load.
  matmul: onnxruntime's own fp32 MatMul (1024 x 1024 x 1024) in the same rounds, in GFLOP/s.
Rates are items/s (median of rounds); "% of limit" uses the issue's compute limits (1,500
captions/s, 600 img/s at batch 32 on 2 cores: ~460 GFLOP/s onnxruntime matmul peak, 0.307
GFLOP per caption, 0.769 GFLOP per image) scaled by cores / 2; "% of matmul now" uses the
same FLOPs per item against the MatMul peak measured in these rounds, so it holds under load.

    python benchmarks/ort_towers.py --export EXPORT [--rounds 5] [--quick] [--static] [--compare OTHER]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared/data/flickr8k-dev"
LIMITS = {"text": 1500.0, "image": 600.0}  # items/s on 2 cores at batch 32 (issue 17)
GFLOP = {"text": 0.307, "image": 0.769}  # per 15-token caption, per 224 px image (torch's FLOP counter)
MATMUL = 1024  # square MatMul for the peak


def options(ort, policy: bool, level: str = "all", denormal: bool = False):
    from mmretrieve.runtime.onnx_runtime import session_options
    from mmretrieve.threads import policy_for

    if not policy:
        return ort.SessionOptions()
    chosen = session_options(ort, optimization=level, policy=policy_for("search"))
    if denormal:
        chosen.add_session_config_entry("session.set_denormal_as_zero", "1")
    return chosen


def text_feeds(export: Path, count: int) -> dict[str, np.ndarray]:
    from mmretrieve.preprocess import TextPreprocessor

    captions = [json.loads(line)["captions"][0] for line in (DATA / "captions.jsonl").read_text().splitlines()[:count]]
    return TextPreprocessor.load(export / "text")(captions)


def rate(run, items: int, seconds: float = 1.5) -> float:
    """items/s of ``run`` (which embeds ``items``), repeated for at least ``seconds``."""
    run()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        run()
        done += items
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.5, help="timed per variant per round")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 1 s")
    parser.add_argument("--static", action="store_true", help="also static QDQ int8 for the image tower")
    parser.add_argument("--calibration", type=Path, default=DATA / "images", help="images for --static")
    parser.add_argument("--compare", type=Path, help="another export whose graphs run beside these")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds = 2, 1.0
    import onnxruntime as ort

    from mmretrieve.export.manifest import read_export_info
    from mmretrieve.export.precision import quantize_int8
    from mmretrieve.runtime import embed_by_length

    ort.set_default_logger_severity(3)
    load_before = os.getloadavg()
    info = read_export_info(args.export)
    work = Path(tempfile.mkdtemp(prefix="ort-towers-"))
    graphs = {tower: args.export / info.graph(tower)["file"] for tower in ("text", "image")}
    for tower in ("text", "image"):
        quantize_int8(graphs[tower], work / f"{tower}-int8.onnx")
    feeds = text_feeds(args.export, 32)
    from PIL import Image

    from mmretrieve.preprocess import ImagePreprocessor

    from mmretrieve.export.manifest import input_dtype

    noise = np.random.default_rng(0).integers(0, 256, (32, 320, 400, 3), dtype=np.uint8)
    # the export's own preprocessing, so the graph gets what it takes (bytes, or normalised floats)
    takes_uint8 = input_dtype(info.graph("image")) == "uint8"
    preprocessor = ImagePreprocessor.load(args.export / "image")
    raw = preprocessor.uint8_batch([Image.fromarray(a) for a in noise])
    pixels = {32: raw if takes_uint8 else preprocessor.normalize(raw)}
    pixels[1] = pixels[32][:1]
    image_input = info.graph("image")["inputs"][0]

    def session(path, **kw):
        return ort.InferenceSession(str(path), options(ort, **kw), providers=["CPUExecutionProvider"])

    text_out, image_out = info.graph("text")["output"], info.graph("image")["output"]
    dim = info.embed_dim

    def text_runner(sess, bucketed):
        run_one = lambda part: sess.run([text_out], part)[0]  # noqa: E731
        if bucketed:
            return lambda: embed_by_length(feeds, run_one, dim, 8)
        return lambda: run_one(feeds)

    variants = {
        ("text", 32, "padded (onnxruntime defaults)"): text_runner(session(graphs["text"], policy=False), False),
        ("text", 32, "policy + runs of 8 by length"): text_runner(session(graphs["text"], policy=True), True),
        ("text", 32, "policy, padded"): text_runner(session(graphs["text"], policy=True), False),
        ("text", 32, "policy + by length + denormal=0"): text_runner(
            session(graphs["text"], policy=True, denormal=True), True),
        ("text", 32, "int8, policy + by length"): text_runner(session(work / "text-int8.onnx", policy=True), True),
        ("text", 32, "by length, spinning (defaults' session)"): text_runner(session(graphs["text"], policy=False),
                                                                              True),
    }
    other = read_export_info(args.compare) if args.compare else None
    if other is not None:
        other_text = other.graph("text")
        sess = session(args.compare / other_text["file"], policy=True)
        variants[("text", 32, f"--compare {args.compare.name}: policy + by length")] = (
            lambda s: lambda: embed_by_length(feeds, lambda part: s.run([other_text["output"]], part)[0],
                                              other.embed_dim, 8))(sess)
    text_one = {k: v[:1, :] for k, v in feeds.items()}
    for name, path in (("fp32", graphs["text"]), ("int8", work / "text-int8.onnx")):
        sess = session(path, policy=True)
        variants[("text", 1, f"{name}, policy")] = (lambda s: lambda: s.run([text_out], text_one)[0])(sess)
    image_sessions = {"defaults": session(graphs["image"], policy=False),
                      "policy": session(graphs["image"], policy=True),
                      "extended (no NCHWc)": session(graphs["image"], policy=True, level="extended"),
                      "policy + denormal=0": session(graphs["image"], policy=True, denormal=True),
                      "int8 (dynamic, head MatMul)": session(work / "image-int8.onnx", policy=True)}
    if args.static:
        image_sessions["int8 static QDQ (convs)"] = session(static_qdq(graphs["image"], work, args.calibration,
                                                                       args.export, image_input, takes_uint8), policy=True)
    for batch in (32, 1):
        for name, sess in image_sessions.items():
            variants[("image", batch, name)] = (lambda s, b: lambda: s.run([image_out], {image_input: pixels[b]}))(
                sess, batch)
        if batch == 32:  # the batch in runs, as OnnxEmbedder.embed_pixels does on CPU (IMAGE_SUB_BATCH)
            for run_size in (4, 8, 16):
                variants[("image", 32, f"policy, runs of {run_size}")] = (
                    lambda s, n: lambda: [s.run([image_out], {image_input: pixels[32][i:i + n]})
                                          for i in range(0, 32, n)])(image_sessions["policy"], run_size)
        if other is not None:
            graph = other.graph("image")
            other_pixels = raw[:batch] if input_dtype(graph) == "uint8" else preprocessor.normalize(raw[:batch])
            variants[("image", batch, f"--compare {args.compare.name}: policy")] = (
                lambda s, g, x: lambda: s.run([g["output"]], {g["inputs"][0]: x}))(
                session(args.compare / graph["file"], policy=True), graph, other_pixels)
    square = np.random.default_rng(1).standard_normal((MATMUL, MATMUL)).astype(np.float32)
    matmul = session(matmul_graph(work), policy=True)
    variants[("matmul", 1, "onnxruntime MatMul peak")] = lambda: matmul.run(None, {"a": square, "b": square})

    rates: dict[tuple, list[float]] = {key: [] for key in variants}
    for round_ in range(1, args.rounds + 1):
        for key, run in variants.items():
            rates[key].append(rate(run, key[1], args.seconds))
        print(f"round {round_}/{args.rounds} done", file=sys.stderr)
    cores = os.cpu_count() or 2
    peak = statistics.median(rates.pop(("matmul", 1, "onnxruntime MatMul peak"))) * 2 * MATMUL ** 3 / 1e9
    print(f"| tower | batch | variant | items/s (median of {args.rounds}) | vs first | % of compute limit | "
          f"% of matmul now |\n|---|---:|---|---:|---:|---:|---:|")
    firsts: dict[tuple, float] = {}
    for (tower, batch, name), values in rates.items():
        median = statistics.median(values)
        first = firsts.setdefault((tower, batch), median)
        limit = LIMITS[tower] * cores / 2
        share = f"{100 * median / limit:.0f}% | {100 * median * GFLOP[tower] / peak:.0f}%" if batch == 32 else " |"
        print(f"| {tower} | {batch} | {name} | {median:.1f} | {median / first:.2f}x | {share} |")
    print(f"\nonnxruntime fp32 MatMul {MATMUL}^3 in the same rounds: {peak:.0f} GFLOP/s (the issue's quiet peak: "
          f"435-479 on 2 cores)")
    shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    print(f"\nload average (1/5/15 min): before {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after {' '.join(f'{x:.2f}' for x in load_after)}; {cores} cores; onnxruntime {ort.__version__}")


def matmul_graph(work: Path) -> Path:
    """A graph of one fp32 MatMul of two inputs: onnxruntime's own compute peak on this machine."""
    import onnx
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [MATMUL, MATMUL]) for name in ("a", "b")]
    output = helper.make_tensor_value_info("c", TensorProto.FLOAT, [MATMUL, MATMUL])
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul", inputs, [output])
    path = work / "matmul.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def static_qdq(source: Path, work: Path, images: Path, export: Path, input_name: str, takes_uint8: bool) -> Path:
    """The image graph as `export --int8 --calibration IMAGES` writes it (static QDQ int8 on the
    convolutions: mmretrieve.export.precision.quantize_image_static), calibrated on the first
    CALIBRATION_IMAGES of ``images``."""
    from mmretrieve.export.precision import CALIBRATION_BATCH, CALIBRATION_IMAGES, quantize_image_static
    from mmretrieve.images import list_images
    from mmretrieve.preprocess import ImagePreprocessor

    preprocessor = ImagePreprocessor.load(export / "image")
    paths = list_images(images)[:CALIBRATION_IMAGES]

    def prepare(batch):
        raw = preprocessor.uint8_batch(batch)
        return raw if takes_uint8 else preprocessor.normalize(raw)

    target = work / "image-qdq.onnx"
    quantize_image_static(source, target, lambda: ({input_name: prepare(paths[i:i + CALIBRATION_BATCH])}
                                                   for i in range(0, len(paths), CALIBRATION_BATCH)))
    return target


if __name__ == "__main__":
    main()
