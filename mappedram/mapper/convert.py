"""Conversion between a classic stream and a mapped-ram file, device state unchanged.

The RAM of the source is read block by block; the device sections, the machine type
and the section ids are carried over byte for byte, so QEMU restores the output as it
would the input. Both outputs are made by mapper/output.py's rules.
"""

from __future__ import annotations

import errno
import os
from typing import Any, Callable, Iterator

import numpy as np

from ..errors import FormatError
from ..formats.constants import CAP_MAPPED_RAM
from .blocks import RamBlock, new_buffer, read_exact
from .encoder import DeviceState, StreamComposer
from .output import output_file
from .snapshot import Snapshot
from .writer import SnapshotWriter

Progress = Callable[[int, int], None]
PIECE_BYTES = 8 << 20  # the most read at a time when streaming a block's pages


def _check_page_sizes(src: Snapshot) -> None:
    """Both outputs have one page size for every block (QEMU's target page size)."""
    for block in src:
        if block.page_size != src.page_size:
            raise FormatError(
                block.entry_offset,
                f"block {block.name!r} to have the stream's page size {src.page_size}",
                str(block.page_size),
            )


def to_mapped_ram(
    src: Snapshot,
    out_path: str | os.PathLike[str],
    *,
    channels: int = 4,
    overwrite: bool = True,
    progress: Progress | None = None,
) -> None:
    """Rewrite ``src`` (either kind) as a QEMU 10 mapped-ram file. The blocks are read into
    lazily zeroed buffers: memory grows with the pages stored in ``src``, not with its claim."""
    _check_page_sizes(src)
    devices = DeviceState.from_snapshot(src)
    try:
        blocks = {b.name: new_buffer(b.name, b.used_length) for b in src}
    except MemoryError as err:  # a claim beyond this machine: one line, not a traceback
        raise OSError(errno.ENOMEM, f"{err}; not converted", src.path) from None
    total = sum(b.populated for b in src) * src.page_size
    before = 0  # bytes of the blocks read so far
    for block in src:
        step = (lambda done, _, base=before: progress(base + done, total)) if progress else None
        block.read_into(blocks[block.name], zero_fill=False, progress=step)
        before += block.populated * block.page_size
    with SnapshotWriter(
        out_path,
        blocks,
        channels=channels,
        page_size=src.page_size,
        devices=devices,
        overwrite=overwrite,
        source_fd=src.fd,
    ) as writer:
        writer.complete()
    if progress:
        progress(total, total)


def _stored_pages(block: RamBlock) -> Iterator[tuple[int, np.ndarray]]:
    """The pages the file holds for ``block``, as (first page, rows) read PIECE_BYTES at a time."""
    ps = block.page_size
    per = max(1, PIECE_BYTES // ps)
    for ext in block.extents():
        for k in range(0, ext.count, per):
            count = min(per, ext.count - k)
            rows = np.empty((count, ps), dtype=np.uint8)
            read_exact(block.fd, memoryview(rows).cast("B"), ext.file_offset + k * ps, f"pages of {block.name!r}")
            yield ext.first_page + k, rows


def to_stream(
    src: Snapshot, out_path: str | os.PathLike[str], *, overwrite: bool = True, progress: Progress | None = None
) -> None:
    """Rewrite ``src`` (either kind) as a classic stream: one PART section holding a PAGE
    record for every populated, non-zero page (the loader starts from zeroed RAM). Pages
    are streamed in bounded pieces, whatever RAM size the source claims."""
    _check_page_sizes(src)
    devices = DeviceState.from_snapshot(src)
    comp = StreamComposer(
        src.page_size, capabilities=[c for c in src.capabilities if c != CAP_MAPPED_RAM], devices=devices
    )
    with (
        output_file(out_path, overwrite=overwrite, source_fd=src.fd) as fd,
        os.fdopen(os.dup(fd), "wb", buffering=1 << 20) as out,
    ):
        head = comp.head()
        pieces, _, _ = comp.ram_start(len(head), [(b.name, b.used_length) for b in src])
        out.write(head + b"".join(data for _, data in pieces))
        out.write(comp.part_start())
        total = sum(b.populated for b in src) * src.page_size
        done = 0
        for block in src:
            name: str | None = block.name
            for first, rows in _stored_pages(block):
                nonzero = rows.view(np.uint64).any(axis=1)
                for i in np.flatnonzero(nonzero).tolist():
                    out.write(comp.page_record(name, first + i, rows[i].data))
                    name = None  # CONTINUE: same block as the previous record
                done += rows.nbytes
                if progress:
                    progress(done, total)
        out.write(comp.section_end())
        out.write(comp.tail())


def convert(
    src_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    to: str,
    *,
    channels: int = 4,
    overwrite: bool = True,
    progress: Progress | None = None,
    **open_args: Any,
) -> None:
    """``to`` is "mapped-ram" or "stream". The output is made by mapper/output.py's rules
    (``overwrite``: replace an existing file)."""
    with Snapshot(src_path, **open_args) as src:
        if to == "mapped-ram":
            to_mapped_ram(src, out_path, channels=channels, overwrite=overwrite, progress=progress)
        elif to == "stream":
            to_stream(src, out_path, overwrite=overwrite, progress=progress)
        else:
            raise ValueError(f"convert to 'mapped-ram' or 'stream', not {to!r}")
