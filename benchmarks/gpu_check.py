"""One run (under 8 minutes on one GPU) that proves mmretrieve's GPU paths, writing a JSON report.

Parts, each failing soft (a broken part is recorded as failed with its error; the others run):

- ``environment``: torch, CUDA device, onnxruntime providers, ray.
- ``train_bf16``: ``mmretrieve train`` with the default model's recipe (no ``--init``: the offline
  ``default`` towers, frozen, features cached) on ``--pairs`` captioned images, ``precision=bf16``
  on CUDA, ``--train-steps`` optimiser steps. Pairs/s from the metrics log; the loss must stay finite.
- ``train_bf16_towers``: the same with both towers trained (``text.mode=full``, ``image.mode=full``),
  so bf16 autocast runs through MiniLM and EfficientNet-Lite0 forward and backward.
- ``onnx_providers``: ``mmretrieve export --model default``, then both towers on each GPU provider
  this onnxruntime has (TensorRT, CUDA) against CPU fp32: cosine per embedding (must be >= 0.9999)
  and items/s at a fixed batch shape.
- ``ray_gpu_index``: ``mmretrieve index --engine ray --gpus-per-worker 1 --workers 1`` over
  ``--index-images`` images with the ONNX export (CUDA provider); items/s and the per-worker report.

Without a CUDA device every GPU part is recorded as ``skipped: no CUDA device``. ``--cpu-smoke``
runs every part on the CPU at small sizes instead (bf16 autocast on CPU, CPU against CPU, a Ray
actor with no GPU), to test this script on a machine without a GPU.

    python benchmarks/gpu_check.py --data DIR --out report.json   # DIR: captions.jsonl + images
    python benchmarks/gpu_check.py --out report.json              # synthetic captioned images
    python benchmarks/gpu_check.py --cpu-smoke --pairs 60 --index-images 60 --out report.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

MIN_COSINE = 0.9999
PART_TIMEOUT_S = 300  # each subprocess; the whole run stays under 8 minutes on a GPU machine


class Skip(Exception):
    """A part that cannot run here, with the reason."""


# -- helpers -----------------------------------------------------------------------------------

def mmretrieve(*args: str, timeout: int | None = None) -> str:
    """Run the CLI; its stdout, or an error carrying the end of its stderr."""
    timeout = timeout or PART_TIMEOUT_S
    result = subprocess.run([sys.executable, "-m", "mmretrieve", *args], capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode:
        lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
        raise RuntimeError(f"mmretrieve {args[0]} exited {result.returncode}: {' / '.join(lines[-3:])[-1500:]}")
    return result.stdout


def last_json(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{"):])


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def prepare_data(args, work: Path) -> tuple[Path, Path]:
    """(captions JSONL with absolute image paths, folder of images to index), ``--pairs`` and
    ``--index-images`` of them, from ``--data`` or drawn synthetically."""
    from PIL import Image

    captions = work / "pairs.jsonl"
    images = work / "index-images"
    images.mkdir()
    if args.data:
        records = [json.loads(line) for line in (args.data / "captions.jsonl").read_text().splitlines() if line.strip()]
        for record in records:
            record["image"] = str((args.data / record["image"]).resolve())
    else:
        rng = np.random.default_rng(0)
        colours = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 220, 40)}
        shapes = ("square", "stripe", "dot")
        synthetic = work / "synthetic"
        synthetic.mkdir()
        records = []
        for number in range(max(args.pairs, args.index_images)):
            colour, shape = list(colours)[number % 4], shapes[number // 4 % 3]
            pixels = rng.integers(0, 60, (224, 224, 3), dtype=np.uint8)
            x, y = rng.integers(20, 140, 2)
            if shape == "square":
                pixels[y:y + 64, x:x + 64] = colours[colour]
            elif shape == "stripe":
                pixels[:, x:x + 24] = colours[colour]
            else:
                pixels[y:y + 24, x:x + 24] = colours[colour]
            path = synthetic / f"{number:05d}.jpg"
            Image.fromarray(pixels).save(path, quality=90)
            records.append({"image": str(path), "captions": [f"a {colour} {shape} on a dark background",
                                                             f"{colour} {shape}"]})
    if len(records) < max(args.pairs, 20):
        raise ValueError(f"{len(records)} captioned images, need at least {max(args.pairs, 20)}")
    captions.write_text("".join(json.dumps(r) + "\n" for r in records[:args.pairs]))
    for record in records[:args.index_images]:
        shutil.copy(record["image"], images / Path(record["image"]).name)  # scratch copies, deleted at the end
    return captions, images


# -- the parts ---------------------------------------------------------------------------------

def environment(args, work, state) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        info.update(device=torch.cuda.get_device_name(0), bf16=torch.cuda.is_bf16_supported(),
                    memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    try:
        import onnxruntime

        info.update(onnxruntime=onnxruntime.__version__, providers=onnxruntime.get_available_providers())
    except ImportError:
        info["onnxruntime"] = None
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        info["ray"] = None
    return info


def train_run(args, state, out: Path, device: str, extra: list[str]) -> dict:
    started = time.perf_counter()
    summary = last_json(mmretrieve(
        "train", "--data", str(state["pairs"]), "-o", str(out), "--json",
        "--set", "precision=bf16", "--set", f"device={device}", "--set", f"max_steps={args.train_steps}",
        "--set", "log_every=2", "--set", f"val_size={max(10, args.pairs // 10)}", *extra))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "pairs_per_s" in r]
    losses = [r["loss"] for r in steps if "loss" in r]
    if not steps:
        raise RuntimeError("the run logged no training steps")
    if not np.all(np.isfinite(losses)):
        raise RuntimeError(f"non-finite loss under bf16: {losses}")
    rates = [r["pairs_per_s"] for r in steps[1:]] or [steps[0]["pairs_per_s"]]  # the first window includes warm-up
    return {"steps": summary["steps"], "pairs_per_s": float(np.median(rates)), "loss_first": losses[0],
            "loss_last": losses[-1], "wall_s": time.perf_counter() - started}


def train_device(args) -> str:
    if not (args.cpu_smoke or cuda_available()):
        raise Skip("no CUDA device")
    return "cpu" if args.cpu_smoke else "cuda"


def train_bf16(args, work, state) -> dict:
    """The default recipe: frozen towers, features cached once, the heads trained under bf16."""
    device = train_device(args)
    batch = ["--set", f"batch_size={args.train_batch}"] if args.train_batch else []
    return {"device": device, "precision": "bf16", **train_run(args, state, work / "train-recipe", device, batch)}


def train_bf16_towers(args, work, state) -> dict:
    """The same with both towers trained, so bf16 autocast runs MiniLM and EfficientNet-Lite0
    forward and backward."""
    device = train_device(args)
    batch = ["--set", f"batch_size={args.train_batch}"] if args.train_batch else []
    return {"device": device, "precision": "bf16", **train_run(
        args, state, work / "train-towers", device, [*batch, "--set", "text.mode=full", "--set", "image.mode=full"])}


def onnx_providers(args, work, state) -> dict:
    import onnxruntime as ort

    from mmretrieve.runtime.onnx_runtime import OnnxEmbedder

    available = ort.get_available_providers()
    if args.cpu_smoke:
        providers = ["CPUExecutionProvider"]
    else:
        if not cuda_available():
            raise Skip("no CUDA device")
        providers = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
        if not providers:
            raise RuntimeError(f"this onnxruntime has no CUDA provider ({', '.join(available)}): "
                               "pip install onnxruntime-gpu")
    export = work / "export"
    mmretrieve("export", "--model", "default", "--out", str(export), "--json")
    state["export"] = export
    reference = OnnxEmbedder(export, device="cpu")
    records = [json.loads(line) for line in state["pairs"].read_text().splitlines()]
    texts = [r["captions"][0] for r in records][:args.batch * 4]
    from PIL import Image

    images = [Image.open(r["image"]).convert("RGB") for r in records[:args.batch * 4]]
    # One fixed shape per tower (texts padded together), so TensorRT builds one engine per tower.
    feeds = {"text": reference.text_preprocessor(texts),
             "image": {"pixel_values": reference.image_preprocessor(images)["pixel_values"]}}
    result = {"export": str(export), "towers": {}}
    failures = []
    for tower, tower_feeds in feeds.items():
        graph = reference.info.graph(tower)
        path = str(export / graph["file"])
        rows = len(next(iter(tower_feeds.values())))
        batches = [{name: tower_feeds[name][start:start + args.batch] for name in graph["inputs"]}
                   for start in range(0, rows - args.batch + 1, args.batch)]

        def run(session):
            return np.concatenate([session.run([graph["output"]], batch)[0] for batch in batches])

        def rate(session):
            run(session)  # warm-up (and TensorRT's engine build)
            times = []
            for _ in range(3):
                started = time.perf_counter()
                run(session)
                times.append(time.perf_counter() - started)
            return len(batches) * args.batch / float(np.median(times))

        cpu = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        expected = run(cpu)
        entry = {"cpu_items_per_s": rate(cpu), "batch": args.batch, "providers": {}}
        for provider in providers:
            # TensorRT hands the nodes it cannot build to CUDA, as onnxruntime recommends.
            chain = [provider, "CUDAExecutionProvider"] if provider.startswith("Tensorrt") else [provider]
            session = ort.InferenceSession(path, providers=[*chain, "CPUExecutionProvider"])
            if session.get_providers()[0] != provider:
                entry["providers"][provider] = {"status": "failed", "error": f"fell back to {session.get_providers()}"}
                failures.append(f"{tower}/{provider} fell back to CPU")
                continue
            got = run(session).astype(np.float32)
            cosine = np.sum(got * expected, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
            items_per_s = rate(session)
            entry["providers"][provider] = {"min_cosine": float(cosine.min()), "items_per_s": items_per_s,
                                            "speedup_vs_cpu": items_per_s / entry["cpu_items_per_s"]}
            if cosine.min() < MIN_COSINE:
                failures.append(f"{tower}/{provider} min cosine {cosine.min():.6f} < {MIN_COSINE}")
        result["towers"][tower] = entry
    if failures:
        raise RuntimeError("; ".join(failures) + f" (measured: {json.dumps(result['towers'])})")
    return result


def ray_gpu_index(args, work, state) -> dict:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise Skip('ray is not installed: pip install "mmretrieve[ray]"') from None
    if not (args.cpu_smoke or cuda_available()):
        raise Skip("no CUDA device")
    gpus = "0" if args.cpu_smoke else "1"
    model = ["--model", str(state["export"]), "--runtime", "onnx"] if state.get("export") else ["--model", "default"]
    started = time.perf_counter()
    report = last_json(mmretrieve(
        "index", str(state["images"]), "--index-dir", str(work / "ray-index"), "--engine", "ray",
        "--gpus-per-worker", gpus, "--workers", "1", *model, "--json"))
    return {"gpus_per_worker": float(gpus), "items_per_s": report.get("items_per_s"), "added": report.get("added"),
            "workers": report.get("workers"), "wall_s": time.perf_counter() - started}


PARTS = [("environment", environment), ("train_bf16", train_bf16), ("train_bf16_towers", train_bf16_towers),
         ("onnx_providers", onnx_providers), ("ray_gpu_index", ray_gpu_index)]


def run_part(name, function, args, work, state) -> dict:
    started = time.perf_counter()
    try:
        entry = {"status": "ok", **function(args, work, state)}
    except Skip as exc:
        entry = {"status": "skipped", "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - every part fails soft, recorded with its error
        entry = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                 "traceback": traceback.format_exc(limit=4)[-2000:]}
    entry["seconds"] = round(time.perf_counter() - started, 1)
    return entry


def summary_line(name: str, entry: dict) -> str:
    if entry["status"] == "skipped":
        return entry["reason"]
    if entry["status"] == "failed":
        return entry["error"].splitlines()[0][:140]
    if name == "environment":
        return (f"torch {entry['torch']}, cuda {entry['cuda']}" + (f" ({entry['device']})" if entry["cuda"] else "") +
                f", onnxruntime {entry.get('onnxruntime')}, ray {entry.get('ray')}")
    if name.startswith("train_bf16"):
        return (f"{entry['device']} bf16: {entry['pairs_per_s']:.1f} pairs/s over {entry['steps']} steps, "
                f"loss {entry['loss_first']:.3f} -> {entry['loss_last']:.3f}")
    if name == "onnx_providers":
        parts = []
        for tower, t in entry["towers"].items():
            for provider, p in t["providers"].items():
                parts.append(f"{tower} {provider.replace('ExecutionProvider', '')}: cos {p['min_cosine']:.6f}, "
                             f"{p['items_per_s']:.0f}/s ({p['speedup_vs_cpu']:.1f}x CPU)")
        return "; ".join(parts)
    if name == "ray_gpu_index":
        return f"{entry['added']} images at {entry['items_per_s']:.1f} items/s, {entry['gpus_per_worker']:g} GPU per actor"
    return ""


def main() -> None:
    global PART_TIMEOUT_S
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="folder with captions.jsonl and its images (default: synthetic)")
    parser.add_argument("--pairs", type=int, default=400, help="captioned images to train on")
    parser.add_argument("--train-steps", type=int, default=40, help="optimiser steps of each training run")
    parser.add_argument("--train-batch", type=int, default=None, help="pairs per batch (default: the recipe's)")
    parser.add_argument("--index-images", type=int, default=1000, help="images for the Ray indexing part")
    parser.add_argument("--batch", type=int, default=64, help="batch size of the ONNX provider runs")
    parser.add_argument("--cpu-smoke", action="store_true", help="run every part on the CPU, to test this script")
    parser.add_argument("--parts", default=",".join(name for name, _ in PARTS),
                        help="comma-separated parts to run (default: all)")
    parser.add_argument("--part-timeout", type=int, default=PART_TIMEOUT_S,
                        help="seconds each mmretrieve command may take (default %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    args = parser.parse_args()
    PART_TIMEOUT_S = args.part_timeout
    if args.cpu_smoke:
        args.train_steps, args.batch, args.train_batch = min(args.train_steps, 3), min(args.batch, 16), 16
    started = time.perf_counter()
    report = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "args": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "parts": {}}
    with tempfile.TemporaryDirectory(prefix="mmretrieve-gpu-check-") as tmp:
        work = Path(tmp)
        state: dict = {}
        gpu_parts = args.cpu_smoke or cuda_available()
        try:
            if gpu_parts:
                state["pairs"], state["images"] = prepare_data(args, work)
        except Exception as exc:  # noqa: BLE001 - the parts that need data fail with this error
            state["data_error"] = f"{type(exc).__name__}: {exc}"
        wanted = set(args.parts.split(","))
        unknown = wanted - {name for name, _ in PARTS}
        if unknown:
            parser.error(f"unknown part(s) {', '.join(sorted(unknown))}; the parts are {', '.join(n for n, _ in PARTS)}")
        for name, function in PARTS:
            if name not in wanted:
                continue
            if name != "environment" and "data_error" in state:
                report["parts"][name] = {"status": "failed", "error": f"preparing data: {state['data_error']}"}
                continue
            print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
            report["parts"][name] = run_part(name, function, args, work, state)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["ok"] = all(p["status"] != "failed" for p in report["parts"].values())
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("| part | status | seconds | result |\n|---|---|---:|---|")
    for name, entry in report["parts"].items():
        print(f"| {name} | {entry['status']} | {entry['seconds']:.1f} | {summary_line(name, entry)} |")
    print(f"\n{report['seconds']:.0f} s in all; report written to {args.out}")
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
