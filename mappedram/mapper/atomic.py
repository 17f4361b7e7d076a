"""Files that appear under their name only when complete."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def atomic_output(path: str | os.PathLike[str], mode: int = 0o644) -> Iterator[int]:
    """A file descriptor on a temporary file beside ``path``; on success it is fsynced
    and renamed over ``path``, on any error removed. A previous ``path`` is untouched
    until the rename."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=directory)
    except OSError as err:  # name the file asked for, not the temporary one
        raise OSError(err.errno, err.strerror, path) from None
    try:
        yield fd
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        os.unlink(tmp)
        raise
