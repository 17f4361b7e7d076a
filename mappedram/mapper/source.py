"""A snapshot file read by offset with pread, and a forward cursor over it.

Every read is checked against the file size first, so no length or offset taken from
the file can make us allocate more than the file holds, and every read is checked for
its length after, so a file that shrinks under us gives a FormatError, never short data.
Nothing is mapped into the process: a mapping of a truncated file kills it (SIGBUS).

The stream walker reads only through a ``Cursor``: forward reads through a read-ahead
window, which a forward-only source (a decompressor) can serve too. What needs random
access (the VM description at the end, a block's bitmap and pages) asks ``Source``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable

from ..errors import FormatError

if TYPE_CHECKING:
    from construct import Construct, ConstructError

# Bytes the cursor reads ahead at once: big enough that a classic stream's record walk
# costs one pread per MiB, small enough to be nothing next to the file.
CURSOR_WINDOW = 1 << 20

Fetch = Callable[[int, int], bytes]  # (offset, length) -> exactly that many bytes, or FormatError


def _construct_reason(err: ConstructError) -> str:
    from construct import ConstError

    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    path = lines[0].removeprefix("Error in path ").replace("(parsing)", "").strip(" ->") if lines else ""
    reason = lines[-1].removeprefix("parsing ") if lines else type(err).__name__
    if isinstance(err, ConstError) and " but parsed " in reason:
        reason = reason.split(" but parsed ", 1)[1]  # "expected X but parsed Y": X is in `what`
    return f"{reason} in field {path}" if path else reason


def _parse(schema: Construct, stream: Any, offset: int, size: int, what: str, **context: Any) -> Any:
    from construct import ConstructError, StreamError  # imported by who parses with a schema

    try:
        return schema.parse_stream(stream, **context)
    except StreamError:
        raise FormatError(offset, what, f"the end of the file at {size:#x}") from None
    except (ConstructError, UnicodeDecodeError) as err:
        reason = _construct_reason(err) if isinstance(err, ConstructError) else str(err)
        raise FormatError(offset, what, reason) from None


class Source:
    """An open snapshot file with random access; channel threads pread on their own fds."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            self.size = os.fstat(self.fd).st_size
        except OSError:
            os.close(self.fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def require(self, offset: int, length: int, what: str) -> None:
        """Raise unless [offset, offset + length) lies inside the file."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise FormatError(offset, f"{what} ({length} bytes) inside the file", f"the file ends at {self.size:#x}")

    def fetch(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes from ``offset`` (already bounds-checked by the caller)."""
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise shrunk(offset + len(data), length - len(data))
        return data

    def read(self, offset: int, length: int, what: str) -> bytes:
        self.require(offset, length, what)
        return self.fetch(offset, length)

    def cursor(self, pos: int) -> "Cursor":
        return Cursor(self.fetch, self.size, pos)


def shrunk(offset: int, missing: int) -> FormatError:
    return FormatError(offset, f"{missing} more bytes (the file was shorter when opened)", "a short read: it shrank")


def read_exact(fd: int, view: memoryview, offset: int, what: str) -> None:
    """preadv the whole view from ``offset``, or raise FormatError on a short read."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise FormatError(offset + got, f"{len(view) - got} more bytes of {what}", "the end of the file")
        got += n


class Cursor:
    """Forward reads from ``pos`` through a read-ahead window (``fetch`` is only ever
    asked for offsets that do not go back past what the walker has consumed)."""

    def __init__(self, fetch: Fetch, size: int, pos: int) -> None:
        self._fetch = fetch
        self.size = size
        self.pos = pos
        self._buf = b""
        self._base = pos

    def window(self, pos: int, need: int) -> tuple[bytes, int]:
        """(buffer, its file offset) holding [pos, pos + need), or up to the end of the file."""
        buf, base = self._buf, self._base
        if base <= pos and pos + need <= base + len(buf):
            return buf, base
        if pos < base:
            raise ValueError("a cursor only moves forward")
        keep = buf[pos - base :] if pos < base + len(buf) else b""
        start = pos + len(keep)
        want = min(self.size, pos + max(need, CURSOR_WINDOW)) - start
        self._buf = keep + (self._fetch(start, want) if want > 0 else b"")
        self._base = pos
        return self._buf, pos

    def require(self, length: int, what: str) -> None:
        """Raise unless ``length`` bytes from ``pos`` lie inside the file."""
        if length < 0 or self.pos + length > self.size:
            raise FormatError(self.pos, f"{what} ({length} bytes) inside the file", f"the file ends at {self.size:#x}")

    def byte(self, what: str) -> int:
        """The byte at ``pos``, not consumed."""
        self.require(1, what)
        buf, base = self.window(self.pos, 1)
        return buf[self.pos - base]

    def read(self, length: int, what: str) -> bytes:
        self.require(length, what)
        buf, base = self.window(self.pos, length)
        at = self.pos - base
        self.pos += length
        return buf[at : at + length]

    def skip_to(self, offset: int, what: str) -> None:
        """Move forward to ``offset`` (inside the file) without reading what lies between."""
        if offset < self.pos or offset > self.size:
            raise FormatError(self.pos, f"{what} between {self.pos:#x} and the end of the file", f"{offset:#x}")
        self.pos = offset

    def parse(self, schema: Construct, what: str, **context: Any) -> Any:
        start = self.pos
        stream = _CursorStream(self)
        value = _parse(schema, stream, start, self.size, what, **context)
        self.pos = stream.pos
        return value

    def find(self, pattern: bytes, follow: int, accept: Callable[[int, bytes], bool]) -> int:
        """The first offset from ``pos`` where ``pattern`` starts and ``accept(offset, the
        next follow bytes or fewer at the end)`` holds, or -1; does not move ``pos``."""
        at = self.pos
        while at + len(pattern) <= self.size:
            buf, base = self.window(at, min(self.size - at, CURSOR_WINDOW))
            hit = buf.find(pattern, at - base)
            if hit < 0:
                if base + len(buf) >= self.size:
                    return -1
                at = base + len(buf) - len(pattern) + 1  # a match may straddle the window's end
                continue
            hit += base
            buf, base = self.window(hit, min(self.size - hit, len(pattern) + follow))
            after = hit + len(pattern) - base
            if accept(hit, buf[after : after + follow]):
                return hit
            at = hit + 1
        return -1


class _CursorStream:
    """construct's file object over a cursor: reads move it forward."""

    def __init__(self, cursor: Cursor) -> None:
        self.cursor, self.pos = cursor, cursor.pos

    def read(self, n: int = -1) -> bytes:
        size = self.cursor.size
        end = size if n is None or n < 0 else min(size, self.pos + n)
        if end <= self.pos:
            return b""
        buf, base = self.cursor.window(self.pos, end - self.pos)
        data = buf[self.pos - base : end - base]
        self.pos += len(data)
        return data

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else (self.pos + pos if whence == 1 else self.cursor.size + pos)
        return self.pos
