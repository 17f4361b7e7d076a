"""Restoring a snapshot's RAM: into fresh arrays, into caller buffers, or one block into a file."""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import numpy as np

from .blocks import Progress, new_buffer, not_in_file
from .copy_plan import GAP, copy_plan, copy_range
from .forward import ForwardSnapshot, extract_forward
from .images import open_image
from .output import output_file
from .parallel_load import RestoreStats
from .snapshot import Snapshot


def restore_into(
    snapshot: Snapshot,
    targets: Mapping[str, Any],
    *,
    channels: int = 4,
    zero_fill: bool = True,
    progress: Progress | None = None,
) -> RestoreStats:
    """``snapshot.restore_into(...)``: fill ``targets`` (block name -> writable buffer of
    used_length bytes) from the file, in parallel."""
    return snapshot.restore_into(targets, channels=channels, zero_fill=zero_fill, progress=progress)


def restore(
    path: str | os.PathLike[str],
    *,
    channels: int = 4,
    blocks: list[str] | None = None,
    huge_pages: bool = False,
    **open_args: Any,
) -> dict[str, np.ndarray]:
    """Every block (or the named ones) of a snapshot as fresh numpy uint8 arrays.
    ``huge_pages``: arrays in memory advised for transparent huge pages (see
    ``new_buffer``; measured no faster on the test machine, so off by default)."""
    with open_image(path, **open_args) as snap:
        names = blocks if blocks is not None else list(snap.blocks)
        out = {name: new_buffer(name, snap.block(name).used_length, huge_pages) for name in names}
        snap.restore_into(out, channels=channels, zero_fill=False)
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
    if isinstance(snapshot, ForwardSnapshot):
        return extract_forward(snapshot, name, out_path, overwrite=overwrite, progress=progress)
    done = 0
    with output_file(out_path, overwrite=overwrite, source_fd=snapshot.fd) as fd:
        os.ftruncate(fd, block.used_length)
        total = block.populated * block.page_size
        for steps in copy_plan(block.extent_arrays(), block.page_size, 0, block.used_length):
            for dest, length, file_offset in steps:
                if file_offset == GAP:
                    continue  # a hole of the truncated file reads as zeros
                copy_range(snapshot.fd, fd, file_offset, dest, length)
                done += length
                if progress:
                    progress(done, total)
    return done
