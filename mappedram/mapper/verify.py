"""Structural checks of a snapshot file: ``mappedram verify``.

Reads the stream, the block headers and the bitmaps, never the page data (unless
hashes are asked for). Each problem carries the file offset it was found at.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import FormatError
from ..formats.constants import RAM_IDSTR
from .blocks import MappedRamBlock, RamBlock
from .copy_plan import GAP, copy_plan, zero_chunks
from .elements import Problem
from .forward import ForwardSnapshot, InOrderHashes, open_image
from .snapshot import Snapshot
from .source import read_exact

HASH_PIECE = 8 << 20  # bytes read and hashed at once


@dataclass
class Report:
    path: str
    problems: list[Problem] = field(default_factory=list)
    hashes: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> dict[str, Any]:
        return {
            "file": self.path,
            "valid": self.ok,
            "problems": [{"offset": p.offset, "message": p.text} for p in self.problems],
            "notes": self.notes,
            "sha256": self.hashes,
        }


def verify(
    path: str | os.PathLike[str],
    *,
    hash_blocks: bool = False,
    progress: Callable[[int, int], None] | None = None,
    **open_args: Any,
) -> Report:
    """Check a file; a file that cannot be parsed yields one problem, not an exception.

    OSError (a missing or unreadable file) is left to the caller.
    """
    report = Report(os.fspath(path))
    try:
        snap = open_image(path, progress=progress if hash_blocks else None, **open_args)
    except FormatError as err:
        report.problems.append(Problem(err.offset, _expected(err)))
        return report
    with snap:
        try:
            forward = InOrderHashes(list(snap)) if hash_blocks and isinstance(snap, ForwardSnapshot) else None
            if forward is not None:
                snap.consume(forward)  # the image's one pass, before the checks walk it
            _check(snap, report)
            if forward is not None and not report.problems:
                hashes, notes = forward.results(snap.blocks)
                report.hashes.update(hashes)
                report.notes += notes
            elif hash_blocks and not report.problems:
                total = sum(b.used_length for b in snap if b.in_file)
                done = 0
                for block in snap:
                    if not block.in_file:
                        report.notes.append(f"block {block.name!r} is not in the file (x-ignore-shared): no hash")
                        continue
                    step = None if progress is None else (lambda n, base=done: progress(base + n, total))
                    report.hashes[block.name] = block_sha256(block, step)
                    done += block.used_length
        except FormatError as err:
            report.problems.append(Problem(err.offset, _expected(err)))
        report.problems[:0] = [p for p in snap.problems if p not in report.problems]
    report.problems.sort(key=lambda p: p.offset)
    return report


def _expected(err: FormatError) -> str:
    return f"expected {err.expected}" + (f", found {err.found}" if err.found is not None else "")


def _check(snap: Snapshot, report: Report) -> None:
    problems = report.problems
    sections = snap.sections  # walks the whole stream: flags, footers, EOF
    ram = [s for s in sections if s.idstr == RAM_IDSTR]
    kinds = [s.kind for s in ram]
    if not kinds or kinds[0] != "start" or kinds[-1] != "end" or kinds.count("end") != 1:
        problems.append(
            Problem(
                ram[0].offset if ram else snap.stream_start,
                f"expected a RAM section that opens with START and closes with one END, found {kinds}",
            )
        )
    total = sum(b.used_length for b in snap)
    if snap.ram_total is not None and total != snap.ram_total:
        problems.append(
            Problem(
                snap.ram_section_offset or 0,
                f"expected block lengths adding up to MEM_SIZE {snap.ram_total}, found {total}",
            )
        )
    _check_vmdesc(snap, report)
    mapped = [b for b in snap if isinstance(b, MappedRamBlock) and b.in_file]  # others own no file bytes
    for block in mapped:
        _check_block(snap, block, problems)
    _check_regions(snap, mapped, problems)


def _check_vmdesc(snap: Snapshot, report: Report) -> None:
    if snap.vmdesc_location is None:
        report.notes.append(
            "no VM description after EOF (suppress-vmdesc or postcopy); device sections were delimited by their footers"
        )
        return
    desc = snap.vmdesc
    offset = snap.vmdesc_location[0]
    if desc is None:
        return  # the parse problem is already in snap.problems
    page_size = desc.get("page_size")
    if page_size is not None and page_size != snap.page_size:
        report.problems.append(
            Problem(offset, f"expected VM description page_size {snap.page_size}, found {page_size}")
        )
    devices = desc.get("devices")
    if not isinstance(devices, list):
        report.problems.append(Problem(offset, "expected a 'devices' list in the VM description, found none"))
    elif len(devices) != len(snap.devices):
        report.problems.append(
            Problem(
                offset,
                f"expected {len(snap.devices)} device entries in the VM description "
                f"(one per FULL section), found {len(devices)}",
            )
        )


def _check_block(snap: Snapshot, block: MappedRamBlock, problems: list[Problem]) -> None:
    if block.page_size != snap.page_size:
        problems.append(
            Problem(
                block.place.field_offset("page_size"),
                f"expected block {block.name!r} to have the stream's page size {snap.page_size}, "
                f"found {block.page_size}",
            )
        )
    if block.pages_offset % block.page_size:
        problems.append(
            Problem(
                block.place.field_offset("pages_offset"),
                f"expected block {block.name!r}: pages_offset aligned to the "
                f"page size {block.page_size}, found {block.pages_offset:#x}",
            )
        )
    stray = block.stray_bits()
    if stray:
        problems.append(
            Problem(
                block.bitmap_offset + block.bitmap_size - 1,
                f"expected block {block.name!r}: bitmap bits past page {block.num_pages} clear, found {stray} set",
            )
        )


def _check_regions(snap: Snapshot, blocks: list[MappedRamBlock], problems: list[Problem]) -> None:
    """Bitmaps, page regions and the stream itself must not overlap."""
    regions: list[tuple[int, int, str]] = []
    if snap.libvirt:
        regions.append((0, snap.stream_start, "the libvirt header"))
    stream_from = snap.stream_start
    for block in blocks:
        header_end = block.place.header_end
        regions.append((stream_from, header_end, f"the stream up to the header of {block.name!r}"))
        regions.append((block.bitmap_offset, block.bitmap_offset + block.bitmap_size, f"the bitmap of {block.name!r}"))
        regions.append((block.pages_offset, block.pages_offset + block.used_length, f"the pages of {block.name!r}"))
        stream_from = block.pages_offset + block.used_length
    regions.append((stream_from, snap.size, "the stream after the last block"))
    regions = [r for r in regions if r[1] > r[0]]
    regions.sort()
    reach_end, reach_name = 0, ""
    for start, end, name in regions:
        if start < reach_end:
            problems.append(
                Problem(
                    start,
                    f"expected {name} apart from {reach_name}, found them overlapping up to {min(end, reach_end):#x}",
                )
            )
        if end > reach_end:
            reach_end, reach_name = end, name


def block_sha256(block: RamBlock, progress: Callable[[int], None] | None = None) -> str:
    """sha256 of the block as the guest sees it: the copy plan's pieces read into one
    buffer, its gaps fed as zeros from a shared buffer. Bounded memory; the time still
    follows the RAM the block claims, not the file (issue 11 item 8)."""
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(min(HASH_PIECE, max(block.used_length, 1))))
    done = 0
    for steps in copy_plan(block.extent_arrays(), block.page_size, 0, block.used_length, HASH_PIECE):
        for _, length, file_offset in steps:
            if file_offset == GAP:
                for zeros in zero_chunks(length):
                    digest.update(zeros)
                    done += len(zeros)
                    if progress:
                        progress(done)
                continue
            piece = buffer[:length]
            read_exact(block.fd, piece, file_offset, block.name)
            digest.update(piece)
            done += length
            if progress:
                progress(done)
    return digest.hexdigest()
