"""Write scikit-image's bundled public-domain photos into a folder, to try mmretrieve on.

    python examples/sample_photos.py demo-photos

Only images that ship inside the scikit-image wheel are used (no download). Grey-scale ones
are saved as they are; mmretrieve converts them to RGB when it reads them.
"""

from __future__ import annotations

import sys
from pathlib import Path

# name in skimage.data -> file name saying what is in it (handy when reading search results)
PHOTOS = {
    "astronaut": "astronaut-eileen-collins.jpg",
    "chelsea": "cat-chelsea.jpg",
    "coffee": "cup-of-coffee.jpg",
    "rocket": "rocket-on-launch-pad.jpg",
    "camera": "man-with-camera.jpg",
    "clock": "wall-clock.jpg",
    "coins": "coins.jpg",
    "moon": "moon-surface.jpg",
    "page": "printed-page.jpg",
    "hubble_deep_field": "hubble-deep-field.jpg",
    "immunohistochemistry": "microscopy-stain.jpg",
    "retina": "retina.jpg",
    "brick": "brick-wall.jpg",
    "grass": "grass.jpg",
    "gravel": "gravel.jpg",
}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python examples/sample_photos.py OUTPUT_FOLDER", file=sys.stderr)
        return 2
    import skimage.data
    from PIL import Image

    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    for name, file_name in PHOTOS.items():
        Image.fromarray(getattr(skimage.data, name)()).save(out / file_name, quality=92)
    print(f"{len(PHOTOS)} photos from scikit-image -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
