"""Train the trainable fusion heads on one captioned set and print the recall table on another.

    python -m mmretrieve.fusion.experiment --model default \
        --train TRAIN.jsonl --eval DEV.jsonl --cache DIR --out DIR

Tower features are cached under --cache (reused on the next run); each trained head is saved
as a fusion bundle under --out/<strategy>/ with its ONNX export (parity-checked) beside it,
and the table is written to --out/table.json and printed as Markdown on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from ..errors import MMRetrieveError

log = logging.getLogger("mmretrieve.fusion")


def run(model_ref: str, train_path: str, eval_path: str, cache: Path, out: Path, epochs: int, weights: str | None,
        seed: int) -> dict:
    from ..bundle import load_bundle
    from ..data import load_captions
    from . import create_fusion, list_fusion_strategies, is_trainable
    from .embeddings import embed_captioned
    from .evaluation import evaluate_fusion, format_table
    from .onnx import export_fusion_onnx
    from .store import save_fusion
    from .training import FusionTrainConfig, train_fusion

    model = load_bundle(model_ref)
    fingerprint = model.bundle.fingerprint
    train = embed_captioned(model, load_captions(train_path, check_images=False).items, cache, "train")
    held_out = embed_captioned(model, load_captions(eval_path, check_images=False).items, cache, Path(eval_path).parent.name)
    strategies = {}
    for name in list_fusion_strategies():
        if not is_trainable(name):
            strategies[name] = create_fusion(name, weights=weights)
            continue
        strategy = create_fusion(name, dim=model.embed_dim)
        started = time.time()
        summary = train_fusion(strategy, train, FusionTrainConfig(epochs=epochs, seed=seed))
        summary["seconds"] = round(time.time() - started, 1)
        log.info("%s: %s", name, summary)
        save_fusion(strategy, out / name, fingerprint, training={**summary, "data": str(train_path)})
        parity = export_fusion_onnx(strategy, out / name / "fusion.onnx")
        log.info("%s: ONNX parity min cosine %.6f", name, parity["min_cosine"])
        strategies[name] = strategy
    table = evaluate_fusion(held_out, strategies)
    (out / "table.json").write_text(json.dumps({"model": model_ref, "fingerprint": fingerprint, "train": train_path,
                                                "eval": eval_path, "recall": table}, indent=2))
    print(format_table(table))
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="a bundle folder or a registered model name")
    parser.add_argument("--train", required=True, help="captioned set the heads are trained on")
    parser.add_argument("--eval", required=True, help="captioned set the table is measured on")
    parser.add_argument("--cache", type=Path, required=True, help="folder for cached tower features")
    parser.add_argument("--out", type=Path, required=True, help="folder for the fusion bundles and table.json")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--weights", default=None, help="text,image weights for late and mean (default 0.5,0.5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        run(args.model, args.train, args.eval, args.cache, args.out, args.epochs, args.weights, args.seed)
    except MMRetrieveError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
