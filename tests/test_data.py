from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BAD_IMAGES, GOOD_IMAGES, random_image
from mmretrieve.data import CaptionedImage, CaptionSet, load_captions, split_by_image
from mmretrieve.errors import InputError

FLICKR_DEV = Path(__file__).resolve().parents[2] / "shared/data/flickr8k-dev/captions.jsonl"  # ../shared beside the repo


def write_jsonl(path: Path, lines: list) -> Path:
    """Objects are dumped as JSON; strings are written verbatim (for malformed lines)."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def make_images(folder: Path, *names: str) -> None:
    for seed, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        random_image(seed, (16, 12)).save(folder / name)


def captions_by_name(captions: CaptionSet) -> dict[str, list[str]]:
    return {item.image.name: item.captions for item in captions.items}


def test_jsonl_resolves_relative_paths_and_merges_duplicates(tmp_path):
    data = tmp_path / "data"
    make_images(data, "images/a.jpg", "images/b.png")
    make_images(tmp_path, "elsewhere/c.jpg", "absolute/d.jpg")
    path = write_jsonl(data / "captions.jsonl", [
        {"image": "images/a.jpg", "captions": ["  a dog ", "a brown dog"]},
        "",
        {"image": "images/b.png", "caption": "a cat"},
        {"image": "../elsewhere/c.jpg", "captions": ["a bird", "   "]},
        {"image": str(tmp_path / "absolute" / "d.jpg"), "captions": ["a fish"]},
        {"image": "./images/a.jpg", "captions": ["a dog running"]},
    ])

    captions = load_captions(path)

    assert [item.image for item in captions.items] == [
        data / "images" / "a.jpg", data / "images" / "b.png", tmp_path / "elsewhere" / "c.jpg",
        tmp_path / "absolute" / "d.jpg"]
    assert all(item.image.is_absolute() for item in captions.items)
    assert captions.items[0].captions == ["a dog", "a brown dog", "a dog running"]
    assert captions_by_name(captions)["b.png"] == ["a cat"]
    assert captions_by_name(captions)["c.jpg"] == ["a bird"]  # blank captions dropped
    assert (len(captions), captions.num_captions, captions.skipped) == (4, 6, [])
    assert captions.summary() == f"4 images, 6 captions from {path}"


def test_relative_data_path_resolves_against_the_file_not_the_working_dir(tmp_path, monkeypatch):
    make_images(tmp_path / "set", "pics/a.jpg")
    write_jsonl(tmp_path / "set" / "captions.jsonl", [{"image": "pics/a.jpg", "captions": ["x"]}])
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")

    captions = load_captions("../set/captions.jsonl")

    assert captions.source == tmp_path / "set" / "captions.jsonl"
    assert captions.items[0].image == tmp_path / "set" / "pics" / "a.jpg"


def test_csv_groups_rows_of_one_image_in_first_seen_order(tmp_path):
    make_images(tmp_path, "img/b.jpg", "img/a.jpg")
    path = tmp_path / "pairs.csv"
    path.write_text('image,caption\nimg/b.jpg,"first, with a comma"\nimg/a.jpg,only one\n'
                    "img/b.jpg,second\n\nimg/b.jpg,third\n", encoding="utf-8")

    captions = load_captions(path)

    assert [item.image.name for item in captions.items] == ["b.jpg", "a.jpg"]
    assert captions.items[0].captions == ["first, with a comma", "second", "third"]
    assert captions.items[1].captions == ["only one"]


def test_tsv_with_alias_columns(tmp_path):
    make_images(tmp_path, "a.jpg")
    path = tmp_path / "pairs.tsv"
    path.write_text("id\tFilepath\tTitle\n1\ta.jpg\ta red, round thing\n2\ta.jpg\t\n", encoding="utf-8")

    captions = load_captions(path)

    assert captions.items == [CaptionedImage(tmp_path / "a.jpg", ["a red, round thing"])]
    assert captions.skipped == [(f"{path}:3", "empty caption")]


def test_csv_without_a_caption_column_is_refused(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("image,label\na.jpg,dog\n")
    with pytest.raises(InputError, match="no caption column"):
        load_captions(path)


def test_coco_json_with_images_in_an_images_folder(tmp_path):
    make_images(tmp_path / "images", "1.jpg", "2.jpg", "3.jpg")
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"},
                   {"id": 3, "file_name": "3.jpg"}],
        "annotations": [{"image_id": 2, "caption": "two a"}, {"image_id": 1, "caption": "one"},
                        {"image_id": 2, "caption": "two b"}, {"image_id": 9, "caption": "lost"}],
    }))

    captions = load_captions(path)

    assert captions.items == [CaptionedImage(tmp_path / "images" / "1.jpg", ["one"]),
                              CaptionedImage(tmp_path / "images" / "2.jpg", ["two a", "two b"])]
    assert captions.skipped == [(f"{path}:annotations[3]", 'image_id 9 is not in "images"'),
                                (f"{path}:images[2]", '3.jpg: no captions in "annotations"')]


def test_coco_json_in_the_official_layout_and_next_to_its_images(tmp_path):
    coco = {"images": [{"id": "x", "file_name": "p.jpg"}], "annotations": [{"image_id": "x", "caption": "a p"}]}
    make_images(tmp_path / "coco" / "val2017", "p.jpg")
    official = tmp_path / "coco" / "annotations" / "captions_val2017.json"
    official.parent.mkdir()
    official.write_text(json.dumps(coco))
    make_images(tmp_path / "flat", "p.jpg")
    flat = tmp_path / "flat" / "val.json"
    flat.write_text(json.dumps(coco))

    assert load_captions(official).items[0].image == tmp_path / "coco" / "val2017" / "p.jpg"
    assert load_captions(flat).items[0].image == tmp_path / "flat" / "p.jpg"


def test_plain_json_that_is_not_coco_is_refused(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps([{"image": "a.jpg", "captions": ["x"]}]))
    with pytest.raises(InputError, match="COCO captions.*use .jsonl"):
        load_captions(path)


def test_folder_with_txt_sidecars_recursively(messy_image_folder):
    (messy_image_folder / "a.txt").write_text("a first\n\n  a second  \n")
    (messy_image_folder / "holiday" / "b.txt").write_text("b only")
    (messy_image_folder / "holiday" / "tall.txt").write_text("\n \n")

    captions = load_captions(messy_image_folder, check_images=False)

    assert captions_by_name(captions) == {"a.jpg": ["a first", "a second"], "b.png": ["b only"]}
    skipped = dict(captions.skipped)
    assert skipped[str(messy_image_folder / "holiday" / "tall.txt")] == "no captions (the file is empty)"
    webp = messy_image_folder / "holiday" / "day 2" / "café ☕.webp"
    assert skipped[str(webp)] == "no .txt caption file beside it"
    # Every image but a.jpg and b.png is skipped once (tall.bmp via its empty tall.txt); the hidden
    # file and notes.txt are not images, so not counted.
    assert len(captions.skipped) == len(GOOD_IMAGES | BAD_IMAGES) - 2


def test_folder_of_images_without_sidecars_points_at_its_caption_file(tmp_path):
    make_images(tmp_path, "images/a.jpg")
    write_jsonl(tmp_path / "captions.jsonl", [{"image": "images/a.jpg", "captions": ["x"]}])
    with pytest.raises(InputError, match=r"no usable image–caption pairs .*instead of the folder: captions.jsonl"):
        load_captions(tmp_path)


MALFORMED = [
    {"image": "a.jpg", "captions": ["good"]},
    '{"image": "a.jpg", "captions": [',
    {"captions": ["no image"]},
    {"image": "a.jpg"},
    {"image": "a.jpg", "captions": []},
    {"image": "a.jpg", "captions": ["fine", 3]},
    '["a.jpg", "x"]',
    {"image": "", "caption": "x"},
]


def test_malformed_jsonl_lines_are_skipped_with_their_line_numbers(tmp_path, caplog):
    make_images(tmp_path, "a.jpg")
    path = write_jsonl(tmp_path / "c.jsonl", MALFORMED)

    with caplog.at_level(logging.WARNING, logger="mmretrieve.data"):
        captions = load_captions(path)

    assert captions.items == [CaptionedImage(tmp_path / "a.jpg", ["good"])]
    assert [what for what, _ in captions.skipped] == [f"{path}:{line}" for line in range(2, 9)]
    reasons = [reason for _, reason in captions.skipped]
    assert reasons[0].startswith("not valid JSON")
    assert reasons[1:] == ["no image path", 'no "captions" or "caption" field',
                           "no captions (the list is empty or blank)", "caption 3 is not a string",
                           "expected a JSON object, got list", "image must be a non-empty string, got ''"]
    # One warning for the whole file, with the count and the first few, not one per line.
    [record] = caplog.records
    assert "7 skipped" in record.getMessage() and f"{path}:2" in record.getMessage()
    assert "and 4 more" in record.getMessage()
    assert captions.summary().startswith(f"1 images, 1 captions from {path} (7 skipped: {path}:2: not valid JSON")


def test_malformed_jsonl_line_raises_under_strict(tmp_path):
    make_images(tmp_path, "a.jpg")
    path = write_jsonl(tmp_path / "c.jsonl", MALFORMED)
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}:2: not valid JSON"):
        load_captions(path, strict=True)


def test_bad_and_missing_images_are_skipped(messy_image_folder, caplog):
    names = sorted(GOOD_IMAGES | BAD_IMAGES) + ["missing.jpg"]
    paths = {path.name: path for path in messy_image_folder.rglob("*")}
    path = write_jsonl(messy_image_folder / "c.jsonl", [
        {"image": str(paths.get(name, messy_image_folder / name)), "captions": [f"photo {name}"]} for name in names])

    captions = load_captions(path, workers=3, progress=True)

    assert {item.image.name for item in captions.items} == GOOD_IMAGES
    skipped = {Path(what).name: reason for what, reason in captions.skipped}
    assert set(skipped) == BAD_IMAGES | {"missing.jpg"}
    assert skipped["missing.jpg"] == "no such file"
    assert skipped["zero.jpg"] == "not an image file Pillow can read"
    assert skipped["corrupt.png"].startswith("unreadable image")
    assert skipped["truncated.jpg"].startswith("unreadable image (image file is truncated")
    assert len([r for r in caplog.records if r.name == "mmretrieve.data"]) == 1

    # Without decoding only existence is checked, so the broken files pass.
    unchecked = load_captions(path, check_images=False)
    assert {item.image.name for item in unchecked.items} == GOOD_IMAGES | BAD_IMAGES
    assert unchecked.skipped == [(str(messy_image_folder / "missing.jpg"), "no such file")]


@pytest.mark.parametrize("bad", ["zero.jpg", "corrupt.png", "truncated.jpg", "missing.jpg"])
def test_a_bad_image_raises_under_strict_naming_the_line_and_image(messy_image_folder, bad):
    path = write_jsonl(messy_image_folder / "c.jsonl", [
        {"image": "a.jpg", "captions": ["fine"]}, {"image": bad, "captions": ["broken"]}])
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}:2: {re.escape(str(messy_image_folder / bad))}: "):
        load_captions(path, strict=True)


def test_no_usable_pairs_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"image": "gone.jpg", "captions": ["x"]}])
    with pytest.raises(InputError, match=r"no usable image–caption pairs in .*c.jsonl: 1 skipped: .*gone.jpg: no"):
        load_captions(path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(InputError, match="no usable image–caption pairs in .*empty.jsonl: it holds no records"):
        load_captions(empty)


def test_missing_file_and_unknown_format_are_refused(tmp_path):
    with pytest.raises(InputError, match="no such caption file"):
        load_captions(tmp_path / "nope.jsonl")
    unknown = tmp_path / "captions.xml"
    unknown.write_text("<captions/>")
    with pytest.raises(InputError, match=r"unknown caption format \.xml; accepted: a \.jsonl file.*\.csv or \.tsv"
                                         r".*COCO captions \.json.*folder of images"):
        load_captions(unknown)


def test_the_module_does_not_import_torch():
    code = "import sys, mmretrieve.data; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def items_named(count: int) -> list[CaptionedImage]:
    return [CaptionedImage(Path(f"/data/{index}.jpg"), [f"caption {index}"]) for index in range(count)]


def test_split_keeps_each_image_on_one_side_and_is_deterministic():
    items = items_named(50)
    items.append(CaptionedImage(Path("/data/7.jpg"), ["a second entry for image 7"]))

    train, val = split_by_image(items, val_fraction=0.2, seed=3)

    assert {item.image for item in train}.isdisjoint({item.image for item in val})
    assert len(train) + len(val) == len(items)
    assert len({item.image for item in val}) == 10
    assert split_by_image(items, val_fraction=0.2, seed=3) == (train, val)
    assert split_by_image(items, val_fraction=0.2, seed=4)[1] != val
    assert train == [item for item in items if item in train]  # input order kept


def test_split_val_size_overrides_the_fraction_and_sides_are_never_empty():
    assert len(split_by_image(items_named(50), val_fraction=0.5, val_size=7)[1]) == 7
    train, val = split_by_image(items_named(3), val_fraction=0.01)
    assert (len(train), len(val)) == (2, 1)
    train, val = split_by_image(items_named(2), val_fraction=0.9)
    assert (len(train), len(val)) == (1, 1)
    assert split_by_image(items_named(5), val_fraction=0) == (items_named(5), [])
    assert split_by_image(items_named(1)) == (items_named(1), [])


@pytest.mark.parametrize("kwargs", [{"val_fraction": 1.0}, {"val_fraction": -0.1}, {"val_size": -1}, {"val_size": 10}])
def test_split_refuses_impossible_sizes(kwargs):
    with pytest.raises(InputError):
        split_by_image(items_named(10), **kwargs)


@pytest.mark.slow
@pytest.mark.skipif(not FLICKR_DEV.exists(), reason=f"{FLICKR_DEV} not present")
def test_flickr8k_dev_loads_completely():
    captions = load_captions(FLICKR_DEV)
    assert (len(captions), captions.num_captions, captions.skipped) == (500, 2500, [])
    assert all(len(item.captions) == 5 and item.image.is_file() for item in captions.items)
