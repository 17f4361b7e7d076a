"""Stale slots: bytes in the slots of clear pages of a mapped-ram block.

A clear bit means the page is zero, whatever its slot holds (FORMAT.md §3.4). In a live
save QEMU writes a page in one round and clears its bit when a later round finds it
zero, leaving the old bytes in the slot; a file edited by hand may hold anything there.
These bytes are not the guest's RAM at save time, but they are old guest memory, which
matters for forensics and for what a "sparse" file really discloses.

Counting reads only the clear slots that hold data: ``SEEK_DATA``/``SEEK_HOLE`` give the
parts of the page region that are not holes, the bitmap says which of their slots are
clear, and only those are read; a sparse snapshot of a huge guest costs the bitmap and a
few lseeks. On a filesystem without hole reporting (or a
copy made without holes) every clear slot is read.
"""

from __future__ import annotations

import errno
import os
from typing import Any, Callable, Iterator

import numpy as np

from ..formats import bitmap as bm
from .blocks import MappedRamBlock, RamBlock
from .channels import pwrite_all
from .output import output_file
from .source import read_exact

READ_CHUNK = 8 << 20  # bytes of clear slots read at once


def _data_ranges(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The parts of [start, end) of the file that hold data (not holes)."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # nothing but holes up to the end of the file
                return
            yield pos, end  # no hole reporting here: everything is data
            return
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole
        pos = hole


def stale_pages(block: MappedRamBlock, size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first page, pages x page_size uint8 array) of clear slots that hold data, in page
    order and pieces of at most 8 MiB; all-zero pages may be among them (the caller tests).
    ``size``: the file's size (slots past it hold nothing)."""
    page, base, fd = block.page_size, block.pages_offset, block.fd
    ranges = _data_ranges(fd, base, min(base + block.num_pages * page, size))
    current = next(ranges, None)
    done = 0  # pages before this are yielded (a page larger than a filesystem block may hold two data ranges)
    for first, present in block.present_chunks():
        if current is None:
            return  # holes to the end of the region: no more of the bitmap is needed
        chunk_end = base + (first + len(present)) * page
        while current is not None and current[0] < chunk_end:
            lo = max((current[0] - base) // page, first, done)
            hi = min(-(-(current[1] - base) // page), first + len(present))
            if lo < hi:
                starts, counts = bm.runs(~present[lo - first : hi - first], lo)
                for run_first, run_count in zip(starts.tolist(), counts.tolist()):
                    yield from _read_slots(block, size, run_first, run_count)
                done = hi
            if current[1] > chunk_end:
                break  # the range goes on in the next chunk
            current = next(ranges, None)


def _read_slots(block: MappedRamBlock, size: int, first: int, count: int) -> Iterator[tuple[int, np.ndarray]]:
    """Slots ``first`` to ``first + count`` in pieces; a slot cut by the file's end reads
    as zeros past it."""
    page = block.page_size
    step = max(READ_CHUNK // page, 1)
    for at in range(first, first + count, step):
        n = min(step, first + count - at)
        offset = block.pages_offset + at * page
        buf = np.zeros(n * page, dtype=np.uint8)
        have = min(n * page, size - offset)
        read_exact(block.fd, memoryview(buf)[:have], offset, f"the clear slots of {block.name}")
        yield at, buf.reshape(n, page)


def _nonzero(pages: np.ndarray) -> np.ndarray:
    return pages.view(np.uint64).any(axis=1) if pages.shape[1] % 8 == 0 else pages.any(axis=1)


def stale_slots(block: RamBlock, size: int) -> int | None:
    """How many clear slots hold non-zero bytes; None for a block without slots (a classic
    stream's, or one the file leaves out)."""
    if not isinstance(block, MappedRamBlock) or not block.in_file:
        return None
    return sum(int(np.count_nonzero(_nonzero(pages))) for _, pages in stale_pages(block, size))


def extract_stale(
    snapshot: Any,
    name: str,
    out_path: str | os.PathLike[str],
    *,
    overwrite: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[int, int]:
    """Write the non-zero clear slots of block ``name`` at their page offsets in a sparse
    file of the block's length (everything else a hole). Returns (slots, bytes written).
    NOT the guest's RAM at save time: the old bytes a live save left behind."""
    block = snapshot.block(name)
    if not isinstance(block, MappedRamBlock) or not block.in_file:
        raise ValueError(f"block {name!r} has no page slots (only mapped-ram blocks in the file have)")
    slots = 0
    page = block.page_size
    with output_file(out_path, overwrite=overwrite, source_fd=snapshot.fd) as fd:
        os.ftruncate(fd, block.used_length)
        for first, pages in stale_pages(block, snapshot.size):
            for i in np.flatnonzero(_nonzero(pages)).tolist():
                pwrite_all(fd, memoryview(pages[i]), (first + i) * page)
                slots += 1
            if progress:
                progress((first + len(pages)) * page, block.used_length)
    return slots, slots * page
