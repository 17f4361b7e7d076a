"""Dirty-page tracking for the live writer: which pages of a block changed since the last round.

One tracker per block. Each round the writer walks the block a chunk at a time and the
tracker says, per chunk, which pages to write and which rows hold their bytes. Three
trackers, behind the one ``Tracker`` interface:

- ``ManualTracking``: the caller marks what it changed (``mark``), like KVM's dirty log.
- ``KernelTracking``: the kernel logs the writes (kernel_dirty.py: userfaultfd async
  write-protection + PAGEMAP_SCAN); a round costs a page-table walk and its dirty pages.
- ``DigestTracking``: per-page digests compared round to round, no help from the caller
  or the kernel, but every round reads the whole block.

``make_tracker`` picks one for a ``dirty_tracking`` mode; "auto" is the kernel's where
the kernel and the buffer allow it, else digests.
"""

from __future__ import annotations

import threading
from concurrent.futures import Executor, Future
from typing import Any, Iterable, Iterator, Literal

import numpy as np

from .kernel_dirty import OS_PAGE, Unavailable, WriteLog

SCAN_PAGES = 8192  # pages digested, zero-checked and queued at a time (32 MiB of 4 KiB pages)
SLIVER_BYTES = 256  # KernelTracking: the most bytes of a page it keeps aside (see there)

# Per chunk: (page numbers, rows holding their bytes, row index of each page in ``rows``).
Dirty = tuple[np.ndarray, np.ndarray, np.ndarray]


TrackingMode = Literal["auto", "kernel", "digest", "manual"]
MODES = ("auto", "kernel", "digest", "manual")


class Tracker:
    """Which pages of one block (``pages``: a (num_pages, page_size) view) to write in a round."""

    mode = ""  # the name of the dirty_tracking mode this tracker implements

    def __init__(self, pages: np.ndarray) -> None:
        self.pages = pages

    def chunks(self) -> list[tuple[int, int]]:
        n = len(self.pages)
        return [(s, min(n, s + SCAN_PAGES)) for s in range(0, n, SCAN_PAGES)]

    def mark(self, index: Any) -> None:
        raise RuntimeError("mark_dirty() needs dirty_tracking='manual'")

    def round(self, final: bool) -> Iterator[Dirty]:
        """The dirty pages of this round, chunk by chunk. ``final``: the caller's writers
        are paused. A final round after earlier ones yields copies, so the writers may
        resume once it has been read (its pages are few: the earlier rounds took the
        rest); a one-shot save (final and first) yields the pages in place."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop tracking (the writer is done); the buffer is plain memory again."""


class ManualTracking(Tracker):
    """Pages are dirty when marked; every page is dirty before round 0."""

    mode = "manual"

    def __init__(self, pages: np.ndarray) -> None:
        super().__init__(pages)
        self._dirty = np.ones(len(pages), dtype=bool)
        self._lock = threading.Lock()
        self._first = True

    def mark(self, index: Any) -> None:
        with self._lock:
            self._dirty[index] = True

    def round(self, final: bool) -> Iterator[Dirty]:
        # The marks are reset BEFORE the pages are written, so a change racing with the
        # write is marked again and saved next round. Pages are written in place but in
        # a final round after earlier ones.
        with self._lock:
            dirty, self._dirty = self._dirty, np.zeros_like(self._dirty)
        copy, self._first = final and not self._first, False
        for start, end in self.chunks():
            pos = np.flatnonzero(dirty[start:end])
            if copy:
                yield pos + start, self.pages[start + pos], np.arange(len(pos))
            else:
                yield pos + start, self.pages[start:end], pos


class DigestTracking(Tracker):
    """A page is dirty when its digest (a keyed dot product of its words) changed.

    Outside the final round a dirty page is written from a staged copy whose digest is
    the one remembered: a page written live could change during the write and change
    back afterwards; its digest would then match while the file holds the in-between
    bytes. Writing the exact bytes that were digested rules that out."""

    mode = "digest"

    def __init__(self, pages: np.ndarray, key: np.ndarray, pool: Executor) -> None:
        super().__init__(pages)
        self._key = key
        self._pool = pool
        self._digests: np.ndarray | None = None  # uint64 per page, from round 0 on

    def _digest(self, rows: np.ndarray) -> np.ndarray:
        return np.dot(rows.view(np.uint64), self._key)

    def round(self, final: bool) -> Iterator[Dirty]:
        chunks = self.chunks()
        if final and self._digests is None:  # a one-shot save: every page, no digests needed
            for start, end in chunks:
                pos = np.arange(end - start)
                yield pos + start, self.pages[start:end], pos
            return
        # numpy's dot releases the GIL: digest the chunks ahead, on the other cores
        ahead: list[Future[np.ndarray]] = [self._pool.submit(self._digest, self.pages[s:e]) for s, e in chunks]
        if self._digests is None:  # a zero page's digest is 0: round 0 writes the others
            self._digests = np.zeros(len(self.pages), dtype=np.uint64)
        for (start, end), digests in zip(chunks, ahead):
            live = self.pages[start:end]
            pos = np.flatnonzero(digests.result() != self._digests[start:end])
            if final:  # no digests needed any more
                yield pos + start, live[pos], np.arange(len(pos))
                continue
            staged = live[pos]  # a copy of the dirty pages only
            self._digests[start + pos] = self._digest(staged)
            yield pos + start, staged, np.arange(len(pos))

    def changed(self, pages: np.ndarray) -> Dirty:
        """Of ``pages`` (page numbers, after round 0), those whose digest changed, staged."""
        assert self._digests is not None
        staged = self.pages[pages]
        digests = self._digest(staged)
        pos = np.flatnonzero(digests != self._digests[pages])
        self._digests[pages[pos]] = digests[pos]
        return pages[pos], staged, pos


class KernelTracking(Tracker):
    """A page is dirty when the kernel saw a write to it since the previous round and
    its digest changed.

    The page-aligned inside of the buffer is registered with the kernel (WriteLog). Each
    round first collects the written pages and re-arms them; a write after that, even
    during the page's own copy, is logged for the next round. The written pages are then
    judged and staged as DigestTracking judges all pages, but only those. The kernel
    reports OS pages, and a buffer page that does not start on one (malloc puts numpy
    data 16 bytes into a page) shares its first and last OS page with its neighbours, so
    a write to one page reports the next one too: the digest drops those (and writes of
    the bytes a page already held). Where the part of a page in such a shared OS page is
    small (a sliver of up to SLIVER_BYTES), a copy of each page's sliver as last staged
    settles it without staging the page. The buffer's edge pages, which share an OS page
    with memory outside it, are judged by their digest every round. Round 0 is
    DigestTracking's round 0 (every page, digests remembered), after arming."""

    mode = "kernel"

    def __init__(self, pages: np.ndarray, key: np.ndarray, pool: Executor) -> None:
        super().__init__(pages)
        count, size = pages.shape
        addr = pages.ctypes.data
        start = -(-addr // OS_PAGE) * OS_PAGE
        end = (addr + pages.nbytes) // OS_PAGE * OS_PAGE
        if end <= start and count:
            raise Unavailable("it holds no whole page of memory")
        self._addr = addr
        first, last = -(-(start - addr) // size), (end - addr) // size  # pages inside [start, end)
        self._edges = np.r_[0:first, last:count]
        self._digest = DigestTracking(pages, key, pool)
        self._armed = False
        # An OS page across a page boundary holds the last `offset` bytes of the page
        # before it and the first OS_PAGE - offset of the page after: the smaller is a sliver.
        offset = addr % OS_PAGE
        self._tail = offset <= OS_PAGE // 2  # the sliver is a page's end, else its start
        self._sliver: slice | None = None
        if count and offset and size % OS_PAGE == 0 and min(offset, OS_PAGE - offset) <= SLIVER_BYTES:
            self._sliver = slice(size - offset, size) if self._tail else slice(0, OS_PAGE - offset)
            self._slivers = np.zeros((count, min(offset, OS_PAGE - offset)), dtype=np.uint8)  # as last staged
        self._log = WriteLog(start, end) if count else None  # an empty block has nothing to track

    def round(self, final: bool) -> Iterator[Dirty]:
        if self._log is None or (final and not self._armed):  # empty, or a one-shot save
            yield from self._digest.round(final)
            return
        if not self._armed:
            self._log.protect()  # arm first, then read every page
            self._armed = True
            dirty: Iterable[Dirty] = self._digest.round(final)
        else:
            candidates = self._candidates()
            parts = (candidates[s : s + SCAN_PAGES] for s in range(0, len(candidates), SCAN_PAGES))
            if final:  # copy the written pages without judging them: writing a few more is quicker
                dirty = ((p, self.pages[p], np.arange(len(p))) for p in parts)
            else:
                dirty = map(self._digest.changed, parts)
        for pages, rows, pos in dirty:
            if self._sliver is not None:
                self._slivers[pages] = rows[pos, self._sliver]
            yield pages, rows, pos

    def _candidates(self) -> np.ndarray:
        """The pages that overlap a written OS page, less those that only have their
        sliver there and whose sliver did not change, and the edge pages; in order."""
        ranges = self._log.collect().astype(np.int64)  # type: ignore[union-attr]
        size = self.pages.shape[1]
        if self._sliver is None:
            written = _runs((ranges[:, 0] - self._addr) // size, (ranges[:, 1] - 1 - self._addr) // size)
            return np.unique(np.concatenate([written, self._edges]))
        # pages are whole OS pages here: an OS page overlaps one page, or two across a boundary
        offsets = _runs(ranges[:, 0] // OS_PAGE, ranges[:, 1] // OS_PAGE - 1) * OS_PAGE - self._addr
        first, last = offsets // size, (offsets + OS_PAGE - 1) // size
        across = first != last
        owners = np.unique(np.where(across, last, first) if self._tail else first)  # hold its larger part
        lone = np.setdiff1d(first[across] if self._tail else last[across], owners)  # only a sliver written
        lone = lone[(self.pages[lone, self._sliver] != self._slivers[lone]).any(axis=1)]
        return np.unique(np.concatenate([owners, lone, self._edges]))

    def close(self) -> None:
        if self._log is not None:
            self._log.close()


def _runs(first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Every number of each run [first[i], last[i]], run after run."""
    counts = last - first + 1
    return np.repeat(first - (np.cumsum(counts) - counts), counts) + np.arange(int(counts.sum()))


def make_tracker(mode: TrackingMode, pages: np.ndarray, key: np.ndarray, pool: Executor) -> tuple[Tracker, str]:
    """The tracker for ``mode`` and, where "auto" did not take the kernel's, why (else "").
    "kernel" raises Unavailable where the kernel or the buffer cannot do it."""
    if mode == "manual":
        return ManualTracking(pages), ""
    if mode in ("auto", "kernel"):
        try:
            return KernelTracking(pages, key, pool), ""
        except Unavailable as err:
            if mode == "kernel":
                raise
            return DigestTracking(pages, key, pool), str(err)
    return DigestTracking(pages, key, pool), ""
