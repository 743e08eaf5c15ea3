"""Files written whole or not at all: checkpoints, exported weights, the eval feature cache and results.

``replaced_atomically(path, needed)`` hands out a temporary file (or folder) beside ``path``;
once the block has written it, it is flushed to disk and renamed over ``path``. ``path``
therefore holds its previous content or the new one, never a part of either.

A full disk:
* the free space is checked before anything is written (``needed``: the tensors' bytes plus
  a margin, ``space_needed``), where the file system reports it;
* a write that fails anyway (ENOSPC or EDQUOT from the OS, or any failure after which the
  folder has less than ``needed`` free: torch's zip writer reports a short write as a
  ``RuntimeError``) becomes ``DiskFullError``, naming the path, the size needed and the
  space free. ``disk_full`` is that verdict, for every writer.

A process killed mid-write (SIGKILL, the OOM killer, a node lost) cannot remove its temporary
file. Temporary files are named ``.NAME.XXXXXXXX.tmp`` beside ``NAME`` and hold an ``flock``
while they are written; the kernel drops the lock when the writer dies, so the next write of
``NAME`` removes the unlocked ones (on a file system without ``flock`` they are left alone).
Readers only ever open ``NAME`` itself.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import os
import shutil
import tempfile
from contextlib import contextmanager

import torch

from fastjepa.errors import DiskFullError

MARGIN = 1 << 20  # bytes beyond the tensors' own: the pickle or JSON header, the zip records, the file system's blocks
PER_TENSOR = 1024  # and per tensor: its name, its header or zip entry, its alignment


def space_needed(state) -> int:
    """The bytes a file holding ``state`` (tensors in nested dicts, lists and tuples) needs, about:
    the tensors' bytes, ``PER_TENSOR`` each and ``MARGIN``."""
    tensors = []

    def walk(value):
        if isinstance(value, torch.Tensor):
            tensors.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(state)
    return sum(t.nelement() * t.element_size() + PER_TENSOR for t in tensors) + MARGIN


def free_space(path) -> int | None:
    """Bytes free for a file at ``path`` (in its folder), or None where the file system does not say."""
    try:
        usage = shutil.disk_usage(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return None
    return usage.free if usage.total > 0 else None  # some network and FUSE file systems report no sizes at all


def check_space(path, needed: int) -> None:
    """``DiskFullError`` before writing ``path`` when less than ``needed`` bytes are free there."""
    free = free_space(path)
    if free is not None and free < needed:
        raise DiskFullError(path, needed, free)


def disk_full(error: BaseException, path, needed: int) -> DiskFullError | None:
    """The verdict on a failed write of ``path`` (its temporary file already removed): a
    ``DiskFullError`` when the disk is full (the OS said so, or less than ``needed`` is free now),
    else None (the error is something else and is raised as it is)."""
    if isinstance(error, DiskFullError):
        return error
    if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit
        return None
    free = free_space(path)
    said_so = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
    if said_so or (free is not None and free < needed):
        return DiskFullError(path, needed, free if free is not None else 0)
    return None


def temporary_files(path) -> list[str]:
    """The temporary files and folders of writes of ``path``, finished or not."""
    parent, name = os.path.split(os.path.abspath(path))
    return sorted(glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.*.tmp")))


def remove_stale(path) -> None:
    """Remove the temporary files of writes of ``path`` whose writer is gone (no lock held)."""
    for stale in temporary_files(path):
        try:
            fd = os.open(stale, os.O_RDONLY)
        except OSError:  # removed meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live writer's, or a file system without flock: left alone
            os.close(fd)
            continue
        _remove(stale)
        os.close(fd)


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _sync(tmp: str, lock: int, folder: bool) -> None:
    """Flush what was written to ``tmp`` (each file of a folder) to the disk."""
    if not folder:
        os.fsync(lock)  # fsync flushes the file, whichever descriptor asks
        return
    for name in sorted(os.listdir(tmp)):
        fd = os.open(os.path.join(tmp, name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _install(tmp: str, path: str, folder: bool) -> None:
    """Rename ``tmp`` over ``path``; an existing folder is moved aside first and removed after."""
    if not (folder and os.path.isdir(path)):
        os.replace(tmp, path)
        return
    parent, name = os.path.split(path)
    old = tempfile.mkdtemp(prefix=f".{name}.", suffix=".old.tmp", dir=parent)
    os.replace(path, os.path.join(old, "previous"))
    os.replace(tmp, path)
    shutil.rmtree(old)


@contextmanager
def replaced_atomically(path, needed: int, folder: bool = False):
    """Yield a temporary path beside ``path``, a file (or with ``folder`` an empty folder), for
    the block to write ``path``'s new content into; when the block ends it is flushed and
    renamed over ``path``. Before: stale temporary files of ``path`` are removed and ``needed``
    bytes must be free (``DiskFullError``). When the block or the rename fails, the temporary
    file is removed, ``path`` is unchanged, and a full disk is raised as ``DiskFullError``."""
    shown, path = os.fspath(path), os.path.abspath(path)  # messages name the path as it was given
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    remove_stale(path)
    check_space(shown, needed)
    if folder:
        tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
        lock = os.open(tmp, os.O_RDONLY)
    else:
        lock, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held until the file is in place or removed: not stale
        os.chmod(tmp, (0o777 if folder else 0o666) & ~_umask())  # mkdtemp and mkstemp make them private; ours are ordinary
        yield tmp
        _sync(tmp, lock, folder)
        _install(tmp, path, folder)
    except BaseException as e:
        _remove(tmp)
        full = disk_full(e, shown, needed)
        if full is None or full is e:
            raise
        raise full from e
    finally:
        os.close(lock)
