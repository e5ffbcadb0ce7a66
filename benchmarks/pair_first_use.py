"""What the first `--model clip:local-dir:PATH` costs (the pair's bundle is built into the cache),
and what a later use costs (the cached bundle is loaded), on a tiny random CLIP and on a random
CLIP of ViT-B/32's size (CLIPConfig() defaults, 151M parameters).

Each use is a fresh Python process that loads the model as the torch runtime does
(``load_bundle``); it reports the seconds spent importing, resolving the reference (building the
bundle on a first use) and loading the bundle. Random weights: the costs are those of the real
checkpoint's size, not its quality.

    python benchmarks/pair_first_use.py [--repeats 2] [--skip-large]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

PROBE = """
import json, sys, time
start = time.perf_counter()
from mmretrieve.bundle import load_bundle, resolve_model
imported = time.perf_counter()
resolve_model(sys.argv[1])
resolved = time.perf_counter()
model = load_bundle(sys.argv[1])
loaded = time.perf_counter()
print(json.dumps({"import": imported - start, "resolve": resolved - imported, "load": loaded - resolved}))
"""


def vit_b32_clip(folder: Path) -> Path:
    """A random CLIP with CLIPConfig()'s sizes (ViT-B/32 image tower, 12-layer 512-wide text tower),
    the tiny test tokenizer (token ids are all the benchmark needs) and CLIP's processor config."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from tiny_pairs import _clip_bpe

    vocab, merges = _clip_bpe()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    config = CLIPConfig()
    config.text_config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor().save_pretrained(folder)
    return folder


def use(ref: str, cache: Path) -> dict[str, float]:
    """Wall seconds of each step, and the process's CPU seconds (user + system) in all: on a busy
    machine the CPU figure is the one that compares."""
    env = {**os.environ, "MMRETRIEVE_CACHE": str(cache)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, "-c", PROBE, ref], env=env, capture_output=True, text=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="first/second-use pairs per checkpoint")
    parser.add_argument("--skip-large", action="store_true", help="only the tiny CLIP")
    args = parser.parse_args()
    from tiny_pairs import tiny_clip

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoints = {"tiny CLIP": tiny_clip(tmp / "tiny")}
        if not args.skip_large:
            checkpoints["ViT-B/32-sized CLIP"] = vit_b32_clip(tmp / "vit-b-32")
        print(f"{'checkpoint':<22} {'use':<7} {'import s':>9} {'resolve s':>10} {'load s':>7} {'total s':>8} "
              f"{'CPU s':>6}")
        for repeat in range(args.repeats):
            for name, folder in checkpoints.items():  # interleaved: the machine's load hits both alike
                cache = tmp / f"cache-{repeat}-{folder.name}"
                for label in ("first", "second"):
                    t = use(f"clip:local-dir:{folder}", cache)
                    wall = t["import"] + t["resolve"] + t["load"]
                    print(f"{name:<22} {label:<7} {t['import']:>9.2f} {t['resolve']:>10.2f} {t['load']:>7.2f} "
                          f"{wall:>8.2f} {t['cpu']:>6.1f}", flush=True)


if __name__ == "__main__":
    main()
