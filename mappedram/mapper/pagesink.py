"""The page sink of the live writer: dirty pages into their fixed slots, through the channels.

The main thread hands it the dirty pages of a chunk (``put``); it batches them into
channel items (long runs as views, short runs gathered), and each channel drops the
zero pages of its item (clearing their bits, as multifd_send_zero_page_detect does),
writes the rest at their slots and sets their bits, and punches out the slots of pages
that became zero so the file stays sparse.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .channels import Channels, pwrite_all
from .libc import libc_function
from .tracking import SCAN_PAGES

GROUP_RUNS = 512  # short runs gathered into one channel item at most

# (block, round, first page, page count, data) -> (the data the channel will write,
# seconds it waits first). Called as an item is handed to the channels; tests use it to
# model a channel that took its bytes at dispatch but whose write lands late.
ChannelHook = Callable[[str, int, int, int, memoryview], tuple[Any, float]]


@dataclass
class Slots:
    """One block's page slots in the file."""

    name: str
    pages_offset: int  # where page 0's slot is
    saved: np.ndarray  # bool per page: holds a saved page (the bit that goes into the bitmap)


_Item = tuple[Slots, np.ndarray, Any, float]  # slots, page numbers, their bytes (rows), delay


def _punch_hole_fn() -> Callable[[int, int, int], None] | None:
    """fallocate(PUNCH_HOLE | KEEP_SIZE), or None where the C library lacks it."""
    fallocate = libc_function(("fallocate64", "fallocate"), ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    if fallocate is None:
        return None

    def punch(fd: int, offset: int, length: int) -> None:
        if fallocate(fd, 0x02 | 0x01, offset, length) != 0:  # PUNCH_HOLE | KEEP_SIZE
            err = ctypes.get_errno()
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise OSError(err, os.strerror(err))

    return punch


_PUNCH = _punch_hole_fn()


class PageSink:
    """``channels`` threads writing pages into the file at ``path`` (open as ``fd``)."""

    def __init__(
        self,
        path: str,
        fd: int,
        page_size: int,
        *,
        channels: int,
        batch_bytes: int,
        punch_holes: bool,
        channel_hook: ChannelHook | None = None,
    ) -> None:
        self.page_size = page_size
        self.batch_bytes = max(page_size, batch_bytes - batch_bytes % page_size)
        self.punch_holes = punch_holes and _PUNCH is not None
        self.round = 0  # told by the writer, for the hook
        self.written = self.zeroed = 0  # pages, since the last reset_counts()
        self._fd = fd
        self._hook = channel_hook
        self._counts_lock = threading.Lock()
        depth = 2 * SCAN_PAGES * page_size // self.batch_bytes  # two scan chunks in flight
        self._channels: Channels[_Item] = Channels(path, channels, os.O_WRONLY, self._write, "save", depth)

    @property
    def syncs(self) -> int:
        return self._channels.syncs

    def sync(self) -> None:
        """Wait until every page handed over is in the file (or raise a channel's error)."""
        self._channels.sync()

    def close(self) -> None:
        self._channels.close()

    def reset_counts(self) -> None:
        self.written = self.zeroed = 0

    def put(self, slots: Slots, pages: np.ndarray, rows: np.ndarray, row_of: np.ndarray) -> None:
        """Hand over ``pages`` (whose bytes are ``rows[row_of]``): long runs as views of
        ``rows`` in pieces of ``batch_bytes``; short runs gathered (copied) into one item of
        up to ``batch_bytes`` and GROUP_RUNS runs, so scattered pages do not cost a queue
        hand-off each. Items of one round never share a page."""
        per_batch = self.batch_bytes // self.page_size
        group: list[int] = []  # indices into pages/row_of
        runs = 0
        for a, b in consecutive(pages, row_of):
            if b - a >= per_batch:
                for i in range(a, b, per_batch):
                    row = int(row_of[i])
                    count = min(per_batch, b - i)
                    self._submit(slots, pages[i : i + count], rows[row : row + count])
                continue
            group.extend(range(a, b))
            runs += 1
            if len(group) >= per_batch or runs >= GROUP_RUNS:
                self._submit(slots, pages[group], rows[row_of[group]])
                group, runs = [], 0
        if group:
            self._submit(slots, pages[group], rows[row_of[group]])

    def _submit(self, slots: Slots, pages: np.ndarray, rows: np.ndarray) -> None:
        data: Any = rows
        delay = 0.0
        if self._hook is not None:
            data, delay = self._hook(slots.name, self.round, int(pages[0]), len(pages), rows.reshape(-1).data)
        self._channels.submit((slots, pages, data, delay))

    def _write(self, fd: int, item: _Item) -> None:
        slots, pages, data, delay = item
        if delay:
            time.sleep(delay)
        ps = self.page_size
        rows = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8).reshape(-1, ps)
        zero = zero_pages(rows)
        stale = zero & slots.saved[pages]
        slots.saved[pages] = ~zero
        if self.punch_holes and stale.any():
            self._punch(slots, pages[stale])
        keep = np.flatnonzero(~zero)
        for a, b in consecutive(pages[keep], keep):
            lo, hi = int(keep[a]), int(keep[b - 1]) + 1
            pwrite_all(fd, rows[lo:hi].reshape(-1).data, slots.pages_offset + int(pages[lo]) * ps)
        with self._counts_lock:
            self.written += len(keep)
            self.zeroed += len(rows) - len(keep)

    def _punch(self, slots: Slots, pages: np.ndarray) -> None:
        assert _PUNCH is not None
        for a, b in consecutive(pages, pages):
            _PUNCH(self._fd, slots.pages_offset + int(pages[a]) * self.page_size, (b - a) * self.page_size)


def zero_pages(rows: np.ndarray) -> np.ndarray:
    """Which pages (rows) are all zero. A page whose first or last word is non-zero is
    settled by that word alone (as QEMU's buffer_is_zero looks at the ends first), so a
    dense buffer costs two words a page instead of a full scan."""
    words = rows.view(np.uint64)
    nonzero = (words[:, 0] != 0) | (words[:, -1] != 0)
    unsure = np.flatnonzero(~nonzero)
    for a, b in consecutive(unsure, unsure):
        lo, hi = int(unsure[a]), int(unsure[b - 1]) + 1
        nonzero[lo:hi] = words[lo:hi].any(axis=1)
    return ~nonzero


def consecutive(pages: np.ndarray, rows: np.ndarray) -> list[tuple[int, int]]:
    """[a, b) index ranges over which both arrays step by exactly one."""
    if not len(pages):
        return []
    breaks = np.flatnonzero((np.diff(pages) != 1) | (np.diff(rows) != 1)) + 1
    edges = [0, *breaks.tolist(), len(pages)]
    return list(zip(edges[:-1], edges[1:]))
