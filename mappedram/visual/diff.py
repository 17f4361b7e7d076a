"""What changed between two snapshots of one VM: ``mappedram diff``.

Pages are compared as QEMU would restore them: a page the file does not hold (a clear
bit, no PAGE record) restores as zeros. So a page present in one file only is a
difference only where its bytes are not all zero, and a classic stream compares
identical to its mapped-ram conversion. Only the populated pages are read, chunk by
chunk (``CHUNK_BYTES`` per file and worker), so memory does not grow with the guest.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from threading import local
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np

from ..errors import FormatError
from ..mapper.blocks import RamBlock
from ..mapper.snapshot import Section, Snapshot
from .workers import check_workers

# Bytes of each file read per task: QEMU's writer batches, large enough that the
# per-task overhead vanishes, small enough for a few in flight per worker.
CHUNK_BYTES = 8 << 20
# Threads comparing pages: each holds two chunks in flight, so memory grows with them.

Pieces = list[tuple[int, int, int]]  # (first page in the chunk, page count, file offset)
T = TypeVar("T")
R = TypeVar("R")


class NotComparable(ValueError):
    """The two files are not snapshots of one VM (different blocks or sizes)."""


@dataclass(frozen=True)
class BlockDiff:
    """The pages of one RAM block whose restored contents differ.

    ``pages``: sorted page indices; ``only_a`` / ``only_b``: those of them present in one
    file only (the other restores zeros); the rest are present in both and changed.
    ``present_a`` / ``present_b``: populated pages in each file.
    """

    name: str
    page_size: int
    num_pages: int
    present_a: int
    present_b: int
    pages: np.ndarray
    only_a: np.ndarray
    only_b: np.ndarray

    @property
    def count(self) -> int:
        return len(self.pages)

    @property
    def changed(self) -> np.ndarray:
        """Differing pages present in both files."""
        return np.setdiff1d(self.pages, np.union1d(self.only_a, self.only_b), assume_unique=True)

    def mask(self) -> np.ndarray:
        """A bool per page: True where the contents differ."""
        out = np.zeros(self.num_pages, dtype=bool)
        out[self.pages] = True
        return out

    def runs(self) -> list[tuple[int, int]]:
        """(first page, page count) of each run of differing pages."""
        if not len(self.pages):
            return []
        breaks = np.flatnonzero(np.diff(self.pages) != 1) + 1
        starts = np.concatenate(([0], breaks))
        ends = np.concatenate((breaks, [len(self.pages)]))
        return [(int(self.pages[s]), int(e - s)) for s, e in zip(starts.tolist(), ends.tolist())]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "page_size": self.page_size,
            "pages_total": self.num_pages,
            "present_a": self.present_a,
            "present_b": self.present_b,
            "pages_differ": self.count,
            "only_a": len(self.only_a),
            "only_b": len(self.only_b),
            "changed": len(self.changed),
            "runs": [list(r) for r in self.runs()],
        }


@dataclass(frozen=True)
class DeviceDiff:
    """A device section (idstr, instance) whose state differs, or that one file lacks."""

    idstr: str
    instance_id: int
    change: str  # "changed", "only_a", "only_b"


@dataclass
class DiffResult:
    a: str
    b: str
    blocks: dict[str, BlockDiff] = field(default_factory=dict)
    devices: list[DeviceDiff] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # block name -> why it was not compared

    @property
    def identical(self) -> bool:
        return not self.devices and all(d.count == 0 for d in self.blocks.values())

    def describe(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "identical": self.identical,
            "blocks": [d.describe() for d in self.blocks.values()],
            "devices": [{"idstr": d.idstr, "instance_id": d.instance_id, "change": d.change} for d in self.devices],
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped.items()],
        }


def check_comparable(a: Snapshot, b: Snapshot) -> None:
    """Raise NotComparable unless both files hold the same blocks with the same sizes."""
    if set(a.blocks) != set(b.blocks):
        only_a = sorted(set(a.blocks) - set(b.blocks))
        only_b = sorted(set(b.blocks) - set(a.blocks))
        raise NotComparable(
            "not snapshots of one VM: different RAM blocks"
            + (f"; only in {a.path}: {', '.join(only_a)}" if only_a else "")
            + (f"; only in {b.path}: {', '.join(only_b)}" if only_b else "")
        )
    for name, ba in a.blocks.items():
        bb = b.blocks[name]
        if (ba.used_length, ba.page_size) != (bb.used_length, bb.page_size):
            raise NotComparable(
                f"not snapshots of one VM: block {name!r} is {ba.used_length} bytes in {ba.page_size}-byte pages "
                f"in {a.path}, {bb.used_length} bytes in {bb.page_size}-byte pages in {b.path}"
            )


def _chunks(block: RamBlock, chunk_pages: int) -> Iterator[tuple[int, Pieces]]:
    """(first page of the chunk, its populated pieces) for every chunk that holds pages."""
    current, pieces = -1, []
    for ext in block.extents():
        first, count, offset = ext.first_page, ext.count, ext.file_offset
        while count:
            start = first // chunk_pages * chunk_pages
            take = min(count, start + chunk_pages - first)
            if start != current:
                if pieces:
                    yield current, pieces
                current, pieces = start, []
            pieces.append((first - start, take, offset))
            first, count, offset = first + take, count - take, offset + take * block.page_size
    if pieces:
        yield current, pieces


def _paired_chunks(a: RamBlock, b: RamBlock, chunk_pages: int) -> Iterator[tuple[int, Pieces, Pieces]]:
    """The chunks that hold pages in either block, with each block's pieces of it."""
    ia, ib = _chunks(a, chunk_pages), _chunks(b, chunk_pages)
    na, nb = next(ia, None), next(ib, None)
    while na or nb:
        start = min(x[0] for x in (na, nb) if x)
        pa = na[1] if na and na[0] == start else []
        pb = nb[1] if nb and nb[0] == start else []
        if pa:
            na = next(ia, None)
        if pb:
            nb = next(ib, None)
        yield start, pa, pb


class _Reader:
    """Fills a chunk buffer from one file: populated pieces read, the rest zeroed.

    Each worker thread keeps its own buffer; tasks return copies (indices), not views.
    """

    def __init__(self, path: str, chunk_bytes: int) -> None:
        self.path = path
        self.chunk_bytes = chunk_bytes
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._local = local()

    def close(self) -> None:
        os.close(self.fd)

    def fill(self, pieces: Pieces, pages: int, page_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(the chunk's bytes as one uint64 row per page, a bool per page: present)."""
        buf = getattr(self._local, "buffer", None)
        if buf is None:
            buf = self._local.buffer = np.empty(self.chunk_bytes, np.uint8)
        buf = buf[: pages * page_size]
        present = np.zeros(pages, dtype=bool)
        view = memoryview(buf)
        end = 0
        for first, count, offset in pieces:
            start, length = first * page_size, count * page_size
            buf[end:start] = 0
            got = 0
            while got < length:
                n = os.preadv(self.fd, [view[start + got : start + length]], offset + got)
                if n <= 0:
                    raise FormatError(
                        offset + got, f"{length - got} more bytes of page data in {self.path}", "end of file"
                    )
                got += n
            present[first : first + count] = True
            end = start + length
        buf[end:] = 0
        return buf.view(np.uint64).reshape(pages, page_size // 8), present


def _bounded_map(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], window: int) -> Iterator[R]:
    """pool.map that keeps at most ``window`` tasks in flight (the items are lazy)."""
    pending: deque[Future[R]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _diff_block(
    ba: RamBlock, bb: RamBlock, ra: _Reader, rb: _Reader, pool: ThreadPoolExecutor, workers: int
) -> BlockDiff:
    page_size = ba.page_size
    chunk_pages = ra.chunk_bytes // page_size

    def compare(task: tuple[int, Pieces, Pieces]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        start, pa, pb = task
        pages = min(chunk_pages, ba.num_pages - start)
        rows_a, present_a = ra.fill(pa, pages, page_size)
        rows_b, present_b = rb.fill(pb, pages, page_size)
        differ = (rows_a != rows_b).any(axis=1)
        return (
            start + np.flatnonzero(differ),
            start + np.flatnonzero(differ & present_a & ~present_b),
            start + np.flatnonzero(differ & present_b & ~present_a),
        )

    parts = list(_bounded_map(pool, compare, _paired_chunks(ba, bb, chunk_pages), 2 * workers))

    def join(i: int) -> np.ndarray:
        return np.concatenate([p[i] for p in parts]).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    return BlockDiff(ba.name, page_size, ba.num_pages, ba.populated, bb.populated, join(0), join(1), join(2))


def _device_key(sec: Section) -> tuple[str, int]:
    return (sec.idstr or "", sec.instance_id or 0)


def _device_diffs(a: Snapshot, b: Snapshot) -> list[DeviceDiff]:
    """Device sections whose payload bytes differ, matched by (idstr, instance)."""
    da = {_device_key(s): s for s in a.devices}
    db = {_device_key(s): s for s in b.devices}
    out = []
    for key, sa in da.items():
        sb = db.get(key)
        if sb is None:
            out.append(DeviceDiff(*key, "only_a"))
        elif _payload(a, sa) != _payload(b, sb):
            out.append(DeviceDiff(*key, "changed"))
    out += [DeviceDiff(*key, "only_b") for key in db if key not in da]
    return out


def _payload(snap: Snapshot, sec: Section) -> bytes:
    if sec.payload_offset is None or sec.payload_length is None:
        return b""
    return snap.read_bytes(sec.payload_offset, sec.payload_length)


def diff(
    a: str | os.PathLike[str] | Snapshot,
    b: str | os.PathLike[str] | Snapshot,
    *,
    workers: int = 2,
    chunk_bytes: int = CHUNK_BYTES,
    **open_args: Any,
) -> DiffResult:
    """Compare two snapshots of one VM: per block, the pages whose restored contents differ.

    ``a`` and ``b`` are paths (opened with ``open_args``) or open Snapshots; ``workers``
    threads (1 to MAX_WORKERS) compare ``chunk_bytes`` of each file at a time. Raises
    NotComparable when the blocks or their sizes differ, FormatError for a malformed file.
    """
    check_workers(workers)
    with ExitStack() as stack:
        sa = a if isinstance(a, Snapshot) else stack.enter_context(Snapshot(a, **open_args))
        sb = b if isinstance(b, Snapshot) else stack.enter_context(Snapshot(b, **open_args))
        check_comparable(sa, sb)
        result = DiffResult(sa.path, sb.path)
        page_size = max([blk.page_size for blk in [*sa.blocks.values(), *sb.blocks.values()]], default=8)
        chunk_bytes = max(chunk_bytes, page_size) // page_size * page_size
        ra = _Reader(sa.path, chunk_bytes)
        stack.callback(ra.close)
        rb = _Reader(sb.path, chunk_bytes)
        stack.callback(rb.close)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for name, ba in sa.blocks.items():
                bb = sb.blocks[name]
                if not (ba.in_file and bb.in_file):
                    result.skipped[name] = "not in the file (x-ignore-shared): its RAM lives outside the snapshot"
                    continue
                result.blocks[name] = _diff_block(ba, bb, ra, rb, pool, workers)
        result.devices = _device_diffs(sa, sb)
        return result
