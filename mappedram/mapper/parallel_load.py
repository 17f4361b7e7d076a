"""Parallel restore: channel threads preadv pages straight into the destination memory.

The main thread walks each block's populated runs, cuts them into pieces of at most
MAPPED_RAM_LOAD_BUF_SIZE (1 MiB, QEMU's largest read) and hands them to the channels.
The channels sync where the mode's policy says: for mapped-ram once, at the very end
of the load, never per block (multifd_recv_sync_main "once and for all").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..formats.constants import MAPPED_RAM_LOAD_BUF_SIZE
from ..formats.policy import Event, ModePolicy, Sync
from .blocks import Progress, RamBlock
from .channels import Channels
from .source import read_exact

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


def load_blocks(
    path: str,
    blocks: list[RamBlock],
    policy: ModePolicy,
    targets: Mapping[str, Any],
    *,
    channels: int = 4,
    zero_fill: bool = True,
    progress: Progress | None = None,
) -> RestoreStats:
    """Fill ``targets[block.name]`` (writable buffers of used_length bytes) for each of
    ``blocks`` from the file at ``path``; see ``Snapshot.restore_into``."""
    views = {b.name: _target_view(b, targets[b.name]) for b in blocks}
    total = sum(b.populated * b.page_size for b in blocks)
    stats = RestoreStats()
    pool: Channels[_Item] = Channels(path, channels, os.O_RDONLY, _read_item, "restore")
    try:
        for block in blocks:
            _queue_block(pool, block, views[block.name], zero_fill, stats, total, progress)
        if policy.sync_at(Event.LOAD_END) is Sync.LOCAL:
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
