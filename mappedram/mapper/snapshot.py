"""A QEMU snapshot file, opened lazily: ``mappedram.open(path)``.

Opening reads the optional libvirt header, the QEVM header, the configuration and the
RAM section's block list (jumping over each block's pages as QEMU does). The rest of
the stream (PART/END sections, commands, device sections, EOF) is walked on first use.
No page data is read until a block is asked for it.
"""

from __future__ import annotations

import os
import struct
from array import array
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np

from ..errors import FormatError
from ..formats import structs as S
from ..formats.bitmap import LITTLE_ENDIAN_64, BitmapLayout
from ..formats.constants import (
    CAP_IGNORE_SHARED,
    LIBVIRT_MAGIC_DONE,
    LIBVIRT_MAGIC_PARTIAL,
    LIBVIRT_VERSION,
    MAPPED_RAM_VERSION,
    QEVM_VERSION,
    QEVM_VERSION_COMPAT,
    RAM_IDSTR,
    RAM_SECTION_VERSION,
    SUB_CAPABILITIES,
    SUB_TARGET_PAGE_BITS,
    SUB_UUID,
    RamFlag,
    SectionType,
)
from ..formats.policy import ModePolicy, policy_for
from .blocks import MappedRamBlock, RamBlock, StreamRamBlock
from .source import Source
from .vmdesc import device_payload_size, find_vmdesc, load_vmdesc

DEFAULT_PAGE_SIZE = 4096
STREAM_PROBE_LIMIT = 1 << 20
_WORD = S.RamWord.sizeof()
_FOOTER = S.SectionFooter.sizeof()
_RECORD_HEAD = _WORD + 1 + 255 + 1  # a word, a block name, a zero page's fill byte
_ELEMENTS_AFTER_FOOTER = {t.value for t in SectionType} - {
    SectionType.SUBSECTION,
    SectionType.SECTION_FOOTER,
    SectionType.VMDESCRIPTION,
    SectionType.CONFIGURATION,
}


@dataclass(frozen=True)
class LibvirtHeader:
    """virQEMUSaveHeader in front of the QEMU stream (FORMAT.md §7)."""

    complete: bool  # "LibvirtQemudSave"; False for "LibvirtQemudPart"
    byteorder: str
    version: int
    data_len: int
    was_running: int
    format: str
    cookie_offset: int

    @property
    def stream_start(self) -> int:
        return S.LIBVIRT_HEADER_SIZE + self.data_len


@dataclass(frozen=True)
class Problem:
    """Something wrong that does not stop the walk; verify reports these."""

    offset: int
    text: str

    def __str__(self) -> str:
        return f"offset {self.offset:#x} ({self.offset}): {self.text}"


@dataclass
class Section:
    """One top-level element of the stream."""

    kind: str  # start, part, end, full, command, eof
    offset: int
    section_id: int | None = None
    idstr: str | None = None
    instance_id: int | None = None
    version_id: int | None = None
    payload_offset: int | None = None
    payload_length: int | None = None
    footer_offset: int | None = None
    command: str | None = None
    end: int | None = None  # just past the footer (or the payload)

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class _WalkState:
    pos: int
    ram_section_id: int | None = None
    ram_start_done: bool = False
    footers: bool | None = None  # decided by the first section's end
    device_index: int = 0
    current_block: str | None = None  # for CONTINUE records
    records: dict[str, tuple[array, array]] = field(default_factory=dict)  # page numbers, offsets (-1: ZERO)


class Snapshot:
    """A snapshot file. Use as a context manager, or call ``close()``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        offset: int | None = None,
        page_size: int | None = None,
        bitmap_layout: BitmapLayout = LITTLE_ENDIAN_64,
    ) -> None:
        self._src = Source(path)
        self.path = self._src.path
        self.size = self._src.size
        self.layout = bitmap_layout
        self.problems: list[Problem] = []
        self.libvirt: LibvirtHeader | None = None
        self.machine_type: str | None = None
        self.capabilities: tuple[str, ...] = ()
        self.target_page_bits: int | None = None
        self.uuid: str | None = None
        self.ram_total: int | None = None
        self.ram_section_offset: int | None = None
        self.blocks: dict[str, RamBlock] = {}
        self._eof_offset: int | None = None
        self._sections: list[Section] = []
        self._vmdesc: dict[str, Any] | None = None
        self._vmdesc_error: str | None = None
        self._walk_done = False
        try:
            self._open(offset, page_size)
        except BaseException:
            self.close()
            raise

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

    # -- header ---------------------------------------------------------------
    def _open(self, offset: int | None, page_size: int | None) -> None:
        src = self._src
        pos = self._read_libvirt_header() if offset is None else offset
        if offset is None and pos == 0:
            pos = self._probe_stream_start()
        self.stream_start = pos
        header, pos = src.parse(S.QevmHeader, pos, "the QEVM magic (a QEMU migration stream)")
        if header.version != QEVM_VERSION:
            found = "the obsolete v2" if header.version == QEVM_VERSION_COMPAT else str(header.version)
            raise FormatError(pos - 4, f"stream version {QEVM_VERSION}", found)
        self.version = header.version
        if src.byte(pos, "the configuration section or a section") == SectionType.CONFIGURATION:
            pos = self._read_configuration(pos)
        self.policy: ModePolicy = policy_for(self.capabilities)
        self.ignore_shared = CAP_IGNORE_SHARED in self.capabilities
        self.vmdesc_location = find_vmdesc(src)
        self._explicit_page_size = page_size
        self.page_size = page_size or self._page_size_hint()
        self._walk = _WalkState(pos=pos)
        self._advance(until_ram_start=True)

    def _read_libvirt_header(self) -> int:
        src = self._src
        if src.size < 16 or src.read(0, 16, "the file magic") not in (LIBVIRT_MAGIC_DONE, LIBVIRT_MAGIC_PARTIAL):
            return 0
        raw, _ = src.parse(S.LibvirtHeaderLE, 0, "the libvirt save header")
        byteorder = "little"
        if raw.version > LIBVIRT_VERSION:  # written on a host of the other byte order
            raw, _ = src.parse(S.LibvirtHeaderBE, 0, "the libvirt save header")
            byteorder = "big"
        if raw.version != LIBVIRT_VERSION:
            raise FormatError(16, f"libvirt save header version {LIBVIRT_VERSION}", str(raw.version))
        self.libvirt = LibvirtHeader(
            complete=raw.magic == LIBVIRT_MAGIC_DONE,
            byteorder=byteorder,
            version=raw.version,
            data_len=raw.data_len,
            was_running=raw.was_running,
            format=str(raw.format),
            cookie_offset=raw.cookie_offset,
        )
        if not self.libvirt.complete:
            self.problems.append(
                Problem(0, "expected a complete libvirt save (LibvirtQemudSave), found LibvirtQemudPart")
            )
        start = self.libvirt.stream_start
        src.require(start, 8, "the QEMU stream behind the libvirt header (92 + data_len)")
        return start

    def _probe_stream_start(self) -> int:
        """Where the stream starts when the file has no libvirt header.

        A ``file:PATH,offset=N`` save keeps whatever the management tool put in front;
        look for the QEVM v3 magic in the first MiB (an explicit ``offset`` skips this).
        """
        head = self._src.read(0, min(self.size, STREAM_PROBE_LIMIT), "the start of the file")
        at = head.find(S.QevmHeader.build({"version": QEVM_VERSION}))
        return at if at > 0 else 0

    def _read_configuration(self, pos: int) -> int:
        src = self._src
        head, pos = src.parse(S.ConfigurationHead, pos, "the configuration section (machine name)")
        self.machine_type = head.machine
        while src.byte(pos, "a configuration subsection or a section") == SectionType.SUBSECTION:
            sub, end = src.parse(S.ConfigSubsection, pos, "a known configuration subsection")
            name = sub.head.name
            if name == SUB_CAPABILITIES:
                self.capabilities = tuple(sub.body.names)
            elif name == SUB_TARGET_PAGE_BITS:
                bits = sub.body.bits
                if not 9 <= bits <= 30:
                    raise FormatError(end - 4, "target page bits between 9 and 30", str(bits))
                self.target_page_bits = bits
            elif name == SUB_UUID:
                self.uuid = sub.body.uuid.hex()
            pos = end
        return pos

    def _page_size_hint(self) -> int:
        if self.target_page_bits:
            return 1 << self.target_page_bits
        if not self.policy.pages_in_stream:
            return DEFAULT_PAGE_SIZE  # settled by the first MappedRamHeader
        vm_page = (self.vmdesc or {}).get("page_size")
        if isinstance(vm_page, int) and vm_page > 0 and vm_page & (vm_page - 1) == 0:
            return vm_page
        return DEFAULT_PAGE_SIZE

    # -- lazily walked parts ------------------------------------------------------
    @property
    def format(self) -> str:
        return self.policy.mode.value

    @property
    def sections(self) -> list[Section]:
        self._advance()
        return self._sections

    @property
    def eof_offset(self) -> int | None:
        """File offset of the EOF byte (walks the stream)."""
        self._advance()
        return self._eof_offset

    @property
    def devices(self) -> list[Section]:
        """The FULL device sections (everything but RAM)."""
        return [s for s in self.sections if s.kind == "full" and s.idstr != RAM_IDSTR]

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

    @property
    def section_footers(self) -> bool:
        """Whether sections end with a 0x7e footer (send-section-footer)."""
        return bool(self._walk.footers)

    def read_bytes(self, offset: int, length: int) -> bytes:
        """Raw file bytes, bounds-checked."""
        return self._src.read(offset, length, "the requested range")

    def block(self, name: str) -> RamBlock:
        try:
            return self.blocks[name]
        except KeyError:
            raise KeyError(f"no RAM block {name!r}; blocks: {', '.join(self.blocks)}") from None

    def __iter__(self) -> Iterator[RamBlock]:
        return iter(self.blocks.values())

    # -- the element walk -------------------------------------------------------
    def _advance(self, until_ram_start: bool = False) -> None:
        w = self._walk
        src = self._src
        while not self._walk_done:
            if until_ram_start and w.ram_start_done:
                return
            off = w.pos
            byte = src.byte(off, "a section type byte or EOF")
            try:
                kind = SectionType(byte)
            except ValueError:
                raise FormatError(off, "a section type byte (0x00-0x08)", f"{byte:#04x}") from None
            if kind in (SectionType.SECTION_START, SectionType.SECTION_FULL):
                w.pos = self._full_section(off, kind)
            elif kind in (SectionType.SECTION_PART, SectionType.SECTION_END):
                w.pos = self._part_section(off, kind)
            elif kind == SectionType.COMMAND:
                body, w.pos = src.parse(S.CommandBody, off + 1, "a command (be16 cmd, be16 len, data)")
                self._sections.append(
                    Section(
                        "command",
                        off,
                        command=str(body.cmd),
                        payload_offset=off + 5,
                        payload_length=body.length,
                        end=w.pos,
                    )
                )
            elif kind == SectionType.EOF:
                self._finish(off)
            else:
                raise FormatError(off, "a section, command or EOF", f"{kind.name} ({byte:#04x})")
        if until_ram_start and not w.ram_start_done:
            raise FormatError(self._eof_offset or off, "a RAM section before EOF", "none")

    def _full_section(self, off: int, kind: SectionType) -> int:
        hdr, pos = self._src.parse(S.SectionHeaderFull, off + 1, "a section header (id, idstr, instance, version)")
        sec = Section(
            "start" if kind == SectionType.SECTION_START else "full",
            off,
            hdr.section_id,
            hdr.idstr,
            hdr.instance_id,
            hdr.version_id,
            payload_offset=pos,
        )
        self._sections.append(sec)
        if hdr.idstr == RAM_IDSTR:
            if self._walk.ram_section_id is not None:
                raise FormatError(off, "one RAM section", "a second START/FULL for 'ram'")
            if hdr.version_id != RAM_SECTION_VERSION:
                self.problems.append(
                    Problem(off, f"expected RAM section version {RAM_SECTION_VERSION}, found {hdr.version_id}")
                )
            self._walk.ram_section_id = hdr.section_id
            self.ram_section_offset = off
            end = self._ram_payload(pos, opening=True)
            self._walk.ram_start_done = True
        else:
            end = self._device_payload(sec, pos)
        sec.payload_length = end - pos
        sec.end = self._footer(sec, end)
        return sec.end

    def _part_section(self, off: int, kind: SectionType) -> int:
        hdr, pos = self._src.parse(S.SectionHeaderPart, off + 1, "a section id")
        is_ram = hdr.section_id == self._walk.ram_section_id
        sec = Section(
            "part" if kind == SectionType.SECTION_PART else "end",
            off,
            hdr.section_id,
            RAM_IDSTR if is_ram else None,
            payload_offset=pos,
        )
        self._sections.append(sec)
        end = self._ram_payload(pos, opening=False) if is_ram else self._device_payload(sec, pos)
        sec.payload_length = end - pos
        sec.end = self._footer(sec, end)
        return sec.end

    def _footer(self, sec: Section, pos: int) -> int:
        w = self._walk
        if w.footers is None:
            w.footers = self._src.byte(pos, "a section footer or the next section") == SectionType.SECTION_FOOTER
        if not w.footers:
            return pos
        marker = self._src.byte(pos, "a section footer")
        if marker != SectionType.SECTION_FOOTER:
            self.problems.append(
                Problem(pos, f"expected a section footer (0x7e) for {sec.idstr or sec.section_id}, found {marker:#04x}")
            )
            return pos
        footer, end = self._src.parse(S.SectionFooter, pos, "a section footer")
        sec.footer_offset = pos
        if footer.section_id != sec.section_id:
            self.problems.append(
                Problem(
                    pos, f"expected the footer of section {sec.section_id} ({sec.idstr}), found id {footer.section_id}"
                )
            )
        return end

    def _device_payload(self, sec: Section, pos: int) -> int:
        devices = (self.vmdesc or {}).get("devices") if sec.kind == "full" else None
        w = self._walk
        if isinstance(devices, list) and w.device_index < len(devices):
            dev = devices[w.device_index]
            w.device_index += 1
            if isinstance(dev, dict) and dev.get("name") == sec.idstr and dev.get("instance_id", 0) == sec.instance_id:
                try:
                    size = device_payload_size(dev)
                except (KeyError, TypeError, ValueError):
                    self.problems.append(
                        Problem(pos, f"expected usable field sizes in the VM description of {sec.idstr}, found none")
                    )
                else:
                    self._src.require(pos, size, f"device state of {sec.idstr} (size from the VM description)")
                    return pos + size
            else:
                self.problems.append(
                    Problem(
                        sec.offset,
                        f"expected section {sec.idstr!r} in the VM description's order, "
                        f"found {dev.get('name') if isinstance(dev, dict) else dev!r}",
                    )
                )
        if w.footers is False:
            raise FormatError(
                pos, f"a VM description or section footers to delimit {sec.idstr or sec.section_id}", "neither"
            )
        return self._search_footer(sec, pos)

    def _search_footer(self, sec: Section, pos: int) -> int:
        """Without a usable description: the next ``7e <id>`` followed by a plausible element."""
        pattern = bytes([SectionType.SECTION_FOOTER]) + struct.pack(">I", sec.section_id or 0)
        at = self._src.cursor(pos).find(pattern, 1, lambda _, after: not after or after[0] in _ELEMENTS_AFTER_FOOTER)
        if at < 0:
            raise FormatError(
                pos, f"the footer of section {sec.idstr or sec.section_id}", "none before the end of the file"
            )
        return at

    def _finish(self, off: int) -> None:
        self._eof_offset = off
        self._sections.append(Section("eof", off, end=off + 1))
        self._walk_done = True
        after = off + 1
        if self.vmdesc_location is not None:
            if self.vmdesc_location[0] != after:
                self.problems.append(
                    Problem(
                        after, f"expected the VM description right after EOF, found it at {self.vmdesc_location[0]:#x}"
                    )
                )
        elif after != self.size:
            self.problems.append(
                Problem(
                    after,
                    f"expected the VM description or the end of the file after EOF, "
                    f"found {self.size - after} other bytes",
                )
            )
        for block in self.blocks.values():
            if isinstance(block, StreamRamBlock):
                pages, offsets = self._walk.records.get(block.name, (array("q"), array("q")))
                block.set_records(np.frombuffer(pages, dtype=np.int64), np.frombuffer(offsets, dtype=np.int64))

    # -- RAM ------------------------------------------------------------------------
    def _ram_payload(self, pos: int, opening: bool) -> int:
        src = self._src
        mask = self.page_size - 1
        if opening:
            (word,) = struct.unpack(">Q", src.read(pos, _WORD, "the RAM MEM_SIZE word"))
            if not word & RamFlag.MEM_SIZE:
                raise FormatError(pos, "the MEM_SIZE word (flag 0x04) opening the RAM section", f"{word:#x}")
            self.ram_total = word & ~mask
            pos = self._block_list(pos + _WORD, self.ram_total)
            mask = self.page_size - 1  # a mapped-ram header may have settled the page size
        if self.policy.pages_in_stream:
            return self._page_records(pos)
        while True:
            (word,) = struct.unpack(">Q", src.read(pos, _WORD, "a RAM word (flags in the low bits)"))
            flags = word & mask
            why = self.policy.word_problem(flags)
            if why or flags & RamFlag.MEM_SIZE:
                raise FormatError(pos, why or "no second MEM_SIZE word", f"word {word:#x}")
            pos += _WORD
            if flags & RamFlag.EOS:
                return pos

    def _block_list(self, pos: int, total: int) -> int:
        remaining = total
        while remaining > 0:
            entry_offset = pos
            entry, pos = self._src.parse(
                S.RamBlockEntry,
                pos,
                f"RAM block entry {len(self.blocks)} (u8 idlen, idstr, be64 used_length)",
                mapped_ram=self.policy.block_has_mapped_ram_header,
                ignore_shared=self.ignore_shared,
            )
            name = entry.idstr
            if name in self.blocks:
                raise FormatError(entry_offset, "a RAM block name not seen before", repr(name))
            if self.policy.block_has_mapped_ram_header:
                block, pos = self._mapped_ram_block(entry, entry_offset, pos)
            else:
                block = StreamRamBlock(
                    self._src, name, entry.used_length, self.page_size, entry_offset, entry.addr, self._advance
                )
            if entry.used_length % block.page_size:
                self.problems.append(
                    Problem(
                        entry_offset,
                        f"expected block {name!r}'s used_length to be a multiple "
                        f"of the page size {block.page_size}, found {entry.used_length}",
                    )
                )
            self.blocks[name] = block
            remaining -= entry.used_length  # verify reports a sum past MEM_SIZE
        return pos

    def _mapped_ram_block(self, entry: Any, entry_offset: int, pos: int) -> tuple[MappedRamBlock, int]:
        hdr = entry.mapped_ram
        header_offset = pos - S.MAPPED_RAM_HEADER_SIZE
        name = entry.idstr
        if hdr.version > MAPPED_RAM_VERSION or hdr.version == 0:
            raise FormatError(
                header_offset, f"mapped-ram header version {MAPPED_RAM_VERSION} for {name!r}", str(hdr.version)
            )
        ps = hdr.page_size
        if ps < 512 or ps & (ps - 1) or ps > 1 << 30:
            raise FormatError(header_offset + 4, f"a power-of-two page size for {name!r}", str(ps))
        if not self.blocks and self._explicit_page_size is None and self.target_page_bits is None:
            self.page_size = ps
        block = MappedRamBlock(
            self._src,
            name,
            entry.used_length,
            ps,
            entry_offset,
            entry.addr,
            header_offset,
            hdr.version,
            hdr.bitmap_offset,
            hdr.pages_offset,
            self.layout,
        )
        if self.ignore_shared and hdr.bitmap_offset == 0 and hdr.pages_offset == 0:
            return block, pos  # an ignored (shared) block: no bitmap, no pages, nothing reserved
        self._src.require(hdr.bitmap_offset, block.bitmap_size, f"the bitmap of {name!r}")
        self._src.require(hdr.pages_offset, entry.used_length, f"the page region of {name!r}")
        resume = hdr.pages_offset + entry.used_length
        if resume <= pos:
            raise FormatError(
                header_offset + 20,
                f"a page region of {name!r} after its header, so that the stream resumes past {pos:#x}",
                f"it resumes at {resume:#x}",
            )
        return block, resume

    def _page_records(self, pos: int) -> int:
        """Walk PAGE/ZERO/CONTINUE records until EOS (the hot loop of stream files)."""
        src, w = self._src, self._walk
        cursor = src.cursor(pos)
        buf, base = b"", pos  # the cursor's window: the records are read from it, never mapped
        size, page_size, mask = self.size, self.page_size, self.page_size - 1
        unpack = struct.Struct(">Q").unpack_from
        valid = int(self.policy.valid_flags)
        decoded = int(self.policy.decoded_flags)
        block_name = w.current_block
        records = None if block_name is None else w.records[block_name]
        num_pages = 0 if block_name is None else self.blocks[block_name].num_pages
        while True:
            if pos + _WORD > size:
                raise FormatError(pos, "a RAM word", "the end of the file")
            if pos + _RECORD_HEAD > base + len(buf):
                buf, base = cursor.window(pos, min(size - pos, _RECORD_HEAD))
            (word,) = unpack(buf, pos - base)
            flags = word & mask
            if flags & ~valid or flags & ~decoded or flags & RamFlag.MEM_SIZE:
                why = self.policy.word_problem(flags) or "no second MEM_SIZE word"
                raise FormatError(pos, why, f"word {word:#x}")
            pos += _WORD
            if flags & RamFlag.EOS:
                w.current_block = block_name
                return pos
            if not flags & (RamFlag.PAGE | RamFlag.ZERO):
                continue  # MULTIFD_FLUSH: nothing follows
            if not flags & RamFlag.CONTINUE:
                if pos >= size:
                    raise FormatError(pos, "a block name", "the end of the file")
                length = buf[pos - base]
                if pos + 1 + length > size:
                    raise FormatError(pos, f"a block name of {length} bytes", "the end of the file")
                block_name = buf[pos - base + 1 : pos - base + 1 + length].decode("utf-8", "replace")
                if block_name not in self.blocks:
                    raise FormatError(pos, "the name of a RAM block from the block list", repr(block_name))
                records = w.records.setdefault(block_name, (array("q"), array("q")))
                num_pages = self.blocks[block_name].num_pages
                pos += 1 + length
            elif records is None:
                raise FormatError(pos - _WORD, "a block name (CONTINUE on the first page record)", f"word {word:#x}")
            page = (word & ~mask) // page_size
            if page >= num_pages:
                raise FormatError(pos - _WORD, f"a page inside block {block_name!r}", f"address {word & ~mask:#x}")
            if flags & RamFlag.PAGE:
                if pos + page_size > size:
                    raise FormatError(pos, f"{page_size} bytes of page data", "the end of the file")
                records[0].append(page)
                records[1].append(pos)
                pos += page_size
            else:
                if pos >= size:
                    raise FormatError(pos, "the fill byte of a zero page", "the end of the file")
                if buf[pos - base] != 0:
                    raise FormatError(pos, "a zero page fill byte of 0", f"{buf[pos - base]:#04x}")
                records[0].append(page)
                records[1].append(-1)
                pos += 1

    # -- restore ----------------------------------------------------------------------
    def restore_into(
        self, targets: dict[str, Any], *, channels: int = 4, zero_fill: bool = True, progress: Any = None
    ) -> Any:
        """Fill writable buffers (block name -> numpy array, mmap, bytearray) in parallel."""
        from .restore import restore_into

        return restore_into(self, targets, channels=channels, zero_fill=zero_fill, progress=progress)

    # -- summaries ------------------------------------------------------------------
    def describe(self, sections: bool = True) -> dict[str, Any]:
        """The stable JSON form of ``mappedram dump --json`` (see README)."""
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
            "blocks": [b.describe() for b in self.blocks.values()],
            "vmdesc": None
            if self.vmdesc_location is None
            else {"offset": self.vmdesc_location[0], "json_length": self.vmdesc_location[1]},
        }
        if sections:
            out["sections"] = [s.describe() for s in self.sections]
            out["eof_offset"] = self._eof_offset
        return out


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
