"""Atomic writes publish complete files with ordinary permissions."""

import os
import stat

import pytest

from mmretrieve.atomic import atomic_directory, write_text_atomic


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_file_is_readable_by_others(tmp_path, umask_022):
    # A server running as another user must be able to read indexes and bundles we write.
    write_text_atomic(tmp_path / "a.json", "{}")
    assert mode(tmp_path / "a.json") == 0o644


def test_atomic_directory_is_published_with_ordinary_modes(tmp_path, umask_022):
    with atomic_directory(tmp_path / "bundle") as staging:
        (staging / "weights.bin").write_bytes(b"x")
    assert mode(tmp_path / "bundle") == 0o755
    assert mode(tmp_path / "bundle" / "weights.bin") == 0o644


def test_failed_atomic_directory_keeps_the_old_one(tmp_path):
    with atomic_directory(tmp_path / "bundle") as staging:
        (staging / "v").write_text("1")
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "bundle") as staging:
        (staging / "v").write_text("2")
        raise RuntimeError("killed half-way")
    assert (tmp_path / "bundle" / "v").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
