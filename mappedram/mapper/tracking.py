"""Dirty-page tracking for the live writer: which pages of a block changed since the last round.

One tracker per block. Each round the writer walks the block a chunk at a time and the
tracker says, per chunk, which pages to write and which rows hold their bytes. Two
trackers today, behind the one ``Tracker`` interface (a kernel dirty log, e.g. from
userfaultfd write-protect or soft-dirty bits, would be a third):

- ``ManualTracking``: the caller marks what it changed (``mark``), like KVM's dirty log.
- ``DigestTracking``: per-page digests compared round to round, no help from the caller.
"""

from __future__ import annotations

import threading
from concurrent.futures import Executor, Future
from typing import Any, Iterator

import numpy as np

SCAN_PAGES = 8192  # pages digested, zero-checked and queued at a time (32 MiB of 4 KiB pages)

# Per chunk: (page numbers, rows holding their bytes, row index of each page in ``rows``).
Dirty = tuple[np.ndarray, np.ndarray, np.ndarray]


class Tracker:
    """Which pages of one block (``pages``: a (num_pages, page_size) view) to write in a round."""

    def __init__(self, pages: np.ndarray) -> None:
        self.pages = pages

    def chunks(self) -> list[tuple[int, int]]:
        n = len(self.pages)
        return [(s, min(n, s + SCAN_PAGES)) for s in range(0, n, SCAN_PAGES)]

    def mark(self, index: Any) -> None:
        raise RuntimeError("mark_dirty() needs dirty_tracking='manual'")

    def round(self, final: bool) -> Iterator[Dirty]:
        """The dirty pages of this round, chunk by chunk. ``final``: the caller's writers
        are paused, so the pages can be written in place."""
        raise NotImplementedError


class ManualTracking(Tracker):
    """Pages are dirty when marked; every page is dirty before round 0."""

    def __init__(self, pages: np.ndarray) -> None:
        super().__init__(pages)
        self._dirty = np.ones(len(pages), dtype=bool)
        self._lock = threading.Lock()

    def mark(self, index: Any) -> None:
        with self._lock:
            self._dirty[index] = True

    def round(self, final: bool) -> Iterator[Dirty]:
        # The marks are reset BEFORE the pages are written, so a change racing with the
        # write is marked again and saved next round. Pages are written in place.
        with self._lock:
            dirty, self._dirty = self._dirty, np.zeros_like(self._dirty)
        for start, end in self.chunks():
            pos = np.flatnonzero(dirty[start:end])
            yield pos + start, self.pages[start:end], pos


class DigestTracking(Tracker):
    """A page is dirty when its digest (a keyed dot product of its words) changed.

    Outside the final round a dirty page is written from a staged copy whose digest is
    the one remembered: a page written live could change during the write and change
    back afterwards; its digest would then match while the file holds the in-between
    bytes. Writing the exact bytes that were digested rules that out."""

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
            if final:
                yield pos + start, live, pos
                continue
            staged = live[pos]  # a copy of the dirty pages only
            self._digests[start + pos] = self._digest(staged)
            yield pos + start, staged, np.arange(len(pos))
