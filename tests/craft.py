"""Making test files with the project's own schemas: whole snapshots and targeted patches."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

import mappedram
from mappedram.formats import structs as S
from mappedram.formats.bitmap import LITTLE_ENDIAN_64
from mappedram.formats.constants import CAP_MAPPED_RAM, RamFlag
from mappedram.mapper.convert import to_stream
from mappedram.mapper.encoder import StreamComposer
from mappedram.mapper.writer import SnapshotWriter

PAGE = 4096


def pattern_block(pages: int, page_size: int = PAGE, zero: tuple[int, ...] = (), seed: int = 1) -> np.ndarray:
    """A block whose page i starts with the number i (and random bytes); listed pages zero."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, pages * page_size, dtype=np.uint8)
    view = data.reshape(pages, page_size)
    view[:, :8] = np.arange(pages, dtype="<u8").view(np.uint8).reshape(pages, 8)
    view[list(zero)] = 0
    return data


def write_snapshot(path: Path, blocks: dict[str, Any], **kw: Any) -> Path:
    with SnapshotWriter(path, blocks, **kw) as writer:
        writer.complete()
    return path


def patch(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def block_info(path: Path, name: str, **open_args: Any) -> dict[str, Any]:
    with mappedram.open(path, **open_args) as snap:
        return snap.block(name).describe()


def patch_header(path: Path, name: str, **fields: int) -> dict[str, Any]:
    """Rewrite fields of a block's MappedRamHeader in place; returns the old header info."""
    info = block_info(path, name)
    header = {
        "version": info["mapped_ram_version"],
        "page_size": info["page_size"],
        "bitmap_offset": info["bitmap_offset"],
        "pages_offset": info["pages_offset"],
        **fields,
    }
    patch(path, info["header_offset"], S.MappedRamHeader.build(header))
    return info


def section(path: Path, kind: str, idstr: str | None = None) -> Any:
    with mappedram.open(path) as snap:
        return next(s for s in snap.sections if s.kind == kind and (idstr is None or s.idstr == idstr))


def truncate_copy(src: Path, dest: Path, length: int) -> Path:
    """The first ``length`` bytes of ``src``, sparse where src is."""
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        remaining = length
        while remaining:
            chunk = fin.read(min(remaining, 1 << 20))
            if not chunk:
                break
            if chunk.count(0) == len(chunk):
                fout.seek(len(chunk), os.SEEK_CUR)
            else:
                fout.write(chunk)
            remaining -= len(chunk)
        fout.truncate()
    return dest


def stream_claiming(directory: Path, claim: int, pages: np.ndarray | None = None) -> Path:
    """A classic stream holding ``pages`` (four patterned ones by default) whose block
    pc.ram claims ``claim`` bytes: a stream's RAM size is not bounded by its file."""
    pages = pattern_block(4) if pages is None else pages
    small = write_snapshot(directory / "claim-source.sav", {"pc.ram": pages})
    legacy = directory / "claims.sav"
    with mappedram.open(small) as snap:
        to_stream(snap, legacy)
    mem_size = section(legacy, "start", "ram").payload_offset  # the RAM section opens with MEM_SIZE
    with mappedram.open(legacy) as snap:
        entry = snap.block("pc.ram").entry_offset
    patch(legacy, mem_size, S.RamWord.build(claim | RamFlag.MEM_SIZE))
    patch(legacy, entry + 1 + len("pc.ram"), S.RamWord.build(claim))
    return legacy


def one_page_stream(path: Path, middle, mapped: bool = True) -> Path:
    """A valid stream with one 1-page block; ``middle(composer)`` goes between the RAM
    START section and the tail (SWITCHOVER_START, RAM END, EOF, VM description)."""
    comp = StreamComposer(PAGE, capabilities=[CAP_MAPPED_RAM] if mapped else [])
    head = comp.head()
    pieces, _, end = comp.ram_start(len(head), [("pc.ram", PAGE)], LITTLE_ENDIAN_64 if mapped else None)
    out = bytearray(end)
    out[: len(head)] = head
    for offset, data in pieces:
        out[offset : offset + len(data)] = data
    path.write_bytes(bytes(out) + middle(comp) + comp.tail())
    return path
