"""``mmretrieve open-clip-models``: the pretrained checkpoints open_clip knows, as --model names."""

from __future__ import annotations

import click


def pretrained_names(pattern: str | None = None) -> list[str]:
    """``open-clip:ARCH:TAG`` for every ``open_clip.list_pretrained()`` pair (optionally only those
    containing ``pattern``, case-insensitive), CoCa captioners left out."""
    import open_clip

    names = []
    for arch, tag in open_clip.list_pretrained():
        if arch.lower().startswith("coca"):
            continue
        name = f"open-clip:{arch}:{tag}"
        if pattern is None or pattern.lower() in name.lower():
            names.append(name)
    return names


def add_commands(cli):
    @cli.command(name="open-clip-models")
    @click.argument("pattern", required=False)
    def open_clip_models(pattern):
        """List open_clip's pretrained pairs as --model names (from mmretrieve-open-clip).

        PATTERN keeps the names that contain it (e.g. MobileCLIP, laion2b). Weights are
        downloaded on first use; offline, give a checkpoint file or folder instead
        (open-clip:ARCH:/path/to/checkpoint, open-clip:local-dir:PATH).
        """
        for name in pretrained_names(pattern):
            click.echo(name)
