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


# -- replacing a folder: one complete folder reachable at every moment, even across a kill --------

import subprocess
import sys

from mmretrieve import atomic
from mmretrieve.atomic import recover_directory


def write_version(target, version: str) -> None:
    with atomic_directory(target) as staging:
        (staging / "version").write_text(version)
        (staging / "sub").mkdir()
        (staging / "sub" / "weights").write_text(version * 3)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_exchange_swaps_two_folders_on_this_file_system(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "from-a").touch()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "from-b").touch()
    if atomic._renameat2() is None:
        pytest.skip("no renameat2 in this libc")
    assert atomic._exchange(tmp_path / "a", tmp_path / "b") is True
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["from-b"]
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["from-a"]


def test_replacing_a_folder_uses_the_exchange_and_leaves_nothing_behind(tmp_path, monkeypatch):
    swaps = []
    real = atomic._exchange
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: swaps.append(real(a, b)) or swaps[-1])
    write_version(tmp_path / "ckpt", "1")
    write_version(tmp_path / "ckpt", "2")
    assert swaps == ([True] if atomic._renameat2() else [False])
    assert (tmp_path / "ckpt" / "version").read_text() == "2"
    assert (tmp_path / "ckpt" / "sub" / "weights").read_text() == "222"
    assert leftovers(tmp_path) == []


def test_the_fallback_without_exchange_replaces_too(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    write_version(tmp_path / "ckpt", "1")
    write_version(tmp_path / "ckpt", "2")
    assert (tmp_path / "ckpt" / "version").read_text() == "2"
    assert leftovers(tmp_path) == []


def test_an_exception_between_the_fallbacks_renames_leaves_a_complete_folder(tmp_path, monkeypatch):
    write_version(tmp_path / "ckpt", "1")
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real_rename, calls = os.rename, []

    def rename(src, dst):
        real_rename(src, dst)
        if ".init-" not in str(src):  # not the staging folder getting its name once locked
            calls.append(dst)
        if len(calls) == 2:  # staged -> .new-*, then old -> .old-*: the target is missing now
            raise SystemExit("killed")

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(SystemExit):
        write_version(tmp_path / "ckpt", "2")
    assert (tmp_path / "ckpt" / "version").read_text() == "2"
    assert leftovers(tmp_path) == []


KILLED_WRITER = """
import os, sys
from pathlib import Path
from mmretrieve import atomic
mode, target = sys.argv[1], Path(sys.argv[2])
real_exchange, real_rename, renames = atomic._exchange, os.rename, []
def exchange(a, b):
    if mode == "fallback":
        return False
    real_exchange(a, b)
    os._exit(9)  # swapped, the old folder not yet removed
def rename(a, b):
    real_rename(a, b)
    if ".init-" not in str(a):  # not the staging folder getting its name once locked
        renames.append(b)
    if mode == "fallback" and len(renames) == 2:
        os._exit(9)  # the old folder moved aside, the new one not yet in place
atomic._exchange, os.rename = exchange, rename
with atomic.atomic_directory(target) as staging:
    (staging / "version").write_text("2")
"""


@pytest.mark.parametrize("mode", ["fallback", "exchange"])
def test_a_writer_killed_while_publishing_leaves_a_folder_the_next_reader_finds(tmp_path, mode):
    target = tmp_path / "checkpoint"
    write_version(target, "1")
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, mode, str(target)])
    assert killed.returncode == 9
    if mode == "fallback":
        assert not target.exists()  # the window the issue found
        assert any(".new-" in name for name in leftovers(tmp_path))
    else:
        assert leftovers(tmp_path)  # the old folder under the staging name
    recover_directory(target)
    assert (target / "version").read_text() == "2"
    assert leftovers(tmp_path) == []


def test_stale_leftovers_are_removed_and_a_live_writers_are_kept(tmp_path):
    import fcntl

    target = tmp_path / "bundle"
    write_version(target, "1")
    dead = tmp_path / f".bundle.tmp-{2**22 + 12345}-deadbeef"
    dead.mkdir()
    (dead / "half").write_text("x")
    (tmp_path / ".bundle.old-1-abcdefgh").mkdir()
    live = tmp_path / f".bundle.tmp-{os.getpid()}-livewrit"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as atomic_directory holds it while writing
    try:
        (tmp_path / ".other.tmp-1-abcdefgh").mkdir()  # another target's: not ours to touch
        write_version(target, "2")
        assert leftovers(tmp_path) == sorted([".other.tmp-1-abcdefgh", live.name])
    finally:
        os.close(fd)
    assert recover_directory(target) is False
    assert leftovers(tmp_path) == [".other.tmp-1-abcdefgh"]
    assert (target / "version").read_text() == "2"


def test_recovery_restores_the_old_folder_when_no_new_one_is_complete(tmp_path):
    target = tmp_path / "bundle"
    write_version(target, "1")
    os.rename(target, tmp_path / ".bundle.old-1-abcdefgh")
    (tmp_path / ".bundle.tmp-1-zzzzzzzz").mkdir()  # unfinished: never published
    assert recover_directory(target) is True
    assert (target / "version").read_text() == "1"
    assert leftovers(tmp_path) == []


def test_a_scratch_folder_is_kept_while_in_use_and_a_killed_ones_is_removed(tmp_path):
    from mmretrieve.atomic import scratch_directory

    target = tmp_path / "export"
    with scratch_directory(target) as work:
        (work / "model.onnx").write_text("graph")
        with atomic_directory(target) as staging:  # its recovery must not take our work folder
            os.rename(work / "model.onnx", staging / "model.onnx")
        assert work.is_dir()
    assert (target / "model.onnx").read_text() == "graph"
    assert leftovers(tmp_path) == []
    killed = tmp_path / f".export.tmp-{2**22 + 7}-abcdefgh"  # what a SIGKILL leaves: no lock held
    killed.mkdir()
    with scratch_directory(target):
        assert not killed.exists()


def recover_in_another_process(target) -> None:
    """What another process's reader (resolve_model, is_export, load_checkpoint) runs."""
    subprocess.run([sys.executable, "-c", "import sys; from mmretrieve.atomic import recover_directory; "
                    "recover_directory(sys.argv[1])", str(target)], check=True)


@pytest.mark.parametrize("context", ["atomic_directory", "scratch_directory"])
def test_another_process_recovering_before_the_writer_locks_its_folder_leaves_it_alone(
        tmp_path, monkeypatch, context):
    """The staging folder exists before its lock is taken; a recovery in that gap must not
    mistake it for a killed writer's leftover."""
    target = tmp_path / "bundle"
    write_version(target, "1")
    real_lock = atomic._lock

    def late_lock(folder):
        recover_in_another_process(target)
        return real_lock(folder)

    monkeypatch.setattr(atomic, "_lock", late_lock)
    with getattr(atomic, context)(target) as staging:
        assert staging.is_dir()
        (staging / "version").write_text("2")
        if context == "scratch_directory":
            os.rename(staging / "version", staging / "moved")
    expected = "2" if context == "atomic_directory" else "1"
    assert (target / "version").read_text() == expected
    assert leftovers(tmp_path) == []


def test_a_killed_writers_unlocked_initial_folder_is_removed_once_its_process_is_gone(tmp_path):
    target = tmp_path / "bundle"
    write_version(target, "1")
    (tmp_path / f".bundle.init-{2**22 + 99}-abcdefgh").mkdir()  # killed before it locked and renamed it
    mine = tmp_path / f".bundle.init-{os.getpid()}-abcdefgh"  # a live process about to lock it
    mine.mkdir()
    assert recover_directory(target) is False
    assert leftovers(tmp_path) == [mine.name]


# -- leftovers of the code before issue 13 (no pid, no lock; `.old-*` held the old folder as `old`) --
def age(path, days: float) -> None:
    import time

    then = time.time() - days * 86400
    os.utime(path, (then, then))


def test_an_older_versions_killed_replacement_is_recovered_from_its_old_folder(tmp_path):
    target = tmp_path / "bundle"
    write_version(target, "1")
    retired = tmp_path / ".bundle.old-k3j_9x2a"
    retired.mkdir()
    os.rename(target, retired / "old")  # the old code was killed here, before moving the new one in
    (tmp_path / ".bundle.tmp-q8w7e6r5").mkdir()  # its new folder: complete or not, nobody can tell
    assert recover_directory(target) is True
    assert (target / "version").read_text() == "1"
    assert leftovers(tmp_path) == [".bundle.tmp-q8w7e6r5"]  # recent: an old writer might still fill it


def test_an_older_versions_leftovers_are_removed_after_a_day(tmp_path):
    target = tmp_path / "bundle"
    write_version(target, "1")
    for name in (".bundle.tmp-q8w7e6r5", ".bundle.old-k3j_9x2a", ".bundle.tmp-fresh123", ".other.tmp-q8w7e6r5"):
        (tmp_path / name).mkdir()
    (tmp_path / ".bundle.old-k3j_9x2a" / "old").mkdir()  # killed while deleting the retired folder
    for name in (".bundle.tmp-q8w7e6r5", ".bundle.old-k3j_9x2a", ".other.tmp-q8w7e6r5"):
        age(tmp_path / name, 2)
    assert recover_directory(target) is False
    assert leftovers(tmp_path) == [".bundle.tmp-fresh123", ".other.tmp-q8w7e6r5"]
    assert (target / "version").read_text() == "1"
