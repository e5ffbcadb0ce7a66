"""Everyday objects: can a model find public-domain photos of ordinary things among Flickr8k's?

The 15 photos that ship inside the scikit-image wheel (the ones examples/sample_photos.py
writes), and matplotlib's sample photo of Grace Hopper (a US Navy portrait, public domain),
are mixed into the 500 photos of flickr8k-dev. Each gets ONE plain query, written here before
any model was measured with it and never changed afterwards (a benchmark that is tuned to its
queries measures nothing). For every query the script prints the rank of its photo among all
the photos, and counts how many of the 15 scikit-image photos come first and how many are in
the top 5; the matplotlib photo is an extra row, outside the counts that the issue's target uses.

Nothing is downloaded: the photos come from the installed wheels and are written to a
temporary folder (never into the repository). scipy.datasets was checked too: its photos
(`face`, `ascent`) are fetched from the network on first use, so they are not used.

    python benchmarks/everyday_objects.py [--model default] [--runtime auto|torch|onnx]
        [--data ../shared/data/flickr8k-dev/captions.jsonl] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared/data/flickr8k-dev/captions.jsonl"

# name in skimage.data -> the query for it. Fixed before measuring; do not tune.
SKIMAGE_QUERIES = {
    "astronaut": "an astronaut",
    "chelsea": "a cat",
    "coffee": "a cup of coffee",
    "rocket": "a rocket",
    "camera": "a man with a camera",
    "clock": "a clock",
    "coins": "coins",
    "moon": "the moon",
    "page": "a printed page of text",
    "hubble_deep_field": "galaxies in deep space",
    "immunohistochemistry": "a microscope image of stained cells",
    "retina": "the retina of an eye",
    "brick": "a brick wall",
    "grass": "grass",
    "gravel": "gravel",
}
# file in matplotlib's sample_data -> the query for it (an extra, outside the 15's counts).
MATPLOTLIB_QUERIES = {
    "grace_hopper.jpg": "a woman in a military uniform",
}


def write_photos(folder: Path) -> list[tuple[str, str, Path]]:
    """(source, query, file) for every everyday photo, written into ``folder`` as JPEG/PNG."""
    import skimage.data
    from PIL import Image

    photos = []
    for name, query in SKIMAGE_QUERIES.items():
        path = folder / f"skimage-{name}.png"
        Image.fromarray(getattr(skimage.data, name)()).save(path)
        photos.append(("scikit-image", query, path))
    try:
        import matplotlib.cbook
    except ImportError:
        print("matplotlib is not installed: its sample photo is left out", file=sys.stderr)
        return photos
    for name, query in MATPLOTLIB_QUERIES.items():
        source = Path(matplotlib.cbook.get_sample_data(name, asfileobj=False))
        path = folder / f"matplotlib-{name}"
        path.write_bytes(source.read_bytes())
        photos.append(("matplotlib", query, path))
    return photos


def measure(model: str, runtime: str, data: Path, workers: int = 2) -> dict:
    from mmretrieve.data import load_captions
    from mmretrieve.embedding import embed_image_paths
    from mmretrieve.progress import progress_bar
    from mmretrieve.runtime import load_embedder

    embedder = load_embedder(model, runtime)
    background = [str(item.image) for item in load_captions(data).items]
    with tempfile.TemporaryDirectory() as tmp:
        photos = write_photos(Path(tmp))
        paths = [str(path) for _, _, path in photos] + background
        with progress_bar(total=len(paths), unit="image", desc="everyday images") as bar:
            images, _, _ = embed_image_paths(paths, embedder.image_preprocessor, embedder.embed_pixels, 32,
                                             embedder.embed_dim, workers, bar, strict=True)
    queries = embedder.embed_texts([query for _, query, _ in photos])
    scores = queries @ images.T  # (queries, all photos); photo i is column i
    rows = []
    for i, (source, query, path) in enumerate(photos):
        order = np.argsort(-scores[i], kind="stable")
        rank = int(np.flatnonzero(order == i)[0]) + 1
        top = Path(paths[order[0]]).name
        rows.append({"source": source, "photo": path.name, "query": query, "rank": rank,
                     "score": round(float(scores[i, i]), 4), "first": top if rank > 1 else path.name})
    core = [r for r in rows if r["source"] == "scikit-image"]
    return {
        "model": model, "runtime": embedder.runtime, "embed_dim": int(embedder.embed_dim), "photos": len(paths),
        "rows": rows,
        "skimage_rank1": sum(r["rank"] == 1 for r in core), "skimage_top5": sum(r["rank"] <= 5 for r in core),
        "skimage_count": len(core),
        "all_rank1": sum(r["rank"] == 1 for r in rows), "all_top5": sum(r["rank"] <= 5 for r in rows),
        "all_count": len(rows),
    }


def print_table(result: dict) -> None:
    print(f"model {result['model']} ({result['runtime']} runtime, {result['embed_dim']}-d), "
          f"{result['photos']} photos\n")
    print("| photo | query | rank | first result when not the photo |")
    print("|---|---|---:|---|")
    for row in result["rows"]:
        first = "" if row["rank"] == 1 else row["first"]
        print(f"| {row['photo']} | {row['query']} | {row['rank']} | {first} |")
    print(f"\nscikit-image photos: {result['skimage_rank1']} of {result['skimage_count']} at rank 1, "
          f"{result['skimage_top5']} of {result['skimage_count']} in the top 5")
    print(f"all everyday photos: {result['all_rank1']} of {result['all_count']} at rank 1, "
          f"{result['all_top5']} of {result['all_count']} in the top 5")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="a registered model, bundle or ONNX export")
    parser.add_argument("--runtime", default="auto", help="auto, torch or onnx")
    parser.add_argument("--data", type=Path, default=DATA, help="the captioned set whose photos are the haystack")
    parser.add_argument("--workers", type=int, default=2, help="image decoding processes")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    result = measure(args.model, args.runtime, args.data, args.workers)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
