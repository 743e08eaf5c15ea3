"""Errors shared across the layers (the config, the data pipelines and every file writer raise them)."""

import errno
import os


class ConfigError(ValueError):
    """A config key is unknown, of the wrong type or out of range."""


def size_text(n: int) -> str:
    """A byte count for people: 512 B, 12.0 KiB, 41.3 MiB, 2.15 GiB."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{n} B"


class DiskFullError(OSError):
    """No space left on the device for a file fastjepa writes (a checkpoint, exported weights, the
    eval cache or results). The write was refused before it began, or undone: the temporary file
    is removed and any previous file at ``path`` is unchanged. An ``OSError`` with errno ENOSPC;
    ``path``, ``needed`` and ``free`` (bytes) say where and how much, ``then`` what the caller
    adds (what was kept, how to continue)."""

    def __init__(self, path, needed: int, free: int, then: str = ""):
        self.path, self.needed, self.free, self.then = os.fspath(path), needed, free, then
        message = f"no space left on the device while writing {self.path} (it needs about {size_text(needed)}, {size_text(free)} free)"
        super().__init__(errno.ENOSPC, message + (f"; {then}" if then else ""))

    def __str__(self) -> str:
        return self.strerror
