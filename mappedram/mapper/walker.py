"""The walk over the stream's top-level elements, from the first section to EOF.

One method per element type; RAM payloads go to the mode's RamSectionReader, device
payloads are sized from the VM description (or delimited by their footers). The walk
reads forward through a cursor and may stop at the RAM section's opening, to go on
when someone asks for more.
"""

from __future__ import annotations

import struct
from typing import Any, Callable

from ..errors import FormatError
from ..formats import structs as S
from ..formats.constants import RAM_IDSTR, RAM_SECTION_VERSION, SectionType
from ..formats.policy import command_problem
from .elements import Problem, Section
from .ram_section import RamSectionReader
from .source import Cursor
from .vmdesc import device_payload_size

_ELEMENTS_AFTER_FOOTER = {t.value for t in SectionType} - {
    SectionType.SUBSECTION,
    SectionType.SECTION_FOOTER,
    SectionType.VMDESCRIPTION,
    SectionType.CONFIGURATION,
}


class StreamWalker:
    """Walks the elements; ``sections``, ``eof_offset`` and ``footers`` grow as it goes."""

    def __init__(
        self,
        cursor: Cursor,
        ram: RamSectionReader,
        problems: list[Problem],
        *,
        vmdesc: Callable[[], dict[str, Any] | None],
        vmdesc_offset: int | None,
    ) -> None:
        self.cursor = cursor
        self.ram = ram
        self.problems = problems
        self._vmdesc = vmdesc  # loaded only when a device section needs its size
        self._vmdesc_offset = vmdesc_offset
        self.sections: list[Section] = []
        self.eof_offset: int | None = None
        self.footers: bool | None = None  # decided by the first section's end
        self.ram_section_id: int | None = None
        self.ram_section_offset: int | None = None
        self.done = False
        self._error: FormatError | None = None
        self._device_index = 0
        self._dispatch: dict[SectionType, Callable[[int, SectionType], None]] = {
            SectionType.SECTION_START: self._full_section,
            SectionType.SECTION_FULL: self._full_section,
            SectionType.SECTION_PART: self._part_section,
            SectionType.SECTION_END: self._part_section,
            SectionType.COMMAND: self._command,
            SectionType.EOF: self._eof,
        }

    def walk(self, until_ram_start: bool = False) -> None:
        """Walk to EOF, or only until the RAM section's opening payload is read. A walk
        that failed fails again the same way: it never resumes inside an element."""
        if self._error is not None:
            raise self._error
        try:
            self._walk(until_ram_start)
        except FormatError as err:
            self._error = err
            raise

    def _walk(self, until_ram_start: bool) -> None:
        cursor = self.cursor
        while not self.done:
            if until_ram_start and self.ram_section_offset is not None:
                return
            off = cursor.pos
            byte = cursor.byte("a section type byte or EOF")
            try:
                kind = SectionType(byte)
            except ValueError:
                raise FormatError(off, "a section type byte (0x00-0x08)", f"{byte:#04x}") from None
            step = self._dispatch.get(kind)
            if step is None:
                raise FormatError(off, "a section, command or EOF", f"{kind.name} ({byte:#04x})")
            step(off, kind)
        if until_ram_start and self.ram_section_offset is None:
            raise FormatError(self.eof_offset or 0, "a RAM section before EOF", "none")

    def _full_section(self, off: int, kind: SectionType) -> None:
        cursor = self.cursor
        cursor.skip_to(off + 1, "a section")
        hdr = cursor.parse(S.SectionHeaderFull, "a section header (id, idstr, instance, version)")
        sec = Section(
            "start" if kind == SectionType.SECTION_START else "full",
            off,
            hdr.section_id,
            hdr.idstr,
            hdr.instance_id,
            hdr.version_id,
            payload_offset=cursor.pos,
        )
        self.sections.append(sec)
        if hdr.idstr == RAM_IDSTR:
            if self.ram_section_id is not None:
                raise FormatError(off, "one RAM section", "a second START/FULL for 'ram'")
            if hdr.version_id != RAM_SECTION_VERSION:
                self.problems.append(
                    Problem(off, f"expected RAM section version {RAM_SECTION_VERSION}, found {hdr.version_id}")
                )
            self.ram_section_id = hdr.section_id
            self.ram.opening(cursor)
            self.ram_section_offset = off
        else:
            self._device_payload(sec)
        self._close_section(sec)

    def _part_section(self, off: int, kind: SectionType) -> None:
        cursor = self.cursor
        cursor.skip_to(off + 1, "a section")
        hdr = cursor.parse(S.SectionHeaderPart, "a section id")
        is_ram = hdr.section_id == self.ram_section_id
        sec = Section(
            "part" if kind == SectionType.SECTION_PART else "end",
            off,
            hdr.section_id,
            RAM_IDSTR if is_ram else None,
            payload_offset=cursor.pos,
        )
        self.sections.append(sec)
        if is_ram:
            self.ram.payload(cursor)
        else:
            self._device_payload(sec)
        self._close_section(sec)

    def _command(self, off: int, kind: SectionType) -> None:
        cursor = self.cursor
        cursor.skip_to(off + 1, "a command")
        body = cursor.parse(S.CommandBody, "a command (be16 cmd, be16 len, data)")
        if why := command_problem(int(body.cmd), body.length):
            self.problems.append(Problem(off + 1, f"expected {why}"))
        self.sections.append(
            Section(
                "command",
                off,
                command=str(body.cmd),
                payload_offset=off + 5,
                payload_length=body.length,
                end=cursor.pos,
            )
        )

    def _eof(self, off: int, kind: SectionType) -> None:
        self.cursor.skip_to(off + 1, "EOF")
        self.eof_offset = off
        self.sections.append(Section("eof", off, end=off + 1))
        self.done = True
        after, size = off + 1, self.cursor.size
        if self._vmdesc_offset is not None:
            if self._vmdesc_offset != after:
                self.problems.append(
                    Problem(after, f"expected the VM description right after EOF, found it at {self._vmdesc_offset:#x}")
                )
        elif after != size:
            self.problems.append(
                Problem(
                    after,
                    f"expected the VM description or the end of the file after EOF, found {size - after} other bytes",
                )
            )

    def _close_section(self, sec: Section) -> None:
        """Payload length, then the footer if the stream has them."""
        cursor = self.cursor
        assert sec.payload_offset is not None
        pos = cursor.pos
        sec.payload_length = pos - sec.payload_offset
        sec.end = pos
        if self.footers is None:
            self.footers = cursor.byte("a section footer or the next section") == SectionType.SECTION_FOOTER
        if not self.footers:
            return
        marker = cursor.byte("a section footer")
        if marker != SectionType.SECTION_FOOTER:
            self.problems.append(
                Problem(pos, f"expected a section footer (0x7e) for {sec.idstr or sec.section_id}, found {marker:#04x}")
            )
            return
        footer = cursor.parse(S.SectionFooter, "a section footer")
        sec.footer_offset = pos
        sec.end = cursor.pos
        if footer.section_id != sec.section_id:
            self.problems.append(
                Problem(
                    pos, f"expected the footer of section {sec.section_id} ({sec.idstr}), found id {footer.section_id}"
                )
            )

    def _device_payload(self, sec: Section) -> None:
        """Move past a device section's payload."""
        cursor = self.cursor
        pos = cursor.pos
        # load_vmdesc checked the description's shape: names, ids and sizes can be trusted
        devices = (self._vmdesc() or {}).get("devices") if sec.kind == "full" else None
        if devices is not None and self._device_index < len(devices):
            dev = devices[self._device_index]
            self._device_index += 1
            if dev["name"] == sec.idstr and dev.get("instance_id", 0) == sec.instance_id:
                size = device_payload_size(dev)
                cursor.require(size, f"device state of {sec.idstr} (size from the VM description)")
                cursor.skip_to(pos + size, f"the device state of {sec.idstr}")
                return
            self.problems.append(
                Problem(
                    sec.offset,
                    f"expected section {sec.idstr!r} in the VM description's order, found {dev['name']!r}",
                )
            )
        if self.footers is False:
            raise FormatError(
                pos, f"a VM description or section footers to delimit {sec.idstr or sec.section_id}", "neither"
            )
        self._search_footer(sec)

    def _search_footer(self, sec: Section) -> None:
        """Without a usable description: the next ``7e <id>`` followed by a plausible element."""
        cursor = self.cursor
        pattern = bytes([SectionType.SECTION_FOOTER]) + struct.pack(">I", sec.section_id or 0)
        at = cursor.find(pattern, 1, lambda _, after: not after or after[0] in _ELEMENTS_AFTER_FOOTER)
        if at < 0:
            raise FormatError(
                cursor.pos, f"the footer of section {sec.idstr or sec.section_id}", "none before the end of the file"
            )
        cursor.skip_to(at, f"the payload of section {sec.idstr or sec.section_id}")
