"""Conversion between a classic stream and a mapped-ram file, device state unchanged.

The RAM of the source is read block by block; the device sections, the machine type
and the section ids are carried over byte for byte, so QEMU restores the output as it
would the input. Both outputs are made by mapper/output.py's rules.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from ..formats.constants import RamFlag, SectionType, VmCommand
from .encoder import StreamEncoder, configuration_vmdesc
from .output import output_file
from .snapshot import Snapshot
from .writer import DeviceState, SnapshotWriter

Progress = Callable[[int, int], None]


def to_mapped_ram(
    src: Snapshot,
    out_path: str | os.PathLike[str],
    *,
    channels: int = 4,
    overwrite: bool = True,
    progress: Progress | None = None,
) -> None:
    """Rewrite ``src`` (either kind) as a QEMU 10 mapped-ram file."""
    devices = DeviceState.from_snapshot(src)
    blocks = {b.name: b.read() for b in src}
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
        total = sum(len(b) for b in blocks.values())
        progress(total, total)


def to_stream(
    src: Snapshot, out_path: str | os.PathLike[str], *, overwrite: bool = True, progress: Progress | None = None
) -> None:
    """Rewrite ``src`` (either kind) as a classic stream: one PART section holding a PAGE
    record for every populated, non-zero page (the loader starts from zeroed RAM)."""
    devices = DeviceState.from_snapshot(src)
    enc = StreamEncoder(src.page_size, footers=devices.footers)
    sid = devices.ram_section_id
    caps = [c for c in src.capabilities if c != "mapped-ram"]
    machine = src.machine_type or "pc-i440fx-10.0"
    with output_file(out_path, overwrite=overwrite, source_fd=src.fd) as fd, os.fdopen(os.dup(fd), "wb", buffering=1 << 20) as out:
        out.write(enc.header() + enc.configuration(machine, caps))
        out.write(enc.ram_start(sid) + enc.ram_word(sum(b.used_length for b in src), RamFlag.MEM_SIZE))
        for block in src:
            out.write(enc.block_entry(block.name, block.used_length))
        out.write(enc.ram_word(0, RamFlag.EOS) + enc.footer(sid))
        out.write(enc.section_part(SectionType.SECTION_PART, sid))
        total = sum(b.populated for b in src) * src.page_size
        done = 0
        for block in src:
            data = block.read()
            pages = data.reshape(-1, block.page_size)
            name: str | None = block.name
            for first, count in block.runs():
                nonzero = pages[first : first + count].view(np.uint64).any(axis=1)
                for page in (first + np.flatnonzero(nonzero)).tolist():
                    out.write(enc.page_record(name, page, pages[page].data))
                    name = None  # CONTINUE: same block as the previous record
                done += count * block.page_size
                if progress:
                    progress(done, total)
        out.write(enc.ram_word(0, RamFlag.EOS) + enc.footer(sid))
        out.write(enc.command(VmCommand.SWITCHOVER_START))
        out.write(enc.ram_eos_section(SectionType.SECTION_END, sid))
        out.write(devices.sections)
        out.write(
            enc.eof(
                {
                    "configuration": configuration_vmdesc(machine, caps),
                    "page_size": src.page_size,
                    "devices": devices.descriptions,
                }
            )
        )


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
