"""Guest-physical view of an x86 snapshot, and its export as an ELF core.

The file does not record where a RAM block sits in guest-physical memory (FORMAT.md
§5); for x86 `pc` (i440fx) and `q35` machines QEMU's rule is known:

- "pc.ram" is split at the PCI hole (formats/x86.py, ``below_4g``): its first part is
  mapped from 0, the rest from 4 GiB.
- The legacy VGA window [0xa0000, 0xc0000) is device memory, not RAM; [0xc0000,
  0x100000) is RAM again once the firmware has shadowed its ROMs there (SeaBIOS does,
  through the PAM registers), so it is taken from pc.ram.
- "pc.bios" is mapped just below 4 GiB.
- Anything else (video RAM behind a PCI BAR, option ROMs) depends on what the
  firmware programmed; give it with ``extra={"0000:00:02.0/vga.vram": 0xfd000000}``.
  A block named there is placed whole at that address, pc.ram and pc.bios too (instead of
  the rule above): so are other machines' blocks exported.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Callable, Mapping

from ..errors import FormatError
from ..formats.x86 import ADDRESS_END, BIOS, FOUR_GIB, MAIN_RAM, VGA_WINDOW, address_problem, below_4g, below_4g_problem
from .blocks import RamBlock, not_in_file
from .channels import pwrite_all
from .copy_plan import GAP, copy_plan, copy_range
from .cpunotes import CoreNotes, cpu_notes
from .forward import ForwardSnapshot, copy_regions_forward
from .output import output_file
from .snapshot import Snapshot

QEMU_LAYOUT, MAPPED, BELOW_4G = "QEMU's layout", "--map", "--below-4g"  # who placed a region


@dataclass(frozen=True)
class Region:
    """``size`` bytes of ``block`` from ``offset``, at guest-physical ``start``; ``origin``
    says who placed it there (QEMU's layout or an option), for the error lines."""

    start: int
    size: int
    block: str
    offset: int
    origin: str = QEMU_LAYOUT

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def given(self) -> bool:
        """Placed by the caller (--map, --below-4g), not by QEMU's layout from the file."""
        return self.origin != QEMU_LAYOUT

    def __str__(self) -> str:
        return f"{self.block} at {self.start:#x}-{self.end:#x} ({self.origin})"


class PhysicalView:
    """Read guest-physical memory of a snapshot: ``view.read(addr, n)``.

    ``extra`` places blocks (export-elf's --map): each whole from its address; pc.ram or
    pc.bios named there replace QEMU's layout for them. ``below_4g_size`` (--below-4g)
    overrides QEMU's split of pc.ram. Error messages name the two options. A mistake of the
    caller (a block the file does not list or does not hold, placements that overlap or end
    past 2^64) is a ValueError; a block whose length from the file does not fit QEMU's
    layout is a FormatError at its entry. ``left_out`` lists, one line each, the blocks of
    QEMU's layout that the file leaves out (x-ignore-shared); without pc.ram in the file,
    ``extra`` must place what to export.
    """

    def __init__(
        self, snapshot: Snapshot, *, below_4g_size: int | None = None, extra: Mapping[str, int] | None = None
    ) -> None:
        if below_4g_size is not None and (why := below_4g_problem(below_4g_size)):
            raise ValueError(f"below_4g_size: expected {why}, found {below_4g_size!r}")
        self.snapshot = snapshot
        extra = dict(extra or {})
        self.left_out: list[str] = []
        regions = _placed(snapshot, extra) + self._qemu_layout(below_4g_size, extra)
        regions = sorted((r for r in regions if r.size > 0), key=lambda r: r.start)
        for r in regions:
            if r.end > ADDRESS_END:
                if r.origin == MAPPED:  # else the file's length of the block ends it there
                    raise ValueError(f"{r.block} at {r.start:#x} ({r.size} bytes) ends past the 64-bit address space")
                raise FormatError(
                    snapshot.block(r.block).entry_offset,
                    f"{r.block!r} to fit below 2^64 from {r.start:#x}",
                    f"{r.size} bytes",
                )
        for a, b in zip(regions, regions[1:]):
            if a.end > b.start:
                if a.given or b.given:
                    raise ValueError(f"{a} overlaps {b}")
                raise FormatError(
                    snapshot.block(b.block).entry_offset,
                    "RAM blocks that do not overlap in QEMU's layout",
                    f"{a} and {b}",
                )
        self.regions = regions

    def _qemu_layout(self, below_4g_size: int | None, extra: Mapping[str, int]) -> list[Region]:
        """pc.ram and pc.bios where QEMU puts them, unless ``extra`` places them."""
        snap, regions = self.snapshot, []
        ram = snap.blocks.get(MAIN_RAM)
        if MAIN_RAM in extra:
            if below_4g_size is not None:
                raise ValueError(
                    f"{BELOW_4G} splits {MAIN_RAM} around the PCI hole and {MAPPED} {MAIN_RAM}=ADDR places it whole: "
                    "give one of them"
                )
        elif ram is None or not ram.in_file:
            why = (
                f"no RAM block {MAIN_RAM!r} (the main RAM of x86 pc and q35 machines)"
                if ram is None
                else not_in_file(ram)
            )
            if below_4g_size is not None:
                raise ValueError(f"{BELOW_4G} splits {MAIN_RAM}, which cannot be exported: {why}")
            if not extra:
                held = ", ".join(b.name for b in snap if b.in_file) or "none"
                raise ValueError(f"{why}; give {MAPPED} BLOCK=ADDR to place the blocks to export (in the file: {held})")
            if ram is not None:
                self.left_out.append(f"{MAIN_RAM}: not in the file (x-ignore-shared), not exported")
        else:
            regions += _main_ram(snap, ram, below_4g_size)
        bios = snap.blocks.get(BIOS)
        if bios is not None and BIOS not in extra:
            if not bios.in_file:
                self.left_out.append(f"{BIOS}: not in the file (x-ignore-shared), not exported")
            elif bios.used_length > FOUR_GIB:
                raise FormatError(bios.entry_offset, f"{BIOS!r} to fit below 4 GiB", f"{bios.used_length} bytes")
            else:
                regions.append(Region(FOUR_GIB - bios.used_length, bios.used_length, BIOS, 0))
        return regions

    def read(self, addr: int, size: int) -> bytes:
        """``size`` bytes from guest-physical ``addr``; every byte must be RAM."""
        if size < 0:
            raise ValueError(f"a size of at least 0 bytes, not {size}")
        out = bytearray()
        while size > 0:
            region = next((r for r in self.regions if r.start <= addr < r.end), None)
            if region is None:
                raise ValueError(f"guest-physical {addr:#x} is not RAM in this view")
            block = self.snapshot.block(region.block)
            take = min(size, region.end - addr)
            out += _block_bytes(block, region.offset + addr - region.start, take)
            addr += take
            size -= take
        return bytes(out)


def _placed(snap: Snapshot, extra: Mapping[str, int]) -> list[Region]:
    """The blocks the caller placed, each whole from its address."""
    regions = []
    for name, base in extra.items():
        if why := address_problem(base):
            raise ValueError(f"extra[{name!r}]: expected {why}, found {base!r}")
        block = snap.blocks.get(name)
        if block is None:
            raise ValueError(
                f"{MAPPED} {name}={base:#x}: no RAM block {name!r} in the file; blocks: {', '.join(snap.blocks)}"
            )
        if not block.in_file:
            raise ValueError(f"{MAPPED} {name}={base:#x}: {not_in_file(block)}")
        regions.append(Region(base, block.used_length, name, 0, MAPPED))
    return regions


def _main_ram(snap: Snapshot, ram: RamBlock, below_4g_size: int | None) -> list[Region]:
    """pc.ram split at the PCI hole, the VGA window left out (the module's docstring)."""
    if below_4g_size is None:
        try:
            low, origin = below_4g(snap.machine_type, ram.used_length), QEMU_LAYOUT
        except ValueError:
            raise ValueError(
                f"no guest-physical layout known for machine type {snap.machine_type!r} (x86 pc and q35 only): "
                f"give {BELOW_4G} BYTES, or {MAPPED} {MAIN_RAM}=ADDR"
            ) from None
    else:
        low, origin = below_4g_size, BELOW_4G
    low = min(low, ram.used_length)
    regions = [Region(0, min(low, VGA_WINDOW[0]), MAIN_RAM, 0, origin)]
    if low > VGA_WINDOW[1]:
        regions.append(Region(VGA_WINDOW[1], low - VGA_WINDOW[1], MAIN_RAM, VGA_WINDOW[1], origin))
    if ram.used_length > low:
        regions.append(Region(FOUR_GIB, ram.used_length - low, MAIN_RAM, low, origin))
    return regions


def _block_bytes(block: RamBlock, offset: int, size: int) -> bytes:
    out = bytearray()
    ps = block.page_size
    while size > 0:
        page, within = divmod(offset, ps)
        take = min(size, ps - within)
        out += bytes(block.page(page)[within : within + take])
        offset += take
        size -= take
    return bytes(out)


# ELF64 core, little-endian: the vCPUs' notes (cpunotes.py, which also give e_machine) in a
# PT_NOTE, then one PT_LOAD per region, like dump-guest-memory with paging off (p_vaddr 0,
# p_paddr the guest-physical address).
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
PT_LOAD, PT_NOTE, ET_CORE, EM_X86_64, PF_RWX = 1, 4, 4, 62, 7
SEGMENT_ALIGN = 4096


def _align(n: int) -> int:
    return -(-n // SEGMENT_ALIGN) * SEGMENT_ALIGN


def _segments(regions: list[Region], data_start: int) -> tuple[list[int], int]:
    """Each region's file offset, segments aligned from ``data_start``; and the file's size."""
    offsets, pos = [], _align(data_start)
    for region in regions:
        offsets.append(pos)
        pos += _align(region.size)
    return offsets, pos


def _headers(regions: list[Region], offsets: list[int], notes: CoreNotes | None, notes_at: int) -> bytes:
    """The ELF header and program headers (the PT_NOTE first, its payload at ``notes_at``)."""
    phnum = len(regions) + (notes is not None)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)  # 64-bit, little-endian, SysV
    machine = notes.machine if notes else EM_X86_64
    header = _EHDR.pack(ident, ET_CORE, machine, 1, 0, _EHDR.size, 0, 0, _EHDR.size, _PHDR.size, phnum, 0, 0, 0)
    if notes:
        header += _PHDR.pack(PT_NOTE, 0, notes_at, 0, 0, len(notes.data), len(notes.data), 0)
    for region, off in zip(regions, offsets):
        header += _PHDR.pack(PT_LOAD, PF_RWX, off, 0, region.start, region.size, region.size, 0)
    return header


def export_elf(
    view: PhysicalView,
    out_path: str | os.PathLike[str],
    *,
    overwrite: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Write the view as an ELF64 core; segments are sparse where pages are absent.
    Returns the bytes of page data copied. The file is made by mapper/output.py's rules."""
    regions = view.regions
    if not regions:
        raise FormatError(0, "RAM blocks to export", "none")
    snap = view.snapshot
    if isinstance(snap, ForwardSnapshot):
        return _export_forward(snap, regions, out_path, overwrite, progress)
    notes = cpu_notes(snap)
    notes_at = _EHDR.size + _PHDR.size * (len(regions) + (notes is not None))
    offsets, size = _segments(regions, notes_at + (len(notes.data) if notes else 0))
    header = _headers(regions, offsets, notes, notes_at) + (notes.data if notes else b"")
    copied = 0
    with output_file(out_path, overwrite=overwrite, source_fd=snap.fd) as fd:
        os.ftruncate(fd, size)
        os.pwrite(fd, header, 0)
        total = sum(r.size for r in regions)
        done = 0
        for region, off in zip(regions, offsets):
            block = snap.block(region.block)
            plan = copy_plan(block.extent_arrays(), block.page_size, region.offset, region.offset + region.size)
            for steps in plan:
                for dest, length, src in steps:
                    if src == GAP:
                        continue  # a hole of the sparse segment
                    copy_range(snap.fd, fd, src, off + dest - region.offset, length)
                    copied += length
                    if progress:
                        progress(done + dest + length - region.offset, total)
            done += region.size
            if progress:
                progress(done, total)
    return copied


def _export_forward(
    snap: ForwardSnapshot,
    regions: list[Region],
    out_path: str | os.PathLike[str],
    overwrite: bool,
    progress: Callable[[int, int], None] | None,
) -> int:
    """export-elf in a compressed image's one pass. The registers are in device sections
    after the pages, so the notes' length is known only at the end, when every segment is
    written: the segments are placed as if the notes were empty, leaving the room up to
    the first segment's alignment (a page, less the headers) for them, and the headers
    and notes are written last. Notes that fit there (up to 4 long-mode or 6 i386 vCPUs
    beside a pc guest's 4 segments) give the very file the uncompressed image gives;
    longer ones go after the last segment, where a PT_NOTE may equally point."""
    notes_at = _EHDR.size + _PHDR.size * (len(regions) + 1)
    offsets, size = _segments(regions, notes_at)
    with output_file(out_path, overwrite=overwrite, source_fd=snap.fd) as fd:
        os.ftruncate(fd, size)
        copied = copy_regions_forward(snap, fd, list(zip(regions, offsets)), progress)
        notes = cpu_notes(snap)  # from the sections the pass has kept
        if notes is None:
            pwrite_all(fd, memoryview(_headers(regions, offsets, None, 0)), 0)
            return copied
        if notes_at + len(notes.data) > offsets[0]:
            notes_at = size
        pwrite_all(fd, memoryview(notes.data), notes_at)
        pwrite_all(fd, memoryview(_headers(regions, offsets, notes, notes_at)), 0)
    return copied
