"""Parallel restore: channel threads preadv pages straight into the destination memory.

The main thread follows each block's copy plan (pieces of at most
MAPPED_RAM_LOAD_BUF_SIZE, 1 MiB, QEMU's largest read) and hands the pieces to the channels.
The channels sync where the mode's policy says: for mapped-ram once, at the very end
of the load, never per block (multifd_recv_sync_main "once and for all").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..formats.policy import Event, ModePolicy, Sync
from .blocks import Progress, RamBlock
from .channels import Channels
from .copy_plan import GAP, copy_plan
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
    zeros = np.frombuffer(view, dtype=np.uint8) if zero_fill else None
    for steps in copy_plan(block.extent_arrays(), block.page_size, 0, block.used_length):
        data = steps.file_offset != GAP
        if zeros is not None:  # clear the gaps between populated runs
            for gap_start, gap_length in zip(steps.dest[~data].tolist(), steps.length[~data].tolist()):
                zeros[gap_start : gap_start + gap_length] = 0
        dests, lengths, file_offsets = steps.dest[data], steps.length[data], steps.file_offset[data]
        before = np.cumsum(lengths) - lengths
        group = np.maximum(np.arange(len(dests)) // ITEM_PIECES, before // ITEM_BYTES)
        edges = [0, *(np.flatnonzero(np.diff(group)) + 1).tolist(), len(dests)] if len(dests) else [0]
        for a, b in zip(edges[:-1], edges[1:]):
            d, n = dests[a:b].tolist(), lengths[a:b].tolist()
            pool.submit(([view[x : x + y] for x, y in zip(d, n)], file_offsets[a:b].tolist(), block.name))
            stats.bytes_read += sum(n)
            if progress:
                progress(stats.bytes_read, total)
