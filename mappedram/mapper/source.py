"""A snapshot file read by offset: pread for structures, mmap views for page data.

Every read is checked against the file size first, so no length or offset taken from
the file can make us allocate or map more than the file holds.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

from construct import ConstError, Construct, ConstructError, StreamError

from ..errors import FormatError


class _PreadStream:
    """The minimal file object construct needs, reading with pread and never past ``limit``."""

    def __init__(self, fd: int, pos: int, limit: int) -> None:
        self.fd, self.pos, self.limit = fd, pos, limit

    def read(self, n: int = -1) -> bytes:
        end = self.limit if n is None or n < 0 else min(self.limit, self.pos + n)
        data = os.pread(self.fd, max(0, end - self.pos), self.pos) if end > self.pos else b""
        self.pos += len(data)
        return data

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else (self.pos + pos if whence == 1 else self.limit + pos)
        return self.pos


def _construct_reason(err: ConstructError) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    path = lines[0].removeprefix("Error in path ").replace("(parsing)", "").strip(" ->") if lines else ""
    reason = lines[-1].removeprefix("parsing ") if lines else type(err).__name__
    if isinstance(err, ConstError) and " but parsed " in reason:
        reason = reason.split(" but parsed ", 1)[1]  # "expected X but parsed Y": X is in `what`
    return f"{reason} in field {path}" if path else reason


class Source:
    """An open snapshot file. Not thread-safe for ``parse``; ``pread`` users share the fd."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            self.size = os.fstat(self.fd).st_size
        except OSError:
            os.close(self.fd)
            raise
        self._mmap: mmap.mmap | None = None

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # views handed out still use it; it is unmapped when they are gone
            self._mmap = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def require(self, offset: int, length: int, what: str) -> None:
        """Raise unless [offset, offset + length) lies inside the file."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise FormatError(offset, f"{what} ({length} bytes) inside the file", f"the file ends at {self.size:#x}")

    def read(self, offset: int, length: int, what: str) -> bytes:
        self.require(offset, length, what)
        data = os.pread(self.fd, length, offset)
        if len(data) != length:  # the file shrank under us
            raise FormatError(offset + len(data), f"{what}: {length} bytes", "a short read")
        return data

    def byte(self, offset: int, what: str) -> int:
        return self.read(offset, 1, what)[0]

    def parse(self, schema: Construct, offset: int, what: str, **context: Any) -> tuple[Any, int]:
        """Parse ``schema`` at ``offset``; return the value and the offset just past it."""
        stream = _PreadStream(self.fd, offset, self.size)
        try:
            value = schema.parse_stream(stream, **context)
        except StreamError:
            raise FormatError(offset, what, f"the end of the file at {self.size:#x}") from None
        except (ConstructError, UnicodeDecodeError) as err:
            reason = _construct_reason(err) if isinstance(err, ConstructError) else str(err)
            raise FormatError(offset, what, reason) from None
        return value, stream.pos

    @property
    def mmap(self) -> mmap.mmap | None:
        """A read-only map of the whole file (address space only; nothing is read)."""
        if self._mmap is None and self.size:
            self._mmap = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
        return self._mmap

    def view(self, offset: int, length: int, what: str) -> memoryview:
        """A zero-copy view of file bytes."""
        self.require(offset, length, what)
        assert self.mmap is not None
        return memoryview(self.mmap)[offset : offset + length]
