"""The one walk over a block's extents: what to copy from where, and what to zero.

A copy plan covers a byte range of a block in order, as steps: a piece of page data
(``file_offset >= 0``, at most ``piece`` bytes, so progress moves in steps of at most
that much) or a gap that holds zeros (``file_offset == GAP``, any length). read_into,
restore, hashing, extract and export-elf all follow it; each decides what a gap costs
(clearing memory, nothing in a sparse file, zeros fed to a hash).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from typing import Iterable, Iterator

import numpy as np

from ..errors import FormatError
from ..formats.constants import MAPPED_RAM_LOAD_BUF_SIZE
from .channels import pwrite_all

GAP = -1
ZERO_CHUNK = 8 << 20  # zeros fed to a hash at once, from one shared buffer
COPY_CHUNK = 8 << 20  # pread/pwrite fallback of copy_range

ExtentArrays = Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]  # first pages, counts, file offsets


@dataclass(frozen=True)
class Steps:
    """Consecutive steps, in order: ``dest`` is the byte offset in the block."""

    dest: np.ndarray
    length: np.ndarray
    file_offset: np.ndarray  # GAP for zeros

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        return zip(self.dest.tolist(), self.length.tolist(), self.file_offset.tolist())


def copy_plan(
    extents: ExtentArrays,
    page_size: int,
    start: int,
    end: int,
    piece: int = MAPPED_RAM_LOAD_BUF_SIZE,
) -> Iterator[Steps]:
    """The steps covering bytes [start, end) of a block whose populated runs are ``extents``
    (in page order), in batches of bounded size."""
    at = start  # bytes covered so far
    for firsts, counts, offsets in extents:
        lo = np.maximum(firsts * page_size, start)
        hi = np.minimum((firsts + counts) * page_size, end)
        keep = lo < hi
        if not keep.any():
            if len(firsts) and firsts[0] * page_size >= end:
                break
            continue
        file_lo = offsets[keep] + (lo[keep] - firsts[keep] * page_size)
        lo, hi = lo[keep], hi[keep]
        parts = -(-(hi - lo) // piece)  # pieces per run
        run = np.repeat(np.arange(len(lo)), parts)
        k = np.arange(len(run)) - np.repeat(np.cumsum(parts) - parts, parts)
        p_dest = lo[run] + k * piece
        p_len = np.minimum(piece, hi[run] - p_dest)
        p_file = file_lo[run] + k * piece
        gap_lo = np.concatenate(([at], hi[:-1]))
        gap = lo > gap_lo
        dest = np.concatenate((gap_lo[gap], p_dest))
        order = np.argsort(dest, kind="stable")
        length = np.concatenate(((lo - gap_lo)[gap], p_len))
        file_offset = np.concatenate((np.full(int(gap.sum()), GAP, dtype=np.int64), p_file))
        yield Steps(dest[order], length[order], file_offset[order])
        at = int(hi[-1])
    if at < end:
        yield Steps(np.array([at]), np.array([end - at]), np.array([GAP]))


@cache
def _zeros() -> memoryview:
    return memoryview(bytes(ZERO_CHUNK))


def zero_chunks(length: int) -> Iterator[memoryview]:
    """``length`` zero bytes as views of one shared buffer: a hash of a huge clear range
    costs time, never memory, and Ctrl-C stops it between chunks."""
    zeros = _zeros()
    while length > 0:
        take = min(length, len(zeros))
        yield zeros[:take]
        length -= take


def copy_range(src_fd: int, dst_fd: int, src_off: int, dst_off: int, length: int) -> None:
    """Kernel-side copy where the filesystem allows it, else pread/pwrite in 8 MiB pieces."""
    while length:
        try:
            n = os.copy_file_range(src_fd, dst_fd, length, src_off, dst_off)
        except OSError:
            n = 0
        if n <= 0:
            data = os.pread(src_fd, min(length, COPY_CHUNK), src_off)
            if not data:
                raise FormatError(src_off, f"{length} more bytes of page data", "the end of the file")
            pwrite_all(dst_fd, memoryview(data), dst_off)
            n = len(data)
        src_off += n
        dst_off += n
        length -= n
