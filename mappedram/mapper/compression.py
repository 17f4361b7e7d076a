"""Compressed libvirt images: the stream decompressed in one forward pass, or compressed
as libvirt would write it (convert --compress).

libvirt pipes a classic QEMU stream through ``gzip``, ``bzip2``, ``xz``, ``lzop`` or
``zstd`` (``-c``) behind its header. ``Decompressed`` serves that stream to a
``Cursor`` as a forward-only ``fetch``: offsets are those the stream would have in
the same image uncompressed (the header's end + the decompressed position), so every
offset reported reads like one of a raw image. Memory is a read buffer, not the guest.

gzip, bzip2 and xz come from the standard library; zstd from the ``zstandard``
module (``pip install mappedram[zstd]``) or else the ``zstd`` program; lzop only from
the ``lzop`` program (the PyPI LZO bindings do raw blocks, not lzop's file format).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil
import subprocess
import zlib
from contextlib import contextmanager
from typing import IO, Callable, Iterator

from ..errors import FormatError

READ_BYTES = 1 << 20  # compressed bytes handed to the decompressor at once

Progress = Callable[[int, int], None]  # (compressed bytes consumed, compressed size)


def _zstd_module_reader(raw: IO[bytes]) -> IO[bytes]:
    import zstandard  # noqa: PLC0415 - optional

    return zstandard.ZstdDecompressor().stream_reader(raw, read_size=READ_BYTES, read_across_frames=True)


def _zstandard_available() -> bool:
    try:
        import zstandard  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


# The errors each decompressor raises on data it cannot decode.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError)


class Decompressed:
    """The decompressed stream of a compressed image, read forward only.

    ``fd``: the image; ``start``: where the compressed data begins (the header's end);
    ``compressor``: a SAVE_FORMATS name with a magic. ``progress`` sees the compressed
    bytes consumed against the compressed size.
    """

    def __init__(self, fd: int, start: int, size: int, compressor: str, progress: Progress | None = None) -> None:
        self.compressor = compressor
        self.start = start  # stream offsets begin here
        self._compressed = size - start
        self._progress = progress
        self._produced = 0  # decompressed bytes handed out or skipped
        self._proc: subprocess.Popen[bytes] | None = None
        self._raw_fd = os.dup(fd)
        os.lseek(self._raw_fd, start, os.SEEK_SET)
        self._raw = os.fdopen(self._raw_fd, "rb", buffering=0)
        self._reader = self._open(compressor)
        self._ended = False

    def _open(self, compressor: str) -> IO[bytes]:
        raw = self._raw
        if compressor == "gzip":
            return gzip.GzipFile(fileobj=raw, mode="rb")
        if compressor == "bzip2":
            return bz2.BZ2File(raw, "rb")
        if compressor == "xz":
            return lzma.LZMAFile(raw, "rb")
        if compressor == "zstd" and _zstandard_available():
            return _zstd_module_reader(raw)
        program = compressor if compressor in ("zstd", "lzop") else None
        if program is None or shutil.which(program) is None:
            hint = "pip install mappedram[zstd], or install the zstd program" if compressor == "zstd" else ""
            hint = hint or f"install the {compressor} program (apt-get install {compressor})"
            raise FormatError(self.start, f"a way to read {compressor}-compressed data ({hint})", "none")
        # the program reads the image from our descriptor's position; its stdout is the stream
        # (lzop as libvirt runs it: its warnings do not fail the restore)
        argv = [program, "-dc"] + (["--ignore-warn"] if program == "lzop" else [])
        self._proc = subprocess.Popen(argv, stdin=self._raw_fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self._proc.stdout is not None
        return self._proc.stdout

    @property
    def consumed(self) -> int:
        """Compressed bytes read so far (the shared descriptor's position)."""
        try:
            return os.lseek(self._raw_fd, 0, os.SEEK_CUR) - self.start
        except OSError:
            return self._compressed

    def _read(self, length: int) -> bytes:
        """Up to ``length`` decompressed bytes; fewer only at the end."""
        out = []
        want = length
        while want > 0 and not self._ended:
            try:
                chunk = self._reader.read(want)
            except _DECODE_ERRORS as err:
                raise self._damaged(str(err)) from None
            if not chunk:
                self._finish()
                break
            out.append(chunk)
            want -= len(chunk)
        if self._progress is not None:
            self._progress(min(self.consumed, self._compressed), self._compressed)
        data = b"".join(out) if len(out) != 1 else out[0]
        self._produced += len(data)
        return data

    def _finish(self) -> None:
        self._ended = True
        if self._proc is not None:
            assert self._proc.stderr is not None
            err = self._proc.stderr.read().decode(errors="replace").strip()
            if self._proc.wait() != 0:
                raise self._damaged(err.splitlines()[-1] if err else f"{self.compressor} exited with an error")

    def _damaged(self, why: str) -> FormatError:
        return FormatError(
            self.start + self._produced,
            f"{self.compressor}-compressed data that decompresses (compressed byte {self.consumed})",
            why or "a damaged stream",
        )

    def fetch(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes of the stream from ``offset`` (never before what was
        already handed out; bytes in between are decompressed and dropped)."""
        at = self.start + self._produced
        if offset < at:
            raise ValueError("a decompressed stream only moves forward")
        while at < offset:
            skipped = len(self._read(min(offset - at, READ_BYTES)))
            if not skipped:
                return b""
            at += skipped
        return self._read(length)

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        for stream in (self._proc.stdout, self._proc.stderr) if self._proc else ():
            if stream is not None:
                stream.close()
        self._reader.close()
        self._raw.close()


@contextmanager
def compressing(fd: int, offset: int, compressor: str) -> Iterator[IO[bytes]]:
    """A writable file whose bytes land compressed in ``fd`` from ``offset`` on; the
    compressed data is complete (and the program, if one was used, ended) on exit. The
    levels are those libvirt's ``PROG -c`` writes with: gzip 6, bzip2 9, xz 6, zstd 3."""
    raw_fd = os.dup(fd)
    os.lseek(raw_fd, offset, os.SEEK_SET)
    raw = os.fdopen(raw_fd, "wb", buffering=READ_BYTES)
    proc: subprocess.Popen[bytes] | None = None
    try:
        if compressor == "gzip":
            out: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0)
        elif compressor == "bzip2":
            out = bz2.BZ2File(raw, "wb", compresslevel=9)
        elif compressor == "xz":
            out = lzma.LZMAFile(raw, "wb", format=lzma.FORMAT_XZ, preset=6)
        elif compressor == "zstd" and _zstandard_available():
            import zstandard  # noqa: PLC0415 - optional

            out = zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False)
        elif compressor in ("zstd", "lzop") and shutil.which(compressor):
            raw.flush()
            proc = subprocess.Popen([compressor, "-c", "-q"], stdin=subprocess.PIPE, stdout=raw_fd)
            assert proc.stdin is not None
            out = proc.stdin
        else:
            hint = "pip install mappedram[zstd], or install the zstd program" if compressor == "zstd" else ""
            raise OSError(0, f"no {compressor} compressor: {hint or f'install the {compressor} program'}")
        yield out
        out.close()
        if proc is not None and proc.wait() != 0:
            raise OSError(0, f"{compressor} exited with status {proc.returncode}")
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        raw.close()
