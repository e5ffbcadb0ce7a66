"""Loading image–caption sets for training and evaluation, and splitting them by image.

Four formats, chosen from the path:

- ``.jsonl``: one ``{"image": "images/1.jpg", "captions": ["...", ...]}`` object per line
  (or ``"caption": "..."`` for a single one); blank lines are ignored.
- ``.csv`` / ``.tsv``: a header row with an image column (``image``, ``filepath``, ``file_name``,
  ``filename``, ``image_path`` or ``path``) and a caption column (``caption``, ``text``, ``title``
  or ``sentence``); rows naming the same image are grouped, in first-seen order.
- ``.json``: COCO captions, ``{"images": [{"id", "file_name"}], "annotations": [{"image_id",
  "caption"}]}``. ``file_name`` resolves against whichever of these holds the most of the first
  50 files: the JSON's folder, its ``images/`` subfolder, a subfolder named like the JSON
  (``val.json`` -> ``val/``), or for the official layout ``annotations/captions_val2017.json``
  the sibling ``val2017/``. Ties go to the earlier one.
- a folder: images (recursively, hidden entries skipped) with a same-named ``.txt`` beside
  each (``photo.jpg`` + ``photo.txt``), one caption per non-empty line.

Relative image paths resolve against the data file's folder. An image named by several records
gets all their captions, in file order. Malformed records and unusable images are skipped and
reported (or raise under ``strict``); PyTorch is never imported here, so the data can be checked
without it.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from contextlib import closing, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .decode import ordered_map
from .errors import InputError
from .images import ImageInputError, file_problem, list_images, load_image
from .progress import progress_bar

log = logging.getLogger(__name__)

ACCEPTED_FORMATS = (
    'a .jsonl file of {"image": ..., "captions": [...]} lines, a .csv or .tsv file with image and '
    "caption columns, a COCO captions .json file, or a folder of images with same-named .txt caption files"
)
IMAGE_COLUMNS = ("image", "filepath", "file_name", "filename", "image_path", "path")
CAPTION_COLUMNS = ("caption", "text", "title", "sentence")
_CAPTION_FILE_SUFFIXES = (".jsonl", ".csv", ".tsv", ".json")
# How many skipped entries a summary or log line shows before "and N more".
_SHOWN_SKIPS = 3


@dataclass
class CaptionedImage:
    image: Path  # absolute path
    captions: list[str]  # non-empty, stripped, in file order


@dataclass
class CaptionSet:
    items: list[CaptionedImage]
    source: Path
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (a path or "file:line", reason)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_captions(self) -> int:
        return sum(len(item.captions) for item in self.items)

    def summary(self) -> str:
        line = f"{len(self)} images, {self.num_captions} captions from {self.source}"
        return f"{line} ({describe_skips(self.skipped)})" if self.skipped else line


def all_captions(items: list[CaptionedImage]) -> list[str]:
    """Every caption of ``items``, flat, in file order (caption rows follow this order everywhere)."""
    return [caption for item in items for caption in item.captions]


def describe_skips(skipped: list[tuple[str, str]], shown: int = _SHOWN_SKIPS) -> str:
    """'N skipped: what: reason; ...' with the first few entries, for one-line reports."""
    listed = "; ".join(f"{what}: {reason}" for what, reason in skipped[:shown])
    more = f"; and {len(skipped) - shown} more" if len(skipped) > shown else ""
    return f"{len(skipped)} skipped: {listed}{more}"


def load_captions(path: str | Path, *, strict: bool = False, check_images: bool = True,
                  workers: int = 8, progress: bool = False) -> CaptionSet:
    """Read an image–caption set in any of the module's formats, keeping only usable pairs.

    ``check_images`` decodes every image fully (so truncated files are caught) on ``workers``
    threads; without it only existence is checked. ``strict`` raises InputError on the first
    problem instead of skipping it.
    """
    source = Path(os.path.normpath(Path(path).expanduser().absolute()))
    if not source.exists():
        raise InputError(f"{source}: no such caption file or folder")
    collector = _Collector(strict)
    if source.is_dir():
        _read_sidecar_folder(source, collector)
    else:
        suffix = source.suffix.lower()
        if suffix == ".jsonl":
            _read_jsonl(source, collector)
        elif suffix in (".csv", ".tsv"):
            _read_table(source, collector, delimiter="\t" if suffix == ".tsv" else ",")
        elif suffix == ".json":
            _read_coco(source, collector)
        else:
            raise InputError(f"{source}: unknown caption format {suffix or '(no suffix)'}; "
                             f"accepted: {ACCEPTED_FORMATS}")

    items = _drop_unusable_images(collector, decode=check_images, workers=workers, progress=progress)
    captions = CaptionSet(items=items, source=source, skipped=collector.skipped)
    if not items:
        raise InputError(f"no usable image–caption pairs in {source}: {_why_empty(captions)}")
    if captions.skipped:
        log.warning("%s: %s", source, describe_skips(captions.skipped))
    return captions


def split_by_image(items: list[CaptionedImage], val_fraction: float = 0.1, seed: int = 0,
                   val_size: int | None = None) -> tuple[list[CaptionedImage], list[CaptionedImage]]:
    """Seeded (train, val) split of whole images, both in input order.

    Entries sharing an image path move together, so no image's captions land on both sides.
    ``val_size`` (a number of images) overrides ``val_fraction``. With two or more images a
    fraction that rounds to 0 or to everything still leaves one image on each side; only an
    explicit ``val_fraction=0`` or ``val_size=0`` gives an empty validation side.
    """
    if not 0 <= val_fraction < 1:
        raise InputError(f"val_fraction must be in [0, 1), got {val_fraction}")
    groups: dict[Path, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(item.image, []).append(index)
    images = list(groups)
    if val_size is not None:
        if val_size < 0:
            raise InputError(f"val_size must be 0 or more, got {val_size}")
        if val_size and val_size >= len(images):
            raise InputError(f"val_size {val_size} leaves no training images: there are only {len(images)} images")
        wanted = val_size
    elif val_fraction == 0 or len(images) < 2:
        wanted = 0
    else:
        wanted = min(max(round(len(images) * val_fraction), 1), len(images) - 1)
    random.Random(seed).shuffle(images)
    val_indices = {index for image in images[:wanted] for index in groups[image]}
    train = [item for index, item in enumerate(items) if index not in val_indices]
    val = [item for index, item in enumerate(items) if index in val_indices]
    return train, val


class _BadRecord(Exception):
    """A record that cannot be used; the message is the reason shown to the user."""


class _Collector:
    """Records in first-seen image order with duplicates merged, and problems kept or raised."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.items: dict[Path, CaptionedImage] = {}
        self.first_seen: dict[Path, str] = {}  # image -> "file:line" that first named it, for strict errors
        self.skipped: list[tuple[str, str]] = []

    def add(self, image: Path, captions: list[str], where: str) -> None:
        if image in self.items:
            self.items[image].captions.extend(captions)
        else:
            self.items[image] = CaptionedImage(image=image, captions=captions)
            self.first_seen[image] = where

    def skip(self, what: str, reason: str, named_at: str | None = None) -> None:
        if self.strict:
            raise InputError(f"{named_at}: {what}: {reason}" if named_at else f"{what}: {reason}")
        self.skipped.append((what, reason))


def _resolve(base: Path, name: str) -> Path:
    # normpath, not resolve(): collapse "..", but keep symlinked paths as the user wrote them.
    # String joins, because building Paths piecewise dominates the cost of reading a big file.
    return Path(os.path.normpath(os.path.join(base, os.path.expanduser(name))))


def _image_name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _BadRecord("no image path" if value is None else f"image must be a non-empty string, got {value!r}")
    return value.strip()


def _clean_captions(value: Any) -> list[str]:
    """Stripped captions with blank ones dropped; a lone string counts as one caption."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise _BadRecord(f"captions must be a list of strings, got {type(value).__name__}")
    for caption in value:
        if not isinstance(caption, str):
            raise _BadRecord(f"caption {caption!r} is not a string")
    captions = [caption.strip() for caption in value if caption.strip()]
    if not captions:
        raise _BadRecord("no captions (the list is empty or blank)")
    return captions


def _read_jsonl(source: Path, out: _Collector) -> None:
    with source.open("rb") as handle:  # bytes, so one badly encoded line is skipped, not fatal
        for line_number, raw in enumerate(handle, 1):
            where = f"{source}:{line_number}"
            try:
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
                if not line.strip():
                    continue
                record = _parse_json_line(line)
                if "captions" in record:
                    captions = _clean_captions(record["captions"])
                elif "caption" in record:
                    captions = _clean_captions(record["caption"])
                else:
                    raise _BadRecord('no "captions" or "caption" field')
                out.add(_resolve(source.parent, _image_name(record.get("image"))), captions, where)
            except UnicodeDecodeError:
                out.skip(where, "not UTF-8 text")
            except _BadRecord as exc:
                out.skip(where, str(exc))


def _parse_json_line(line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _BadRecord(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise _BadRecord(f"expected a JSON object, got {type(record).__name__}")
    return record


def _read_table(source: Path, out: _Collector, delimiter: str) -> None:
    with source.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        try:
            header = reader.fieldnames
            if not header:
                raise InputError(f"{source}: empty file; expected a header row with image and caption columns")
            image_column = _pick_column(source, header, IMAGE_COLUMNS, "image")
            caption_column = _pick_column(source, header, CAPTION_COLUMNS, "caption")
            for row in reader:
                where = f"{source}:{reader.line_num}"  # the row's last line; rows rarely span lines
                image = (row.get(image_column) or "").strip()
                caption = (row.get(caption_column) or "").strip()
                if not image:
                    out.skip(where, "empty image field")
                elif not caption:
                    out.skip(where, "empty caption")
                else:
                    out.add(_resolve(source.parent, image), [caption], where)
        except UnicodeDecodeError as exc:
            raise InputError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except csv.Error as exc:
            kind = "TSV" if delimiter == "\t" else "CSV"
            raise InputError(f"{source}:{reader.line_num}: unreadable {kind} ({exc})") from None


def _pick_column(source: Path, header: list[str], names: tuple[str, ...], role: str) -> str:
    by_name = {column.strip().lower(): column for column in header if column}
    for name in names:
        if name in by_name:
            return by_name[name]
    raise InputError(f"{source}: no {role} column in header {header}; expected one of {', '.join(names)}")


def _read_coco(source: Path, out: _Collector) -> None:
    try:
        data = json.loads(source.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{source}: not a valid JSON file ({exc})") from None
    if not (isinstance(data, dict) and isinstance(data.get("images"), list)
            and isinstance(data.get("annotations"), list)):
        raise InputError(f'{source}: a .json caption file must be COCO captions, an object with "images" and '
                         f'"annotations" lists (for one record per line use .jsonl)')

    file_names: dict[int | str, tuple[str, str]] = {}  # image id -> (file_name, where)
    for index, entry in enumerate(data["images"]):
        where = f"{source}:images[{index}]"
        try:
            if not isinstance(entry, dict):
                raise _BadRecord(f"expected an object, got {type(entry).__name__}")
            image_id = _coco_id(entry.get("id"), "id")
            if image_id in file_names:
                raise _BadRecord(f"duplicate image id {image_id!r}")
            file_names[image_id] = (_image_name(entry.get("file_name")), where)
        except _BadRecord as exc:
            out.skip(where, str(exc))

    captions: dict[int | str, list[str]] = {}
    for index, annotation in enumerate(data["annotations"]):
        where = f"{source}:annotations[{index}]"
        try:
            if not isinstance(annotation, dict):
                raise _BadRecord(f"expected an object, got {type(annotation).__name__}")
            image_id = _coco_id(annotation.get("image_id"), "image_id")
            if image_id not in file_names:
                raise _BadRecord(f'image_id {image_id!r} is not in "images"')
            caption = annotation.get("caption")
            if not isinstance(caption, str):
                raise _BadRecord('no "caption" field' if caption is None else f"caption {caption!r} is not a string")
            captions.setdefault(image_id, []).extend(_clean_captions(caption))
        except _BadRecord as exc:
            out.skip(where, str(exc))

    root = _coco_image_root(source, [name for name, _ in file_names.values()])
    for image_id, (file_name, where) in file_names.items():
        if image_id in captions:
            out.add(_resolve(root, file_name), captions[image_id], where)
        else:
            out.skip(where, f'{file_name}: no captions in "annotations"')


def _coco_id(value: Any, key: str) -> int | str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _BadRecord(f"{key} must be an integer or a string, got {value!r}")
    return value


def _coco_image_root(source: Path, file_names: list[str]) -> Path:
    """The folder that holds the most of the first 50 relative file_names (earliest on ties)."""
    folder = source.parent
    candidates = [folder, folder / "images", folder / source.stem]
    if source.stem.startswith("captions_"):  # annotations/captions_val2017.json -> ../val2017/
        candidates.append(folder.parent / source.stem.removeprefix("captions_"))
    sample = [name for name in file_names if not Path(name).is_absolute()][:50]
    if not sample:
        return folder
    return max(candidates, key=lambda root: sum((root / name).is_file() for name in sample))


def _read_sidecar_folder(root: Path, out: _Collector) -> None:
    for image in list_images(root):
        sidecar = image.with_suffix(".txt")
        if not sidecar.is_file():
            out.skip(str(image), "no .txt caption file beside it")
            continue
        try:
            text = sidecar.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            out.skip(str(sidecar), "not UTF-8 text")
            continue
        captions = [line.strip() for line in text.splitlines() if line.strip()]
        if captions:
            out.add(image, captions, str(sidecar))
        else:
            out.skip(str(sidecar), "no captions (the file is empty)")


def _drop_unusable_images(out: _Collector, decode: bool, workers: int, progress: bool) -> list[CaptionedImage]:
    """The collected items whose image exists (and, with decode, opens fully), in order."""
    items = list(out.items.values())
    usable = []
    paths = [item.image for item in items]
    # Pillow releases the GIL while decoding, so threads give real parallelism; a stat needs none.
    problems = (ordered_map(_image_problem, paths, max(1, workers), read_ahead=max(64, 4 * workers), threads=True)
                if decode else map(_missing_problem, paths))
    with progress_bar(total=len(items), desc="checking images", unit="img", disable=not progress) as bar, \
            closing(problems) if decode else nullcontext():  # strict: stop decoding after the first failure
        for item, problem in zip(items, problems):
            bar.update()
            if problem:
                out.skip(str(item.image), problem, named_at=out.first_seen[item.image])
            else:
                usable.append(item)
    return usable


def _image_problem(path: Path) -> str | None:
    """Why the image cannot be used (decoded fully, as training will), or None."""
    try:
        load_image(path)
    except ImageInputError as exc:
        return exc.reason
    except MemoryError:
        return "ran out of memory while decoding it"
    return None


def _missing_problem(path: Path) -> str | None:
    """Why the file cannot be read as an image, from its metadata only (a FIFO, a device, a folder)."""
    return file_problem(path)


def _why_empty(captions: CaptionSet) -> str:
    if captions.skipped:
        reason = describe_skips(captions.skipped)
    elif captions.source.is_dir():
        reason = "no image files in it"
    else:
        reason = "it holds no records"
    if captions.source.is_dir():
        # A folder holding a caption file was most likely meant as that file.
        files = sorted(p.name for p in captions.source.iterdir() if p.suffix.lower() in _CAPTION_FILE_SUFFIXES)
        if files:
            reason += f" (to read a caption file, pass it instead of the folder: {', '.join(files)})"
    return reason
