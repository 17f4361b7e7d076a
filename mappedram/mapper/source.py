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

import errno
import os
import stat
from typing import TYPE_CHECKING, Any, Callable

from ..errors import FormatError

if TYPE_CHECKING:
    from construct import Construct, ConstructError

# Bytes the cursor reads ahead at once: big enough that a classic stream's record walk
# costs one pread per MiB, small enough to be nothing next to the file.
CURSOR_WINDOW = 1 << 20

# (offset, length) -> that many bytes; fewer only where the data ends (a forward-only
# source: the cursor learns its size so), or FormatError
Fetch = Callable[[int, int], bytes]
# The size of a forward-only source until its end is read: no offset reaches it.
UNKNOWN_SIZE = 1 << 62


def _construct_reason(err: ConstructError) -> str:
    from construct import ConstError

    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    path = lines[0].removeprefix("Error in path ").replace("(parsing)", "").strip(" ->") if lines else ""
    reason = lines[-1].removeprefix("parsing ") if lines else type(err).__name__
    if isinstance(err, ConstError) and " but parsed " in reason:
        reason = reason.split(" but parsed ", 1)[1]  # "expected X but parsed Y": X is in `what`
    return f"{reason} in field {path}" if path else reason


def _parse(schema: Construct, stream: Any, offset: int, size: Callable[[], int], what: str, **context: Any) -> Any:
    from construct import ConstructError, StreamError  # imported by who parses with a schema

    try:
        return schema.parse_stream(stream, **context)
    except StreamError:
        raise FormatError(offset, what, f"the end of the file at {size():#x}") from None
    except (ConstructError, UnicodeDecodeError) as err:
        reason = _construct_reason(err) if isinstance(err, ConstructError) else str(err)
        raise FormatError(offset, what, reason) from None


_NOT_REGULAR = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO or pipe",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


class Source:
    """An open snapshot file with random access; channel threads pread on their own fds."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Open ``path``; OSError unless it is a regular file (a FIFO, a device or a pipe
        has no size to check reads against, and opening a FIFO would wait for a writer)."""
        self.path = os.fspath(path)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(self.fd)
            if not stat.S_ISREG(st.st_mode):
                kind = _NOT_REGULAR.get(stat.S_IFMT(st.st_mode), "an unusual kind of file")
                raise OSError(errno.EINVAL, f"not a regular file ({kind}); give the snapshot file", self.path)
            os.set_blocking(self.fd, True)
            self.size = st.st_size
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
    asked for offsets that do not go back past what the walker has consumed).

    ``size`` may be UNKNOWN_SIZE (a decompressed stream): the first fetch that comes
    back short sets it, so every bound checked after a window holds the real end.
    ``record_from``/``recorded`` keep the bytes of one element while it is walked (a
    forward-only source cannot read them again).
    """

    def __init__(self, fetch: Fetch, size: int, pos: int) -> None:
        self._fetch = fetch
        self.size = size
        self.pos = pos
        self._buf = b""
        self._base = pos
        self._view = memoryview(self._buf)
        self._record_limit = 0
        self._recording: bytearray | None = None  # grown in place: no second copy to join
        self._record_at = 0  # the first byte not yet in _recording
        self._record_size = 0

    def window(self, pos: int, need: int) -> tuple[bytes, int]:
        """(buffer, its file offset) holding [pos, pos + need), or up to the end of the file."""
        buf, base = self._buf, self._base
        if base <= pos and pos + need <= base + len(buf):
            return buf, base
        if pos < base:
            raise ValueError("a cursor only moves forward")
        if self._recording is not None:
            self._keep(buf[self._record_at - base : pos - base] if pos <= base + len(buf) else None)
            self._record_at = pos
        keep = buf[pos - base :] if pos < base + len(buf) else b""
        start = pos + len(keep)
        want = min(self.size, pos + max(need, CURSOR_WINDOW)) - start
        got = self._fetch(start, want) if want > 0 else b""
        if len(got) < want:  # only a forward-only source ends early: now its size is known
            self.size = start + len(got)
        if pos > self.size:
            raise FormatError(self.size, f"{pos - self.size} more bytes", "the end of the stream")
        self._buf = keep + got
        self._base = pos
        self._view = memoryview(self._buf)
        return self._buf, pos

    def view(self, pos: int, length: int) -> memoryview:
        """``length`` bytes from ``pos`` (fewer at the end of the data) as a view into the
        window, valid for as long as the caller keeps it; ``pos`` not before the window."""
        at = pos - self._base
        if at < 0 or at + length > len(self._buf):
            self.window(pos, length)
            at = 0
        return self._view[at : at + length]

    def record_from(self, pos: int, limit: int) -> None:
        """Keep the bytes from ``pos`` (in the window) on, until ``recorded``; at most
        ``limit`` of them."""
        if not self._base <= pos <= self._base + len(self._buf):
            raise ValueError("recording starts inside the window")
        self._recording, self._record_at, self._record_size, self._record_limit = bytearray(), pos, 0, limit

    def recorded(self, end: int) -> bytearray | None:
        """The bytes from ``record_from``'s offset to ``end`` (passed by now), or None when
        they were more than its ``limit``; stops recording."""
        buf, base = self._buf, self._base
        self._keep(buf[self._record_at - base : end - base])
        kept, self._recording = self._recording, None
        return None if kept is None or self._record_size > self._record_limit else kept

    def _keep(self, data: bytes | None) -> None:
        if self._recording is None:
            return
        if data is None or self._record_size + len(data) > self._record_limit:
            self._record_size = self._record_limit + 1  # over the limit, or bytes skipped unread
            self._recording.clear()
            return
        self._recording += data
        self._record_size += len(data)

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
        try:
            value = _parse(schema, stream, start, lambda: self.size, what, **context)
        except FormatError:
            if stream.error is not None:  # construct reports a failed read as the stream's end
                raise stream.error from None
            raise
        self.pos = stream.pos
        return value

    def find(self, pattern: bytes, follow: int, accept: Callable[[int, bytes], bool]) -> int:
        """The first offset from ``pos`` where ``pattern`` starts and ``accept(offset, the
        next follow bytes or fewer at the end)`` holds, or -1; does not move ``pos``."""
        at = self.pos
        while at + len(pattern) <= self.size:
            # the window as it is when it holds the pattern's length: asking it for a whole
            # CURSOR_WINDOW from ``at`` would copy a MiB for each of a million short sections
            buf, base = self.window(at, len(pattern))
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
        self.error: FormatError | None = None  # what a read raised (a decompressor's)

    def read(self, n: int = -1) -> bytes:
        size = self.cursor.size
        end = size if n is None or n < 0 else min(size, self.pos + n)
        if end <= self.pos:
            return b""
        try:
            buf, base = self.cursor.window(self.pos, end - self.pos)
        except FormatError as err:
            self.error = err
            raise
        data = buf[self.pos - base : end - base]
        self.pos += len(data)
        return data

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else (self.pos + pos if whence == 1 else self.cursor.size + pos)
        return self.pos
