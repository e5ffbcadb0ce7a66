"""The one reader of self-describing folders (formats.read_folder_manifest), through each of the
five readers built on it: model bundle, ONNX export, fusion bundle, index, vector index. Each
refuses a missing, unreadable, non-object, foreign or newer manifest with its own error type and
one sentence; with verification, a listed file that is missing or changed."""

import hashlib
import json

import pytest

from mmretrieve.errors import BundleError, IndexDamagedError, InputError
from mmretrieve.export import ExportError


def _bundle(folder):
    from mmretrieve.bundle import read_bundle_info

    return read_bundle_info(folder, verify=True)


def _export(folder):
    from mmretrieve.export.manifest import read_export_info

    return read_export_info(folder, verify=True)


def _fusion(folder):
    from mmretrieve.fusion.store import read_fusion_info

    return read_fusion_info(folder)


def _index(folder):
    from mmretrieve.index.store import read_manifest

    return read_manifest(folder)


def _vectors(folder):
    from mmretrieve.index.base import read_meta

    return read_meta(folder)


# reader, manifest file, format, extra fields a valid manifest has, error type, and the damage error type
READERS = {
    "bundle": (_bundle, "manifest.json", "mmretrieve-bundle", {"fingerprint": "f" * 32}, BundleError, BundleError),
    "export": (_export, "export.json", "mmretrieve-onnx-export", {"fingerprint": "f" * 32}, ExportError, ExportError),
    "fusion": (_fusion, "manifest.json", "mmretrieve-fusion", {}, BundleError, BundleError),
    "index": (_index, "manifest.json", "mmretrieve-index",
              {"modality": "image", "model": {"ref": "default", "fingerprint": "f" * 32}, "embed_dim": 4},
              InputError, IndexDamagedError),
    "vectors": (_vectors, "index.json", "mmretrieve-vector-index",
                {"kind": "flat", "dim": 4, "options": {}, "count": 0}, InputError, IndexDamagedError),
}
COMPANIONS = {"bundle": ("model.json", {"config": {}, "towers": {}}),
              "fusion": ("fusion.json", {"strategy": "gated", "dim": 4, "base_model_fingerprint": "f" * 32})}


def _folder(tmp_path, kind, **changes):
    """A folder of ``kind`` with a valid manifest (plus ``changes``) and one hashed data file."""
    _, name, format_name, extra, _, _ = READERS[kind]
    folder = tmp_path / kind
    folder.mkdir(parents=True)
    files = {}
    if kind in COMPANIONS:
        companion, content = COMPANIONS[kind]
        (folder / companion).write_text(json.dumps(content))
    if kind in ("bundle", "export", "fusion"):
        (folder / "data.bin").write_bytes(b"payload")
        files = {"data.bin": hashlib.sha256(b"payload").hexdigest()}
        if kind in COMPANIONS:
            companion = COMPANIONS[kind][0]
            files[companion] = hashlib.sha256((folder / companion).read_bytes()).hexdigest()
    manifest = {"format": format_name, "format_version": 1, **extra, "files": files, **changes}
    (folder / name).write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("kind", READERS)
def test_a_valid_folder_is_read(tmp_path, kind):
    READERS[kind][0](_folder(tmp_path, kind))


@pytest.mark.parametrize("kind", READERS)
@pytest.mark.parametrize("content, problem", [
    ("[1, 2]", "holds no JSON object"),
    ('{"format": ', "cannot be read as JSON"),
    (b"\xff\xfe{}", "cannot be read as JSON"),
])
def test_a_manifest_that_is_no_json_object_is_damage_in_one_sentence(tmp_path, kind, content, problem):
    reader, name, _, _, _, damage = READERS[kind]
    folder = _folder(tmp_path, kind)
    if isinstance(content, bytes):
        (folder / name).write_bytes(content)
    else:
        (folder / name).write_text(content)
    with pytest.raises(damage, match=f"{name} {problem}") as caught:
        reader(folder)
    assert str(folder) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("kind", READERS)
def test_another_format_and_a_newer_version_are_refused(tmp_path, kind):
    reader, _, _, _, error, _ = READERS[kind]
    with pytest.raises(error, match="is not an mmretrieve .*format 'something-else'"):
        reader(_folder(tmp_path / "a", kind, format="something-else"))
    with pytest.raises(error, match="newer than this mmretrieve.*pip install -U mmretrieve"):
        reader(_folder(tmp_path / "b", kind, format_version=99))


@pytest.mark.parametrize("kind", ["bundle", "export", "fusion"])
def test_verification_names_a_changed_or_missing_file(tmp_path, kind):
    reader, _, _, _, _, damage = READERS[kind]
    folder = _folder(tmp_path, kind)
    (folder / "data.bin").write_bytes(b"changed")
    with pytest.raises(damage, match="data.bin does not match its recorded hash"):
        reader(folder)
    (folder / "data.bin").unlink()
    with pytest.raises(damage, match="data.bin is missing"):
        reader(folder)


@pytest.mark.parametrize("kind, sentence", [
    ("bundle", "is not a model bundle (no manifest.json); train one with `mmretrieve train`"),
    ("export", "is not an ONNX export (no export.json); create one with `mmretrieve export"),
    ("fusion", "is not a fusion bundle (no manifest.json); train one first"),
    ("index", "holds no index (no manifest.json); build one with `mmretrieve index PATH`"),
])
def test_a_folder_without_a_manifest_is_not_one(tmp_path, kind, sentence):
    reader, _, _, _, error, _ = READERS[kind]
    (tmp_path / "empty").mkdir()
    with pytest.raises(error) as caught:
        reader(tmp_path / "empty")
    assert sentence in str(caught.value) and not isinstance(caught.value, IndexDamagedError)


def test_a_vector_folder_without_index_json_is_damaged(tmp_path):
    from mmretrieve.index.base import read_meta

    with pytest.raises(IndexDamagedError, match="index.json is missing"):
        read_meta(tmp_path)


def test_a_companion_file_that_is_no_object_is_damage(tmp_path):
    """model.json and fusion.json go through the same JSON-object check as the manifest."""
    for kind, error in (("bundle", BundleError), ("fusion", BundleError)):
        folder = _folder(tmp_path, kind)
        companion = COMPANIONS[kind][0]
        (folder / companion).write_text("null")
        manifest_name = READERS[kind][1]
        manifest = json.loads((folder / manifest_name).read_text())
        manifest["files"][companion] = hashlib.sha256(b"null").hexdigest()
        (folder / manifest_name).write_text(json.dumps(manifest))
        with pytest.raises(error, match=f"{companion} holds no JSON object"):
            READERS[kind][0](folder)
