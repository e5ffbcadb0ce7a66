"""Which files an `index` run reads and which indexed items it may drop: links (inside, outside,
same file twice, dangling, loops), special files, unreadable files and folders, the removal
guard (--prune), a missing folder, and the roots recorded in the manifest."""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import random_image
from fakes import ColourEmbedder
from mmretrieve.cli import cli
from mmretrieve.errors import InputError
from mmretrieve.index.builder import index_images
from mmretrieve.index.scan import scan_files
from mmretrieve.index.store import IndexStore


FakeEmbedder = functools.partial(ColourEmbedder, "fake-scan-model", 8)


def build(root, index_dir, **options):
    options.setdefault("workers", 0)
    options.setdefault("progress", False)
    return index_images(root, index_dir, FakeEmbedder(), **options)


def indexed(index_dir) -> set[str]:
    store = IndexStore.open(index_dir)
    try:
        return set(store.known_files())
    finally:
        store.close()


def photos(folder, count, start=0):
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(start, start + count):
        random_image(n).save(folder / f"img{n:02d}.png")
    return folder


# -- manifest roots --------------------------------------------------------------------------
def test_manifest_lists_each_indexed_root_once_resolved(tmp_path):
    first, second = photos(tmp_path / "a", 2), photos(tmp_path / "b", 1, start=5)
    os.symlink(first, tmp_path / "alias")
    build(tmp_path / "alias", tmp_path / "idx")
    build(second, tmp_path / "idx")
    build(first, tmp_path / "idx")  # the same folder by its real name: no new entry, nothing to publish
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["roots"] == [str(first.resolve()), str(second.resolve())]


# -- links and special files -----------------------------------------------------------------
def reasons(skipped) -> dict[str, str]:
    return {os.path.basename(s["path"]): s["reason"] for s in skipped}


@pytest.fixture
def linked_folder(tmp_path):
    """photos/ with two images, a link to one of them, a link out, a dangling link, a loop, a
    self-link, a FIFO and a link to /dev/zero (named like images); outside/ holds one image."""
    root = photos(tmp_path / "photos", 2)
    photos(tmp_path / "outside", 1, start=7)
    os.symlink("img00.png", root / "same.png")
    os.symlink(tmp_path / "outside" / "img07.png", root / "out.png")
    os.symlink("nowhere.png", root / "dangling.png")
    os.symlink(".", root / "loop")
    os.symlink("self.png", root / "self.png")
    os.mkfifo(root / "pipe.jpg")
    os.symlink("/dev/zero", root / "zero.jpg")
    return root


def test_scan_takes_regular_files_once_and_lists_every_link_and_special_file_it_passes_over(linked_folder):
    scan = scan_files(linked_folder)
    assert [os.path.basename(s.path) for s in scan.files] == ["img00.png", "img01.png"]
    why = reasons(scan.skipped)
    assert set(why) == {"same.png", "out.png", "dangling.png", "loop", "self.png", "pipe.jpg", "zero.jpg"}
    assert why["same.png"] == f"the same file as {linked_folder / 'img00.png'}, indexed once"
    assert "outside the folder; pass --follow-links" in why["out.png"] and "outside the folder" in why["zero.jpg"]
    assert why["dangling.png"].startswith("a dangling link")
    assert why["loop"].startswith("a link loop") and why["self.png"].startswith("a link loop")
    assert why["pipe.jpg"] == "is a FIFO (named pipe), not an image file"


def test_follow_links_indexes_outside_targets_under_the_links_own_path_but_never_reads_a_device(linked_folder):
    scan = scan_files(linked_folder, follow_links=True)
    assert [os.path.basename(s.path) for s in scan.files] == ["img00.png", "img01.png", "out.png"]
    assert scan.files[-1].path == str(linked_folder.resolve() / "out.png")  # recorded as found, not resolved
    why = reasons(scan.skipped)
    assert why["zero.jpg"] == "is a device, not an image file" and why["pipe.jpg"].startswith("is a FIFO")
    assert "out.png" not in why


def test_a_file_reached_through_a_link_first_is_still_taken_by_its_own_path(tmp_path):
    root = photos(tmp_path / "photos" / "zz-real", 1)
    os.symlink("zz-real", tmp_path / "photos" / "aa-alias")  # sorts first
    os.symlink("zz-real/img00.png", tmp_path / "photos" / "aa.png")
    scan = scan_files(tmp_path / "photos")
    assert [s.path for s in scan.files] == [str(root / "img00.png")]
    why = reasons(scan.skipped)
    assert why["aa-alias"] == f"the same folder as {root}, scanned once"
    assert why["aa.png"].startswith("the same file as")


def test_a_folder_link_loop_under_follow_links_is_listed_not_walked_forever(tmp_path):
    root = photos(tmp_path / "photos", 1)
    other = photos(tmp_path / "other", 1, start=3)
    os.symlink(other, root / "other")
    os.symlink(root, other / "back")  # photos/other/back -> photos
    scan = scan_files(root, follow_links=True)
    assert sorted(os.path.basename(s.path) for s in scan.files) == ["img00.png", "img03.png"]
    assert reasons(scan.skipped)["back"].startswith("a link loop")


def test_a_removed_link_vanishes_from_the_index(linked_folder, tmp_path):
    build(linked_folder, tmp_path / "idx", follow_links=True)
    out = str(linked_folder / "out.png")
    assert out in indexed(tmp_path / "idx")
    os.unlink(out)
    report = build(linked_folder, tmp_path / "idx")
    assert report.removed == 1 and out not in indexed(tmp_path / "idx")
    assert str(tmp_path / "outside" / "img07.png") not in indexed(tmp_path / "idx")


def test_index_report_lists_skips_and_embeds_a_same_folder_link_once(linked_folder, tmp_path):
    report = build(linked_folder, tmp_path / "idx")
    assert (report.added, report.total, report.failed) == (2, 2, [])
    assert set(reasons(report.skipped)) == {"same.png", "out.png", "dangling.png", "loop", "self.png", "pipe.jpg",
                                            "zero.jpg"}


def test_cli_index_lists_skips_in_the_summary_and_in_json(linked_folder, tmp_path, monkeypatch):
    import mmretrieve.runtime as runtime

    monkeypatch.setattr(runtime, "load_embedder", lambda *a, **k: FakeEmbedder())
    args = ["index", str(linked_folder), "--model", "fake", "--index-dir", str(tmp_path / "idx"), "--workers", "0"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "failed 0, skipped 7;" in result.stdout
    assert f"skipped {linked_folder / 'pipe.jpg'}: is a FIFO (named pipe), not an image file" in result.stderr
    result = CliRunner().invoke(cli, args + ["--json", "--follow-links"])
    report = json.loads(result.stdout)
    assert report["added"] == 1 and len(report["skipped"]) == 6


# -- unreadable files and folders ------------------------------------------------------------
def refuse(paths, exception=PermissionError):
    """A stand-in for a permission bit (tests run as root, which reads a chmod 000 file)."""
    def wrap(function):
        def refusing(path, *args, **kwargs):
            if os.path.basename(str(path)) in paths:
                raise exception(13, "Permission denied", str(path))
            return function(path, *args, **kwargs)
        return refusing
    return wrap


def test_an_indexed_file_that_became_unreadable_is_skipped_and_kept(tmp_path, monkeypatch):
    import mmretrieve.index.scan as scan

    root = photos(tmp_path / "photos", 3)
    build(root, tmp_path / "idx")
    os.utime(root / "img00.png", ns=(1, 1))  # a new mtime: the scan would hash it
    random_image(50).save(root / "img01.png")  # new content: it would be re-embedded
    random_image(51).save(root / "img05.png")  # a new file that cannot be read
    monkeypatch.setattr(scan, "sha256_file", refuse({"img00.png"})(scan.sha256_file))
    monkeypatch.setattr(os, "open", refuse({"img01.png", "img05.png"})(os.open))
    report = build(root, tmp_path / "idx")
    why = reasons(report.skipped)
    assert why["img00.png"] == "cannot be read (Permission denied); what was indexed for it is kept"
    assert why["img01.png"].endswith("what was indexed for it is kept")
    assert why["img05.png"] == "cannot be read (Permission denied)"  # new: nothing to keep
    assert (report.added, report.updated, report.removed, report.total, report.failed) == (0, 0, 0, 3, [])
    assert len(indexed(tmp_path / "idx")) == 3


def test_an_unreadable_subfolder_keeps_its_items_and_is_listed(tmp_path, monkeypatch):
    root = photos(tmp_path / "photos", 2)
    photos(root / "sub", 2, start=4)
    build(root, tmp_path / "idx")
    monkeypatch.setattr(os, "scandir", refuse({"sub"})(os.scandir))
    report = build(root, tmp_path / "idx")
    assert (report.removed, report.total) == (0, 4)
    assert reasons(report.skipped)["sub"].startswith("folder cannot be read (Permission denied)")
    monkeypatch.undo()
    (root / "sub" / "img04.png").unlink()
    assert build(root, tmp_path / "idx").removed == 1  # readable again: a vanished file vanishes


# -- the removal guard -----------------------------------------------------------------------
def test_a_run_that_would_remove_most_items_is_refused_before_anything_changes_unless_pruned(tmp_path):
    root = photos(tmp_path / "photos", 30)
    index_dir = tmp_path / "idx"
    build(root, index_dir)
    manifest = (index_dir / "manifest.json").read_text()
    with pytest.raises(InputError) as refused:
        build(root, index_dir, include=("img0*",))  # keeps 10 of 30
    assert str(refused.value) == (f"this run would remove 20 of the 30 indexed items under {root} (is the disk "
                                  f"mounted? did --include or --exclude narrow?); pass --prune to remove them")
    assert (index_dir / "manifest.json").read_text() == manifest and len(indexed(index_dir)) == 30
    report = build(root, index_dir, include=("img0*",), prune=True)
    assert (report.removed, report.total) == (20, 10)


def test_a_small_removal_proceeds_and_an_emptied_folder_needs_prune(tmp_path):
    root = photos(tmp_path / "photos", 12)
    index_dir = tmp_path / "idx"
    build(root, index_dir)
    for n in range(10):  # 10 of 12: not more than max(10, 20%)
        (root / f"img{n:02d}.png").unlink()
    assert build(root, index_dir).removed == 10
    for name in os.listdir(root):
        os.unlink(root / name)
    with pytest.raises(InputError, match="would remove 2 of the 2 indexed items"):
        build(root, index_dir)  # everything under the folder gone (an unmounted disk)
    assert build(root, index_dir, prune=True).total == 0


def test_cli_prune_flag(tmp_path, monkeypatch):
    import mmretrieve.runtime as runtime

    monkeypatch.setattr(runtime, "load_embedder", lambda *a, **k: FakeEmbedder())
    root = photos(tmp_path / "photos", 30)
    args = ["index", str(root), "--model", "fake", "--index-dir", str(tmp_path / "idx"), "--workers", "0"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    refused = CliRunner().invoke(cli, args + ["--include", "img2*"])
    assert refused.exit_code == 1 and "would remove 20 of the 30 indexed items" in refused.output
    assert "Traceback" not in refused.output
    pruned = CliRunner().invoke(cli, args + ["--include", "img2*", "--prune"])
    assert pruned.exit_code == 0 and "removed 20" in pruned.stdout


# -- a missing folder ------------------------------------------------------------------------
def test_a_missing_folder_fails_before_the_index_folder_is_made(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="typo: no such file or folder"):
        build(tmp_path / "typo", tmp_path / "idx")
    assert not (tmp_path / "idx").exists()
    import mmretrieve.runtime as runtime

    monkeypatch.setattr(runtime, "load_embedder", lambda *a, **k: pytest.fail("loaded a model for a missing folder"))
    result = CliRunner().invoke(cli, ["index", str(tmp_path / "typo"), "--index-dir", str(tmp_path / "idx2")])
    assert result.exit_code == 1 and "typo: no such file or folder" in result.output
    assert not (tmp_path / "idx2").exists()


def test_api_checks_the_folder_before_loading_a_model_and_takes_prune(tmp_path, monkeypatch):
    import mmretrieve.api as mm
    import mmretrieve.runtime as runtime

    monkeypatch.setattr(runtime, "load_embedder", lambda *a, **k: pytest.fail("loaded a model for a missing folder"))
    with pytest.raises(InputError, match="typo: no such file or folder"):
        mm.build_index(tmp_path / "typo", model="fake", index_dir=tmp_path / "idx")
    assert not (tmp_path / "idx").exists()
    monkeypatch.setattr(runtime, "load_embedder", lambda *a, **k: FakeEmbedder())
    root = photos(tmp_path / "photos", 30)
    index = mm.build_index(root, model="fake", index_dir=tmp_path / "idx", workers=0, progress=False)
    with pytest.raises(InputError, match="would remove 20 of the 30"):
        index.update(root, include=["img2*"], workers=0, progress=False)
    assert index.update(root, include=["img2*"], prune=True, workers=0, progress=False).removed == 20


def test_a_fifo_given_as_the_folder_is_refused_without_being_opened(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")  # opening it for reading would wait for a writer forever
    with pytest.raises(InputError, match="pipe.jpg is a FIFO"):
        build(tmp_path / "pipe.jpg", tmp_path / "idx")
    assert not (tmp_path / "idx").exists()
