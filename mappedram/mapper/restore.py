"""Parallel restore: channel threads preadv pages straight into the destination memory.

The main thread walks each block's populated runs, cuts them into pieces of at most
MAPPED_RAM_LOAD_BUF_SIZE (1 MiB, QEMU's largest read) and hands them to the channels.
The channels sync where the mode's policy says: for mapped-ram once, at the very end
of the load, never per block (multifd_recv_sync_main "once and for all").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from ..errors import FormatError
from ..formats.constants import MAPPED_RAM_LOAD_BUF_SIZE
from ..formats.policy import Event, Sync
from .blocks import Progress, RamBlock, new_buffer, not_in_file, read_exact
from .channels import Channels, pwrite_all
from .output import output_file

# One channel item: up to ITEM_PIECES reads and about ITEM_BYTES, so sparse runs do not
# cost a queue hand-off each: (destination views, file offsets, block name).
_Item = tuple[list[memoryview], list[int], str]
ITEM_PIECES = 64
ITEM_BYTES = 4 << 20


@dataclass
class RestoreStats:
    bytes_read: int = 0
    syncs: int = 0


def _read_item(fd: int, item: _Item) -> None:
    views, offsets, name = item
    for view, offset in zip(views, offsets):
        read_exact(fd, view, offset, f"pages of {name!r}")


def _target_view(block: RamBlock, target: Any) -> memoryview:
    view = memoryview(target).cast("B")
    if view.readonly:
        raise ValueError(f"the target of block {block.name!r} is read-only")
    if len(view) != block.used_length:
        raise ValueError(f"the target of block {block.name!r} holds {len(view)} bytes, the block {block.used_length}")
    return view


def split_pieces(
    firsts: np.ndarray, counts: np.ndarray, offsets: np.ndarray, page_size: int, limit: int = MAPPED_RAM_LOAD_BUF_SIZE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut runs into reads of at most ``limit`` bytes: (dest byte offsets, lengths, file offsets)."""
    per = max(1, limit // page_size)
    parts = -(-counts // per)
    run = np.repeat(np.arange(len(counts)), parts)
    k = np.arange(len(run)) - np.repeat(np.cumsum(parts) - parts, parts)
    first = firsts[run] + k * per
    count = np.minimum(per, counts[run] - k * per)
    return first * page_size, count * page_size, offsets[run] + k * per * page_size


def restore_into(
    snapshot: Any,
    targets: Mapping[str, Any],
    *,
    channels: int = 4,
    zero_fill: bool = True,
    progress: Progress | None = None,
) -> RestoreStats:
    """Fill ``targets`` (block name -> writable buffer of used_length bytes) from the file.

    Pages whose bit is clear come out as zero: with ``zero_fill`` they are cleared
    (needed for a reused buffer or an existing file; a fresh ``np.zeros`` array is zero
    already). Blocks not named in ``targets`` are skipped.
    """
    blocks = [snapshot.block(name) for name in targets]
    views = {b.name: _target_view(b, targets[b.name]) for b in blocks}
    total = sum(b.populated * b.page_size for b in blocks)
    stats = RestoreStats()
    pool: Channels[_Item] = Channels(snapshot.path, channels, os.O_RDONLY, _read_item, "restore")
    try:
        for block in blocks:
            _queue_block(pool, block, views[block.name], zero_fill, stats, total, progress)
            if snapshot.policy.sync_at(Event.BLOCK_END) is Sync.LOCAL:
                pool.sync()
        if snapshot.policy.sync_at(Event.LOAD_END) is Sync.LOCAL:
            pool.sync()
        stats.syncs = pool.syncs
    finally:
        pool.close()
    return stats


def _queue_block(
    pool: Channels[_Item],
    block: RamBlock,
    view: memoryview,
    zero_fill: bool,
    stats: RestoreStats,
    total: int,
    progress: Progress | None,
) -> None:
    ps = block.page_size
    zeros = np.frombuffer(view, dtype=np.uint8) if zero_fill else None
    end = 0  # bytes of the target settled so far
    for firsts, counts, offsets in block.extent_arrays():
        if zeros is not None:  # clear the gaps between populated runs
            starts = firsts * ps
            for gap_start, gap_end in zip([end, *((firsts + counts)[:-1] * ps).tolist()], starts.tolist()):
                zeros[gap_start:gap_end] = 0
            end = int((firsts[-1] + counts[-1]) * ps)
        dests, lengths, file_offsets = split_pieces(firsts, counts, offsets, ps)
        before = np.cumsum(lengths) - lengths
        group = np.maximum(np.arange(len(dests)) // ITEM_PIECES, before // ITEM_BYTES)
        edges = [0, *(np.flatnonzero(np.diff(group)) + 1).tolist(), len(dests)]
        for a, b in zip(edges[:-1], edges[1:]):
            d, n = dests[a:b].tolist(), lengths[a:b].tolist()
            pool.submit(([view[x : x + y] for x, y in zip(d, n)], file_offsets[a:b].tolist(), block.name))
            stats.bytes_read += sum(n)
            if progress:
                progress(stats.bytes_read, total)
    if zeros is not None:
        zeros[end:] = 0


def restore(
    path: str | os.PathLike[str], *, channels: int = 4, blocks: list[str] | None = None, **open_args: Any
) -> dict[str, np.ndarray]:
    """Every block (or the named ones) of a snapshot as fresh numpy uint8 arrays."""
    from .snapshot import open as open_snapshot

    with open_snapshot(path, **open_args) as snap:
        names = blocks if blocks is not None else list(snap.blocks)
        out = {name: new_buffer(name, snap.block(name).used_length) for name in names}
        restore_into(snap, out, channels=channels, zero_fill=False)
    return out


def extract(
    snapshot: Any,
    name: str,
    out_path: str | os.PathLike[str],
    *,
    overwrite: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Write one block as a sparse raw file (holes for clear pages); returns bytes copied.

    The file is made by mapper/output.py's rules (``overwrite``: replace an existing file).
    """
    block = snapshot.block(name)
    if not block.in_file:
        raise ValueError(not_in_file(block))
    done = 0
    with output_file(out_path, overwrite=overwrite, source_fd=snapshot.fd) as fd:
        os.ftruncate(fd, block.used_length)
        total = block.populated * block.page_size
        for ext in block.extents():
            length = ext.count * block.page_size
            _copy_range(snapshot.fd, fd, ext.file_offset, ext.first_page * block.page_size, length)
            done += length
            if progress:
                progress(done, total)
    return done


def _copy_range(src_fd: int, dst_fd: int, src_off: int, dst_off: int, length: int) -> None:
    """Kernel-side copy where the filesystem allows it, else pread/pwrite in 8 MiB pieces."""
    while length:
        try:
            n = os.copy_file_range(src_fd, dst_fd, length, src_off, dst_off)
        except OSError:
            n = 0
        if n <= 0:
            data = os.pread(src_fd, min(length, 8 << 20), src_off)
            if not data:
                raise FormatError(src_off, f"{length} more bytes of page data", "end of file")
            pwrite_all(dst_fd, memoryview(data), dst_off)
            n = len(data)
        src_off += n
        dst_off += n
        length -= n
