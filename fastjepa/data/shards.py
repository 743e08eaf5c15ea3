"""webdataset tar shards: each image member of a ``.tar`` file in an image folder is one image.

A webdataset shard is a plain tar whose members are grouped into samples by their name up
to the first dot (``n01440764_10026.jpg``, ``n01440764_10026.cls``, ...). Pretraining needs
the images only: every member with an image extension is an image, the other members
(labels, metadata) are ignored. Only uncompressed ``.tar`` files can be read in place.

A shard is indexed once, when the folder is listed (the tar headers only: one read per
member, no image data), and each image is then read from its byte range, in any order. So
shards go through the same seeded, sharded order, the same exact mid-epoch resume and the
same header check as loose files. The name of a member in logs and errors is
``<shard path>/<member name>``.
"""

from __future__ import annotations

import io
import os
import tarfile


def index_shard(path: str, is_image) -> list[tuple[str, int, int]]:
    """(member name, data offset, size) of every regular member of the tar at path whose
    name ``is_image``, in the tar's order. A damaged tar raises ``ValueError`` naming it."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            return [(m.name, m.offset_data, m.size) for m in tar if m.isreg() and is_image(m.name)]
    except (tarfile.TarError, EOFError) as error:
        raise ValueError(f"{path} is not a readable tar shard: {error}") from None


class MemberFile(io.RawIOBase):
    """A read-only, seekable view of the bytes [offset, offset + size) of a file."""

    def __init__(self, path: str, offset: int, size: int):
        super().__init__()
        self._file = open(path, "rb")
        self._offset, self._size, self._position = offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, position: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._size}[whence]
        self._position = max(base + position, 0)
        return self._position

    def readinto(self, buffer) -> int:
        n = max(min(len(buffer), self._size - self._position), 0)
        if n == 0:
            return 0
        data = os.pread(self._file.fileno(), n, self._offset + self._position)
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)

    def close(self) -> None:
        self._file.close()
        super().close()
