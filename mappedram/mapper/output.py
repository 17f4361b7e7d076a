"""The output file: the one way mappedram creates a file (extract, export-elf, convert, the writer).

The rules, stated once:

- The file is written under a temporary name beside its target (same directory, so the
  rename is atomic), fsynced, renamed over the target, and the directory fsynced: the
  target holds the previous file or the complete new one, never a part. A file whose
  format has a magic gets it last, after everything else is on disk (``commit(last=)``).
- The target is a regular file or nothing. A symbolic link is followed (the file it
  points to is replaced, the link stays); a link to nothing is refused. Directories,
  devices, FIFOs and sockets are refused: an atomic, sparse, seekable output cannot be
  had there. ``-`` (standard output) is refused for the same reason.
- The target is never an input (same device and inode, however it is reached), not
  even with ``overwrite``; a command with several inputs (diff) names them all.
- An existing file is replaced only with ``overwrite`` (the CLI's ``--force``).
- A new file gets the read/write bits every input has, or 0600 without an input; the
  umask applies on top. Output that carries guest memory is never more readable than its input.
- Every error names the file asked for, never the temporary one.

``check_output`` applies the target rules without creating anything, so that a command
can refuse its output before the expensive work; the real open checks again.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from contextlib import contextmanager
from functools import cache
from typing import Callable, Iterator, Sequence

from .channels import pwrite_all

PRIVATE = 0o600
TEMP_SUFFIX = ".partial"
_NAME_MAX = 255
_RANDOM = 8  # hex digits in a temporary name
# Write errors that concern the output, whoever raised them: these name the output.
_OUTPUT_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
WRITEBACK_BYTES = 32 << 20  # Writeback: how much is written between two starts


def refused(path: str, code: int, text: str) -> OSError:
    """The error for an output that may not be written: the CLI prints ``PATH: TEXT``, exit 2."""
    return OSError(code, text, path)


def check_output(path: str | os.PathLike[str], *, overwrite: bool, source_fds: Sequence[int] = ()) -> None:
    """Refuse (OSError naming ``path``) a target that is not a regular file or nothing, is
    one of the inputs ``source_fds``, or exists without ``overwrite``; create nothing."""
    name = os.fspath(path)
    _check_target(name, os.path.realpath(name), overwrite, [os.fstat(fd) for fd in source_fds])


def _check_target(path: str, target: str, overwrite: bool, sources: Sequence[os.stat_result]) -> None:
    if path == "-":
        raise refused(path, errno.EINVAL, "writing to standard output is not supported (./- names a file)")
    if os.path.islink(path) and not os.path.exists(path):
        raise refused(path, errno.ENOENT, "is a symbolic link to nothing; name the file to write")
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return
    except OSError as err:
        raise refused(path, err.errno, err.strerror) from None
    if stat.S_ISDIR(st.st_mode):
        raise refused(path, errno.EISDIR, "is a directory; name a file to write")
    if not stat.S_ISREG(st.st_mode):
        raise refused(path, errno.EINVAL, "is not a regular file (a device, FIFO or socket); not written")
    if any((st.st_dev, st.st_ino) == (src.st_dev, src.st_ino) for src in sources):
        raise refused(path, errno.EINVAL, "is the input file; write the output to another file")
    if not overwrite:
        raise refused(path, errno.EEXIST, "exists; give --force to replace it")


class OutputFile:
    """A temporary file that becomes ``path`` on ``commit()``; ``abort()`` removes it.

    ``source_fd`` / ``source_fds``: the input(s) the output is made from (their modes bound
    the output's, and the output may be none of them). ``sync``: fsync the file and the
    directory.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        overwrite: bool,
        source_fd: int | None = None,
        source_fds: Sequence[int] = (),
        sync: bool = True,
    ) -> None:
        self.path = os.fspath(path)  # as the user gave it: errors name this
        self.target = os.path.realpath(self.path)
        self.overwrite = overwrite
        self.sync = sync
        fds = [*([] if source_fd is None else [source_fd]), *source_fds]
        self._sources = [os.fstat(fd) for fd in fds]
        self.mode = PRIVATE
        if self._sources:  # the bits every input has: never more readable than any of them
            self.mode = 0o666
            for src in self._sources:
                self.mode &= stat.S_IMODE(src.st_mode)
        self.fd = -1
        self.temp_path = ""
        self.done = False
        self.check_target()
        self._create_temp()

    def check_target(self) -> None:
        """Refuse a target that is not a regular file or nothing, is an input, or exists
        without ``overwrite``."""
        _check_target(self.path, self.target, self.overwrite, self._sources)

    def _create_temp(self) -> None:
        directory, base = os.path.split(self.target)
        try:
            name_max = os.pathconf(directory, "PC_NAME_MAX")
        except OSError:
            name_max = _NAME_MAX
        # "." + stem + "." + random + suffix fits NAME_MAX, whatever the target's length
        stem = os.fsencode(base)[: name_max - 2 - _RANDOM - len(TEMP_SUFFIX)]
        # Created owner-writable (the channels reopen it by name); the final mode is set at commit.
        for _ in range(100):
            name = b"." + stem + b"." + secrets.token_hex(_RANDOM // 2).encode() + TEMP_SUFFIX.encode()
            temp = os.path.join(directory, os.fsdecode(name))
            try:
                self.fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, self.mode | 0o200)
            except FileExistsError:
                continue
            except OSError as err:
                raise refused(self.path, err.errno, err.strerror) from None
            self.temp_path = temp
            return
        raise refused(self.path, errno.EEXIST, "no free temporary name beside it")

    def commit(self, last: tuple[int, bytes] | None = None) -> None:
        """Make the file appear under its name. ``last``: (offset, bytes) written after
        everything else is on disk, e.g. a magic that makes the file valid."""
        if self.done:
            raise RuntimeError(f"{self.path}: already committed or aborted")
        try:
            if last is not None:
                if self.sync:
                    os.fsync(self.fd)
                pwrite_all(self.fd, memoryview(last[1]), last[0])
            if self.sync:
                os.fsync(self.fd)
            if not self.mode & 0o200:
                os.fchmod(self.fd, stat.S_IMODE(os.fstat(self.fd).st_mode) & ~0o200)
            os.close(self.fd)
            self.fd = -1
            self.check_target()  # again: the target may have changed while the file was written
            self._rename()
            self.done = True
            if self.sync:
                _fsync_dir(os.path.dirname(self.target))
        except BaseException as err:
            self.abort()
            reraise_naming(err, self.path)
            raise

    def _rename(self) -> None:
        if self.overwrite:
            os.replace(self.temp_path, self.target)
            return
        try:  # link fails if a file appeared at the target meanwhile: never clobber one
            os.link(self.temp_path, self.target)
        except FileExistsError:
            raise refused(self.path, errno.EEXIST, "exists; give --force to replace it") from None
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
                raise
            os.replace(self.temp_path, self.target)  # a filesystem without hard links: checked above
            return
        os.unlink(self.temp_path)

    def abort(self) -> None:
        """Remove the temporary file; the target stays as it was."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self.done:
            self.done = True
            try:
                os.unlink(self.temp_path)
            except FileNotFoundError:
                pass


def reraise_naming(err: BaseException, path: str) -> None:
    """Raise ``err`` again naming the output if it is about the output (a full disk, the
    temporary file); else return, for the caller to re-raise it unchanged."""
    if not isinstance(err, OSError):
        return
    unnamed = err.filename is None and err.errno in _OUTPUT_ERRNOS
    if unnamed or (err.filename is not None and os.fspath(err.filename).endswith(TEMP_SUFFIX)):
        raise OSError(err.errno, err.strerror, path) from err


@contextmanager
def output_file(
    path: str | os.PathLike[str],
    *,
    overwrite: bool = True,
    source_fd: int | None = None,
    source_fds: Sequence[int] = (),
    sync: bool = True,
) -> Iterator[int]:
    """A file descriptor on a new output file (see the module's rules); committed when the
    block ends without error, removed on any error."""
    out = OutputFile(path, overwrite=overwrite, source_fd=source_fd, source_fds=source_fds, sync=sync)
    try:
        yield out.fd
    except BaseException as err:
        out.abort()
        reraise_naming(err, out.path)
        raise
    out.commit()


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Writeback:
    """Has the kernel start writing a file to disk every WRITEBACK_BYTES written, so that
    the fsync at the end waits for the last few MiB instead of the whole file (the disk
    works while the next pieces are made). Linux's sync_file_range(SYNC_FILE_RANGE_WRITE)
    only starts the writes; where it is missing this does nothing. ``start``: what
    starts them (fd -> None), for tests."""

    def __init__(self, fd: int, start: Callable[[int], object] | None = None) -> None:
        self.fd = fd
        self._start = start
        self._since = 0

    def wrote(self, nbytes: int) -> None:
        self._since += nbytes
        if self._since >= WRITEBACK_BYTES:
            self._since = 0
            start = self._start or sync_file_range()
            if start is not None:
                start(self.fd)


@cache
def sync_file_range() -> Callable[[int], int] | None:
    """sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE), returning 0 or an errno: start
    writing every dirty page of the file."""
    import ctypes  # noqa: PLC0415 - only outputs that are written big need it

    from .libc import libc_function  # noqa: PLC0415

    fn = libc_function(("sync_file_range",), ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    if fn is None:
        return None
    write = 2  # SYNC_FILE_RANGE_WRITE

    def start(fd: int) -> int:
        # a failure here changes nothing: the fsync at the end reports the file's errors
        return 0 if fn(fd, 0, 0, write) == 0 else ctypes.get_errno()

    return start
