"""The kernel's log of written pages: userfaultfd write-protection in async mode, read and
re-armed by the PAGEMAP_SCAN ioctl (Linux 6.7 and later; the mechanism CRIU uses).

A range registered with a userfaultfd in write-protect mode, with the features
UFFD_FEATURE_WP_ASYNC (a write to a protected page is let through by the kernel itself,
which only clears the page's protection bit: no message, no thread waits) and
UFFD_FEATURE_WP_UNPOPULATED (pages never touched are protected too), keeps one bit per
page: "written since last protected". PAGEMAP_SCAN on /proc/self/pagemap with category
PAGE_IS_WRITTEN and PM_SCAN_WP_MATCHING reports the written pages and protects them again
in the same page-table walk, so nothing written between the report and the re-arming can
be lost. Writes by the kernel on the process's behalf (read(), readv(), O_DIRECT) fault
like the process's own; MADV_DONTNEED counts as a write (the page becomes zero).

Only private anonymous memory is tracked: the pages of a shared or file-backed mapping
can change through another mapping (another process, write() to the file) without a
fault in this process's page tables.

Layouts and numbers: include/uapi/linux/userfaultfd.h, include/uapi/linux/fs.h,
Documentation/admin-guide/mm/userfaultfd.rst and pagemap.rst.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import weakref
from functools import lru_cache

import numpy as np

OS_PAGE = mmap.PAGESIZE

# userfaultfd.h
_UFFD_API = 0xAA
_UFFD_USER_MODE_ONLY = 1  # faults from kernel mode are not ours to handle; async WP never sends any
_FEATURE_WP_UNPOPULATED = 1 << 13
_FEATURE_WP_ASYNC = 1 << 15
_FEATURES = {"UFFD_FEATURE_WP_ASYNC": _FEATURE_WP_ASYNC, "UFFD_FEATURE_WP_UNPOPULATED": _FEATURE_WP_UNPOPULATED}
_REGISTER_MODE_WP = 1 << 1
_WRITEPROTECT_MODE_WP = 1 << 0
_IOCTL_WRITEPROTECT = 1 << 0x06  # bit of _UFFDIO_WRITEPROTECT in uffdio_register.ioctls
# fs.h
_PAGE_IS_WRITTEN = 1 << 1
_PM_SCAN_WP_MATCHING = 1 << 0
_PM_SCAN_CHECK_WPASYNC = 1 << 1  # fail rather than skip a page that is not async-WP-registered

# userfaultfd(2)'s number per machine; elsewhere only /dev/userfaultfd is tried
_SYSCALL = {"x86_64": 323, "aarch64": 282, "riscv64": 282, "loongarch64": 282, "ppc64le": 364, "s390x": 355}


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | kind << 8 | nr


_u64 = ctypes.c_uint64


class _Range(ctypes.Structure):
    _fields_ = [("start", _u64), ("len", _u64)]


class _Api(ctypes.Structure):
    _fields_ = [("api", _u64), ("features", _u64), ("ioctls", _u64)]


class _Register(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", _u64), ("ioctls", _u64)]


class _WriteProtect(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", _u64)]


class _ScanArg(ctypes.Structure):
    _fields_ = [
        (name, _u64)
        for name in (
            "size",
            "flags",
            "start",
            "end",
            "walk_end",
            "vec",  # address of struct page_region[vec_len]: {start, end, categories}, all u64
            "vec_len",
            "max_pages",
            "category_inverted",
            "category_mask",
            "category_anyof_mask",
            "return_mask",
        )
    ]


_READ, _WRITE = 2, 1
UFFDIO_API = _ioc(_READ | _WRITE, _UFFD_API, 0x3F, ctypes.sizeof(_Api))
UFFDIO_REGISTER = _ioc(_READ | _WRITE, _UFFD_API, 0x00, ctypes.sizeof(_Register))
UFFDIO_UNREGISTER = _ioc(_READ, _UFFD_API, 0x01, ctypes.sizeof(_Range))
UFFDIO_WRITEPROTECT = _ioc(_READ | _WRITE, _UFFD_API, 0x06, ctypes.sizeof(_WriteProtect))
USERFAULTFD_IOC_NEW = _ioc(0, _UFFD_API, 0x00, 0)
PAGEMAP_SCAN = _ioc(_READ | _WRITE, ord("f"), 16, ctypes.sizeof(_ScanArg))

SCAN_REGIONS = 16384  # page_region entries per PAGEMAP_SCAN call (384 KiB)


class Unavailable(ValueError):
    """Kernel dirty tracking cannot work here; the message says why."""


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
    libc.ioctl.restype = ctypes.c_int
    libc.syscall.restype = ctypes.c_long
    return libc


def _ioctl(fd: int, request: int, arg: ctypes.Structure) -> int:
    ret = _libc().ioctl(fd, request, ctypes.addressof(arg))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(ret)


def _open_uffd() -> int:
    """A new userfaultfd: the system call, else /dev/userfaultfd (where the system call is
    refused to this user, the device's permissions may still allow it)."""
    flags = os.O_CLOEXEC | os.O_NONBLOCK | _UFFD_USER_MODE_ONLY
    nr = _SYSCALL.get(platform.machine())
    first = errno.ENOSYS
    if nr is not None:
        fd = int(_libc().syscall(ctypes.c_long(nr), ctypes.c_int(flags)))
        if fd >= 0:
            return fd
        first = ctypes.get_errno()
    try:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        raise Unavailable(f"userfaultfd() fails: {os.strerror(first)}") from None
    try:
        fd = _libc().ioctl(dev, USERFAULTFD_IOC_NEW, ctypes.c_void_p(flags))
        if fd < 0:
            raise Unavailable(f"userfaultfd() fails: {os.strerror(first)}; so does /dev/userfaultfd")
        return fd
    finally:
        os.close(dev)


def _handshake(fd: int) -> None:
    """UFFDIO_API asking for async write-protection of unpopulated pages too."""
    wanted = _FEATURE_WP_ASYNC | _FEATURE_WP_UNPOPULATED
    try:
        _ioctl(fd, UFFDIO_API, _Api(_UFFD_API, wanted, 0))
        return
    except OSError as err:
        failed = err
    probe = _open_uffd()  # the failed handshake spent fd's one try: ask a fresh one what it has
    try:
        api = _Api(_UFFD_API, 0, 0)
        _ioctl(probe, UFFDIO_API, api)
    finally:
        os.close(probe)
    missing = [name for name, bit in _FEATURES.items() if not api.features & bit]
    if not missing:
        raise Unavailable(f"the userfaultfd handshake (UFFDIO_API) fails: {failed.strerror}")
    raise Unavailable(f"this kernel ({platform.release()}) lacks {' and '.join(missing)} (Linux 6.7 or later has them)")


@lru_cache(maxsize=1)
def why_unavailable() -> str | None:
    """Why kernel dirty tracking cannot work on this machine at all, or None if it can."""
    if platform.system() != "Linux":
        return f"it needs Linux, not {platform.system()}"
    try:
        fd = _open_uffd()
        try:
            _handshake(fd)
        finally:
            os.close(fd)
        pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            empty = _ScanArg(size=ctypes.sizeof(_ScanArg))  # start == end: walks nothing
            _ioctl(pagemap, PAGEMAP_SCAN, empty)
        finally:
            os.close(pagemap)
    except Unavailable as err:
        return str(err)
    except OSError as err:
        return f"PAGEMAP_SCAN on /proc/self/pagemap fails: {err.strerror} (Linux 6.7 or later has it)"
    return None


def why_untrackable(start: int, end: int) -> str | None:
    """Why the memory [start, end) is not private anonymous memory, or None if it is."""
    covered = start
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            if lo >= end:
                break
            if hi <= start:
                continue
            if lo > covered:
                break
            path = fields[5].strip() if len(fields) > 5 else ""
            if fields[4] != "0" and not path.startswith("/dev/zero "):  # shared anonymous memory shows so
                return f"its memory is a file-backed mapping ({path or 'inode ' + fields[4]})"
            if fields[1][3] != "p":
                return "its memory is shared (MAP_SHARED): writes through other mappings are not seen"
            covered = hi
    if covered < end:
        return "its memory is not all mapped"
    return None


class WriteLog:
    """The kernel's written-page log of [start, end), page-aligned private anonymous memory.

    ``protect()`` arms every page; ``collect()`` returns the byte ranges written since
    and arms them again, ``regions`` ranges per PAGEMAP_SCAN call. ``close()``
    unregisters: the memory is plain memory again."""

    def __init__(self, start: int, end: int, regions: int = SCAN_REGIONS) -> None:
        if start % OS_PAGE or end % OS_PAGE or end <= start:
            raise ValueError(f"[{start:#x}, {end:#x}) is not a range of whole pages")
        why = why_unavailable() or why_untrackable(start, end)
        if why:
            raise Unavailable(why)
        self.start, self.end = start, end
        self._fds = [_open_uffd(), -1]  # the userfaultfd, /proc/self/pagemap
        self._closer = weakref.finalize(self, _release, self._fds, start, end)
        try:
            _handshake(self._fds[0])
            reg = _Register(_Range(start, end - start), _REGISTER_MODE_WP, 0)
            try:
                _ioctl(self._fds[0], UFFDIO_REGISTER, reg)
            except OSError as err:
                why = "it is tracked by another userfaultfd" if err.errno == errno.EBUSY else err.strerror
                raise Unavailable(f"registering its memory with userfaultfd fails: {why}") from None
            if not reg.ioctls & _IOCTL_WRITEPROTECT:
                raise Unavailable("its memory cannot be write-protected by userfaultfd")
            self._fds[1] = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            self.close()
            raise
        self._vec = np.zeros((regions, 3), dtype=np.uint64)

    def protect(self) -> None:
        whole = _Range(self.start, self.end - self.start)
        _ioctl(self._fds[0], UFFDIO_WRITEPROTECT, _WriteProtect(whole, _WRITEPROTECT_MODE_WP))

    def collect(self) -> np.ndarray:
        """The (start, end) byte addresses of the pages written since they were last
        armed, in address order, each armed again by the same walk of the page table."""
        arg = _ScanArg(
            size=ctypes.sizeof(_ScanArg),
            flags=_PM_SCAN_WP_MATCHING | _PM_SCAN_CHECK_WPASYNC,
            start=self.start,
            end=self.end,
            vec=self._vec.ctypes.data,
            vec_len=len(self._vec),
            category_mask=_PAGE_IS_WRITTEN,
            return_mask=_PAGE_IS_WRITTEN,
        )
        found = []
        while True:
            count = _ioctl(self._fds[1], PAGEMAP_SCAN, arg)
            found.append(self._vec[:count, :2].copy())
            if arg.walk_end >= self.end:
                break
            arg.start = arg.walk_end  # the vector was full: go on where the walk stopped
        return np.concatenate(found)

    def close(self) -> None:
        self._closer()


def _release(fds: list[int], start: int, end: int) -> None:
    try:  # clears the protection bits too; closing alone leaves them to be dropped lazily
        _ioctl(fds[0], UFFDIO_UNREGISTER, _Range(start, end - start))
    except OSError:
        pass  # never registered, or the memory is gone (unmapped): closing drops the rest
    for fd in fds:
        if fd >= 0:
            os.close(fd)
