"""A QEMU snapshot file, opened lazily: ``mappedram.open(path)``.

Opening reads the prologue (prologue.py: libvirt header, QEVM header, configuration)
and walks the stream (walker.py) up to the RAM section's block list, which the mode's
RAM reader (ram_section.py) reads, jumping over each block's pages as QEMU does. The
rest of the stream (PART/END sections, commands, device sections, EOF) is walked on
first use. No page data is read until a block is asked for it (blocks.py).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from ..errors import FormatError
from ..formats.bitmap import LITTLE_ENDIAN_64, BitmapLayout
from ..formats.constants import CAP_IGNORE_SHARED
from ..formats.layout import MAX_PAGE_SIZE, MIN_PAGE_SIZE, valid_page_size
from ..formats.policy import Mode, ModePolicy, libvirt_stream_problem, policy_for
from .blocks import Progress, RamBlock
from .elements import DeviceSections, Problem, Section
from .prologue import LIBVIRT_FORMAT_AT, LibvirtHeader, Prologue, read_prologue
from .ram_section import MappedRamSectionReader, PageIndex, RamSectionReader, StreamRamSectionReader
from .source import Source
from .vmdesc import find_vmdesc, load_vmdesc
from .walker import StreamWalker

if TYPE_CHECKING:
    from .parallel_load import RestoreStats

__all__ = ["LibvirtHeader", "Problem", "Section", "Snapshot", "open"]

DEFAULT_PAGE_SIZE = 4096


class Snapshot:
    """A snapshot file. Use as a context manager, or call ``close()``."""

    one_pass = False  # True for a ForwardSnapshot: its pages can be read once, front to back

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        offset: int | None = None,
        page_size: int | None = None,
        bitmap_layout: BitmapLayout = LITTLE_ENDIAN_64,
    ) -> None:
        if page_size is not None and not valid_page_size(page_size):  # the caller's mistake, not the file's
            raise ValueError(
                f"page_size: expected a power of two from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE}, found {page_size}"
            )
        self._src = Source(path)
        try:
            self.path: str = self._src.path
            self.size: int = self._src.size
            self.bitmap_layout = bitmap_layout
            self.problems: list[Problem] = []
            if offset is not None and not 0 <= offset < self.size:
                raise FormatError(offset, "a stream offset inside the file", f"the file ends at {self.size:#x}")
            cursor = self._src.cursor(offset or 0)
            self.prologue: Prologue = read_prologue(cursor, explicit_start=offset is not None)
            self.problems += self.prologue.problems
            self.policy: ModePolicy = policy_for(self.capabilities)
            if self.libvirt is not None and (why := libvirt_stream_problem(self.libvirt.format, self.policy.mode)):
                self.problems.append(Problem(LIBVIRT_FORMAT_AT, f"expected {why}"))
            self.vmdesc_location: tuple[int, int] | None = find_vmdesc(self._src)  # random access: the file's end
            self._vmdesc: dict[str, Any] | None = None
            self._vmdesc_error: str | None = None
            self._ram = self._ram_reader(page_size)
            self._walker = StreamWalker(
                cursor,
                self._ram,
                self.problems,
                vmdesc=lambda: self.vmdesc,
                vmdesc_offset=None if self.vmdesc_location is None else self.vmdesc_location[0],
            )
            self._walker.walk(until_ram_start=True)
        except BaseException:
            self.close()
            raise

    def _ram_reader(self, explicit_page_size: int | None) -> RamSectionReader:
        ignore_shared = CAP_IGNORE_SHARED in self.capabilities
        settled = explicit_page_size or (1 << self.target_page_bits if self.target_page_bits else None)
        if not self.policy.pages_in_stream:  # else the first MappedRamHeader settles it
            return MappedRamSectionReader(
                self._src,
                self.policy,
                settled or DEFAULT_PAGE_SIZE,
                self.problems,
                ignore_shared=ignore_shared,
                page_size_settled=settled is not None,
                bitmap_layout=self.bitmap_layout,
            )
        return StreamRamSectionReader(
            self._src,
            self.policy,
            settled or self._vmdesc_page_size() or DEFAULT_PAGE_SIZE,
            self.problems,
            ignore_shared=ignore_shared,
            index=PageIndex(self._walk_all),
        )

    def _vmdesc_page_size(self) -> int | None:
        vm_page = (self.vmdesc or {}).get("page_size")
        if isinstance(vm_page, int) and vm_page > 0 and vm_page & (vm_page - 1) == 0:
            return vm_page
        return None

    def _walk_all(self) -> None:
        self._walker.walk()

    # -- lifetime ---------------------------------------------------------------
    def close(self) -> None:
        self._src.close()

    def __enter__(self) -> "Snapshot":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def fd(self) -> int:
        return self._src.fd

    # -- the prologue -------------------------------------------------------------
    @property
    def libvirt(self) -> LibvirtHeader | None:
        return self.prologue.libvirt

    @property
    def stream_start(self) -> int:
        return self.prologue.stream_start

    @property
    def version(self) -> int:
        return self.prologue.version

    @property
    def machine_type(self) -> str | None:
        return self.prologue.configuration.machine_type

    @property
    def capabilities(self) -> tuple[str, ...]:
        return self.prologue.configuration.capabilities

    @property
    def target_page_bits(self) -> int | None:
        return self.prologue.configuration.target_page_bits

    @property
    def uuid(self) -> str | None:
        return self.prologue.configuration.uuid

    @property
    def mode(self) -> Mode:
        return self.policy.mode

    @property
    def format(self) -> str:
        return self.policy.mode.value

    @property
    def ignore_shared(self) -> bool:
        return CAP_IGNORE_SHARED in self.capabilities

    # -- the RAM section --------------------------------------------------------------
    @property
    def blocks(self) -> Mapping[str, RamBlock]:
        return self._ram.blocks

    @property
    def page_size(self) -> int:
        return self._ram.page_size

    @property
    def ram_total(self) -> int | None:
        return self._ram.total

    @property
    def ram_section_offset(self) -> int | None:
        return self._walker.ram_section_offset

    def block(self, name: str) -> RamBlock:
        try:
            return self._ram.blocks[name]
        except KeyError:
            raise KeyError(f"no RAM block {name!r}; blocks: {', '.join(self._ram.blocks)}") from None

    def __iter__(self) -> Iterator[RamBlock]:
        return iter(self._ram.blocks.values())

    # -- lazily walked parts ------------------------------------------------------
    @property
    def sections(self) -> list[Section]:
        self._walker.walk()
        return self._walker.sections

    @property
    def eof_offset(self) -> int | None:
        """File offset of the EOF byte (walks the stream)."""
        self._walker.walk()
        return self._walker.eof_offset

    @property
    def devices(self) -> Sequence[Section]:
        """The FULL device sections (everything but RAM): a view of the packed sections."""
        return DeviceSections(self.sections)

    @property
    def section_footers(self) -> bool:
        """Whether sections end with a 0x7e footer (send-section-footer)."""
        return bool(self._walker.footers)

    @property
    def vmdesc(self) -> dict[str, Any] | None:
        if self._vmdesc is None and self.vmdesc_location and self._vmdesc_error is None:
            offset, length = self.vmdesc_location
            try:
                self._vmdesc = load_vmdesc(self._src, offset, length)
            except ValueError as err:  # json errors, or FormatError
                self._vmdesc_error = str(err)
                self.problems.append(Problem(offset, f"expected a VM description in JSON, found {err}"))
        return self._vmdesc

    def read_bytes(self, offset: int, length: int) -> bytes:
        """Raw file bytes, bounds-checked."""
        return self._src.read(offset, length, "the requested range")

    # -- restore ----------------------------------------------------------------------
    def restore_into(
        self,
        targets: Mapping[str, Any],
        *,
        channels: int = 4,
        zero_fill: bool = True,
        progress: Progress | None = None,
    ) -> RestoreStats:
        """Fill writable buffers (block name -> numpy array, mmap, bytearray of used_length
        bytes) in parallel. Pages absent from the file come out as zero: with ``zero_fill``
        they are cleared (needed for a reused buffer; a fresh ``np.zeros`` is zero already).
        Blocks not named in ``targets`` are skipped."""
        from .parallel_load import load_blocks  # numpy: imported by what restores, not by opening

        blocks = [self.block(name) for name in targets]
        return load_blocks(
            self.path, blocks, self.policy, targets, channels=channels, zero_fill=zero_fill, progress=progress
        )

    # -- summaries ------------------------------------------------------------------
    def device_state(self, idstr: str, instance_id: int = 0) -> dict[str, Any]:
        """One device section decoded with the VM description (mapper/devstate.py)."""
        from .devstate import device_state

        return device_state(self, idstr, instance_id)

    def describe(self, sections: bool = True, stale: bool = False) -> dict[str, Any]:
        """The stable JSON form of ``mappedram dump --json`` (see README). ``stale``: count
        each mapped-ram block's stale slots (reads the clear slots that hold data)."""
        slots: list[int | None] = [None] * len(self.blocks)
        if stale:
            from .stale import stale_slots  # numpy: imported when asked for

            slots = [stale_slots(b, self.size) for b in self]
        out: dict[str, Any] = {
            "file": self.path,
            "size": self.size,
            "format": self.format,
            "libvirt": asdict(self.libvirt) if self.libvirt else None,
            "stream_start": self.stream_start,
            "version": self.version,
            "machine_type": self.machine_type,
            "capabilities": list(self.capabilities),
            "target_page_bits": self.target_page_bits,
            "uuid": self.uuid,
            "page_size": self.page_size,
            "ram_total": self.ram_total,
            "ram_section_offset": self.ram_section_offset,
            "blocks": [{**b.describe(), "stale_slots": count} for b, count in zip(self, slots)],
            "vmdesc": None
            if self.vmdesc_location is None
            else {"offset": self.vmdesc_location[0], "json_length": self.vmdesc_location[1]},
        }
        if sections:
            out["sections"] = list(self.describe_sections())
            out["eof_offset"] = self._walker.eof_offset
        return out

    def describe_sections(self) -> Iterator[dict[str, Any]]:
        """describe()'s ``sections``, one at a time (walks the stream first): each is made
        from the packed log when its turn comes, so a caller that writes them out as they
        come holds one, however many the stream has (dump: millions of 5-byte commands)."""
        return (s.describe() for s in self.sections)


def open(
    path: str | os.PathLike[str],
    *,
    offset: int | None = None,  # noqa: A001 - the library's verb
    page_size: int | None = None,
    bitmap_layout: BitmapLayout = LITTLE_ENDIAN_64,
) -> Snapshot:
    """Open a snapshot file: mapped-ram or classic stream, optionally behind a libvirt header.

    ``offset``: where the QEMU stream starts (the N of ``file:PATH,offset=N``); by default
    behind a libvirt header if there is one, else at the first QEVM magic in the first MiB.
    ``page_size``: the target page size of a stream that does not record it.
    ``bitmap_layout``: the writing host's ``unsigned long`` (``BIG_ENDIAN_64`` for s390x).
    """
    return Snapshot(path, offset=offset, page_size=page_size, bitmap_layout=bitmap_layout)
