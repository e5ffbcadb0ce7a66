"""Step 3 of the `default` recipe: (re)build a trained bundle's label bridge with its own text tower.

Reads default-model.toml's ``[model.bridge]`` settings and ``bridge_weights``, loads a trained
bundle (step 2's, whose MiniLM layers were fine-tuned; or any heads-only bundle), gives
it the bridge (``mmretrieve.model.add_bridge``: the EfficientNet-Lite0 classifier from this
plugin's wheel, ImageNet's class names embedded by the bundle's own text tower, so the class
vectors and the queries come from the same tower), validates each mixing weight on the recipe's
``val_data`` and saves the best as a bundle whose towers stay references to the wheels.

    python plugins/mmretrieve-offline-towers/add_bridge.py runs/default-model-text/best \
        runs/default-model-text/bridged --cache runs/default-model-text/cache
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RECIPE = Path(__file__).with_name("default-model.toml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", help="the bundle step 1 trained (heads only)")
    parser.add_argument("out", help="where to write the bundle with the bridge")
    parser.add_argument("--config", default=str(RECIPE), help="the recipe (its [model.bridge], bridge_weights, val_data)")
    parser.add_argument("--cache", help="a folder for the towers' validation features (step 1's runs/default-model/cache "
                                        "holds them already)")
    args = parser.parse_args(argv)

    from mmretrieve.bundle import load_bundle, save_bundle
    from mmretrieve.config import BridgeConfig, from_dict, read_config_file
    from mmretrieve.data import all_captions, load_captions
    from mmretrieve.bundle import tower_fingerprint
    from mmretrieve.embedding import auto_device, cached_tower_features
    from mmretrieve.evaluate import evaluate_model
    from mmretrieve.metrics import mean_recall
    from mmretrieve.model import add_bridge

    recipe = read_config_file(args.config)
    bridge = from_dict(BridgeConfig, recipe["model"]["bridge"], "model.bridge.")
    weights = [float(w) for w in recipe.get("bridge_weights") or [bridge.weight]]
    device = auto_device()
    model = load_bundle(args.bundle).to(device).eval()
    old = model.bundle.manifest["metadata"]
    add_bridge(model, bridge, device=device)
    items = load_captions(recipe["val_data"]).items
    cache = Path(args.cache) if args.cache else None
    features = {  # each tower once (under training's cache keys); every weight is then a cheap re-projection
        "image_features": cached_tower_features(model.image_encoder, [i.image for i in items], cache, 64, device,
                                                "image-val", tower_fingerprint(model.image_encoder), 2),
        "text_features": cached_tower_features(model.text_encoder, all_captions(items), cache, 64, device,
                                               "text-val", tower_fingerprint(model.text_encoder)),
    }
    scored = []
    for weight in weights:
        model.config.bridge.weight = weight
        metrics = evaluate_model(model, items, device=device, progress=False, **features)
        scored.append((mean_recall(metrics), weight, metrics))
        print(json.dumps({"bridge_weight": weight, "mean_recall": round(mean_recall(metrics), 2), **metrics}))
    _, weight, metrics = max(scored, key=lambda row: row[0])
    model.config.bridge.weight = weight
    metadata = {**old, "val": metrics, "heads_val": old.get("val"), "bridge_weights_tried": weights,
                "recipe_step_2": "add_bridge.py"}
    info = save_bundle(model.cpu(), args.out, reference_towers=("text", "image"), metadata=metadata)
    print(f"bridge weight {weight} chosen on {recipe['val_data']}; bundle {info.path} "
          f"({info.manifest['embed_dim']}-d, fingerprint {info.fingerprint})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
