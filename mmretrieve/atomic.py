"""Atomic writes: readers see the old state or the new one, never a half-written file."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # Windows: liveness of a writer is told by its pid alone
    fcntl = None

log = logging.getLogger(__name__)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publishable(path: Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give them the modes a plain
    open()/mkdir() would, so another user (a server, a container) can read what we publish."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _publishable(Path(tmp))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_npy_atomic(path: str | Path, array) -> None:
    """An array as a .npy file (never pickled), written atomically."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    write_bytes_atomic(path, buffer.getvalue())


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a fresh sibling folder to fill; on success it replaces ``target``, with one complete
    folder reachable under that name at every instant a reader can observe.

    Where the kernel and file system offer ``renameat2(RENAME_EXCHANGE)``, the new folder and the
    old one swap names in one step. Elsewhere the completed folder is first renamed
    ``.NAME.new-*`` (the name is its completion marker), the old one moved aside to ``.NAME.old-*``
    and the new one moved in; a kill between those renames leaves ``target`` missing, and
    :func:`recover_directory` (run here and by every reader) puts the newest complete folder back.
    If the block raises, ``target`` is untouched and the partial folder is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(target)
    staging, lock = _locked_folder(target)
    suffix = staging.name.rpartition(".tmp-")[2]
    locks = [lock]
    published = False
    try:
        yield staging
        _seal(staging)
        retired = None
        if not target.exists():
            os.rename(staging, target)
        else:
            locks.append(_lock_current(target))
            if _exchange(staging, target):
                retired = staging  # the old folder, now under the staging name
            else:
                ready = staging.with_name(f".{target.name}.new-{suffix}")
                os.rename(staging, ready)
                retired = staging.with_name(f".{target.name}.old-{suffix}")
                os.rename(target, retired)
                os.rename(ready, target)
        published = True
        _fsync_dir(target.parent)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    except BaseException:
        if not published:
            shutil.rmtree(staging, ignore_errors=True)
            _release(locks)
            # Interrupted between the renames: put a complete folder back under the target's name.
            with contextlib.suppress(Exception):
                recover_directory(target)
        raise
    finally:
        _release(locks)


@contextlib.contextmanager
def scratch_directory(target: str | Path) -> Iterator[Path]:
    """A private work folder beside ``target`` (same file system, so its files can be moved into an
    :func:`atomic_directory` of ``target`` by rename), removed on exit. It is named and locked like
    atomic_directory's staging folder, so one a killed process left is removed by the next
    :func:`recover_directory` of ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(target)
    work, lock = _locked_folder(target)
    locks = [lock]
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
        _release(locks)


def _locked_folder(target: Path) -> tuple[Path, int | None]:
    """A new ``.NAME.tmp-PID-*`` folder beside ``target``, already locked when it gets that name.

    It is made as ``.NAME.init-PID-*`` and renamed only once locked: another process's
    :func:`recover_directory` removes an unlocked ``.tmp-`` folder as a killed writer's, and
    touches an ``.init-`` one only when its process is gone too."""
    made = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.init-{os.getpid()}-"))
    locks: list[int | None] = []
    try:
        locks.append(_lock(made))
        folder = made.with_name(f".{target.name}.tmp-{made.name.rpartition('.init-')[2]}")
        os.rename(made, folder)
    except BaseException:
        shutil.rmtree(made, ignore_errors=True)
        _release(locks)
        raise
    return folder, locks[0]


def _seal(folder: Path) -> None:
    """Ordinary modes, and every file and folder flushed to disk, before the folder is published."""
    _publishable(folder, directory=True)
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
            _publishable(path)
        elif path.is_dir():
            _fsync_dir(path)
    _fsync_dir(folder)


# -- swapping two folders in one step (Linux renameat2) ------------------------------------------
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_NO_EXCHANGE: set[int] = set()  # st_dev of file systems that refused RENAME_EXCHANGE


@functools.lru_cache(maxsize=1)
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc older than glibc 2.28, or none to load
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing folders' names atomically; False where the system cannot (then nothing moved)."""
    function = _renameat2()
    if function is None:
        return False
    device = os.stat(second.parent).st_dev
    if device in _NO_EXCHANGE:
        return False
    if function(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        _NO_EXCHANGE.add(device)
        return False
    raise OSError(error, os.strerror(error), str(first), None, str(second))


# -- who is still writing: an exclusive flock on each folder a writer owns -----------------------
def _lock(folder: Path) -> int | None:
    """Hold an exclusive lock on ``folder`` (released when the descriptor closes, or the process dies)."""
    if fcntl is None:
        return None
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:  # a file system without flock: liveness falls back to the pid in the name
        os.close(fd)
        return None
    return fd


def _lock_current(target: Path) -> int | None:
    """Lock the folder that is ``target`` now (another writer may have swapped it meanwhile)."""
    while True:
        fd = _lock(target)
        if fd is None or os.fstat(fd).st_ino == os.stat(target).st_ino:
            return fd
        os.close(fd)


def _release(locks: list[int | None]) -> None:
    while locks:
        fd = locks.pop()
        if fd is not None:
            os.close(fd)


def _claim(folder: Path, kind: str, pid: int | None) -> tuple[bool, int | None]:
    """(True, fd) when the writer of a leftover folder is gone, the folder now locked by us (fd is
    None where there is no flock). An ``.init-`` folder is not locked yet while its writer lives,
    so its pid must be gone as well; a folder of the code before issue 13 (no pid, never locked)
    is claimed when no one locks it, and its caller guards by age."""
    if fcntl is not None:
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError:
            return False, None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False, None
        except OSError:  # a file system without flock: the pid alone tells
            os.close(fd)
        else:
            if pid is not None and kind == "init" and _alive(pid):
                os.close(fd)
                return False, None
            return True, fd
    return pid is None or not _alive(pid), None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


# Public names for modules that publish their own temporary files (a memory-mapped cache).
fsync_dir = _fsync_dir
pid_alive = _alive


# Leftovers of the code before issue 13 carry no pid and were never locked, so only their age
# tells that their writer is gone: a day is far beyond any save (writers fill their folder
# within seconds to minutes, and each file added refreshes the folder's time).
LEGACY_AGE_S = 86400.0


def recover_directory(target: str | Path) -> bool:
    """Repair what an interrupted :func:`atomic_directory` left beside ``target``.

    When ``target`` is missing (a kill between the fallback's renames), the newest complete
    leftover is renamed back to it: a ``.NAME.new-*`` folder, else the ``.NAME.old-*`` one. Leftovers
    whose writer is gone (``.NAME.init-*``, ``.NAME.tmp-*``, ``.NAME.new-*``, ``.NAME.old-*``) are then
    removed; those of a writer still running are left alone. Returns True when ``target`` was
    restored. Never raises for a folder it cannot change (a reader may lack write access).

    Leftovers of versions before this one (``.NAME.tmp-XXXXXXXX`` and ``.NAME.old-XXXXXXXX``
    without a pid) are handled too: an ``.old-*/old`` folder is the complete old folder of a
    replacement killed between its two renames and is restored when ``target`` is missing;
    other such leftovers are removed only when no one locks them and they are older than
    ``LEGACY_AGE_S`` (those writers took no lock, so age is the guard).
    """
    target = Path(target)
    name = re.escape(target.name)
    pattern = re.compile(rf"\.{name}\.(init|tmp|new|old)-(\d+)-[A-Za-z0-9_]+")
    legacy = re.compile(rf"\.{name}\.(tmp|old)-[a-z0-9_]{{8}}")  # tempfile.mkdtemp's 8 characters
    found: list[tuple[str, int | None, Path]] = []
    try:
        with os.scandir(target.parent) as entries:
            for entry in entries:
                if match := pattern.fullmatch(entry.name):
                    kind, pid = match.group(1), int(match.group(2))
                elif match := legacy.fullmatch(entry.name):
                    kind, pid = match.group(1), None
                else:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    found.append((kind, pid, target.parent / entry.name))
    except OSError:
        return False
    if not found:
        return False
    claimed: list[tuple[str, int | None, Path]] = []
    locks: list[int | None] = []
    restored = False
    try:
        for kind, pid, path in found:
            gone, fd = _claim(path, kind, pid)
            locks.append(fd)
            if gone:
                claimed.append((kind, pid, path))
        if not os.path.lexists(target):
            for wanted in ("new", "old", "legacy"):  # a tmp folder may be incomplete: never restored
                if wanted == "legacy":
                    candidates = [path / "old" for kind, pid, path in claimed
                                  if kind == "old" and pid is None and (path / "old").is_dir()]
                else:
                    candidates = [path for kind, pid, path in claimed if kind == wanted and pid is not None]
                if candidates:
                    newest = max(candidates, key=lambda p: p.stat().st_mtime_ns)
                    with contextlib.suppress(OSError):
                        os.rename(newest, target)
                        _fsync_dir(target.parent)
                        restored = True
                        log.warning("%s was missing after an interrupted write; restored the newest complete copy",
                                    target)
                        if wanted == "legacy":  # its emptied holder goes now, whatever its age
                            with contextlib.suppress(OSError):
                                newest.parent.rmdir()
                    break
        now = time.time()
        for _, pid, path in claimed:
            with contextlib.suppress(OSError):
                if pid is None and now - path.stat().st_mtime < LEGACY_AGE_S:
                    continue
                if path.exists():
                    shutil.rmtree(path, ignore_errors=True)
    finally:
        _release(locks)
    return restored
