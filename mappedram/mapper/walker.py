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
from ..formats.constants import RAM_IDSTR, RAM_SECTION_VERSION, SectionType
from ..formats.policy import NEED_RETURN_PATH, OPENS_RETURN_PATH, command_problem, return_path_problem
from .elements import Problem, Section, SectionLog
from .ram_section import RamSectionReader
from .source import Cursor
from .vmdesc import device_payload_size

# Problems listed per walk; past this many, one line counts the rest (a stream of a
# million bad commands must not cost a million lines and their memory).
MAX_PROBLEMS = 1000

# (cmd, length) pairs whose verdict is kept: a real stream has a handful, a hostile one up
# to 2^32, and a verdict kept for each cost ~400 bytes a command (390 MB for 13 MB of them).
_VERDICTS_KEPT = 4096

# Fixed parts of the headers, read with struct (construct costs ~30 us an element, and a
# stream may hold millions); the layouts are those of structs.py's SectionHeader*,
# CommandBody and SectionFooter.
_U32 = struct.Struct(">I")
_ID_AND_LEN = struct.Struct(">IB")  # section id, idstr length
_INSTANCE_VERSION = struct.Struct(">II")
_COMMAND = struct.Struct(">HH")  # cmd, length
_FOOTER = struct.Struct(">BI")  # 0x7e, section id
_SECTION_TYPES = {t.value: t for t in SectionType}
_COMMAND_TYPE = SectionType.COMMAND.value

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
        self.sections = SectionLog()
        self.eof_offset: int | None = None
        self.footers: bool | None = None  # decided by the first section's end
        self.ram_section_id: int | None = None
        self.ram_section_offset: int | None = None
        self.done = False
        self._error: FormatError | None = None
        self._device_index = 0
        self._command_verdicts: dict[int, str | None] = {}  # cmd << 16 | length -> command_problem
        self._return_path = False  # an OPEN_RETURN_PATH was seen
        self._unlisted = 0  # problems past MAX_PROBLEMS
        self._first_unlisted = 0
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
        finally:
            if self._unlisted and (self.done or self._error is not None):
                self.problems.append(
                    Problem(
                        self._first_unlisted,
                        f"expected at most {MAX_PROBLEMS} problems, "
                        f"found {self._unlisted} more from here on (not listed)",
                    )
                )
                self._unlisted = 0

    def _problem(self, problem: Problem) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)
        else:
            if not self._unlisted:
                self._first_unlisted = problem.offset
            self._unlisted += 1

    def _walk(self, until_ram_start: bool) -> None:
        cursor = self.cursor
        while not self.done:
            if until_ram_start and self.ram_section_offset is not None:
                return
            off = cursor.pos
            byte = cursor.byte("a section type byte or EOF")
            kind = _SECTION_TYPES.get(byte)
            if kind is None:
                raise FormatError(off, "a section type byte (0x00-0x08)", f"{byte:#04x}")
            step = self._dispatch.get(kind)
            if step is None:
                raise FormatError(off, "a section, command or EOF", f"{kind.name} ({byte:#04x})")
            step(off, kind)
        if until_ram_start and self.ram_section_offset is None:
            raise FormatError(self.eof_offset or 0, "a RAM section before EOF", "none")

    def _full_section(self, off: int, kind: SectionType) -> None:
        cursor = self.cursor
        start = off + 1
        cursor.skip_to(start, "a section")
        what = "a section header (id, idstr, instance, version)"
        section_id, length = _ID_AND_LEN.unpack(_take(cursor, start, _ID_AND_LEN.size, what))
        raw = _take(cursor, start, length + _INSTANCE_VERSION.size, what)
        try:
            idstr = raw[:length].decode()
        except UnicodeDecodeError as err:
            raise FormatError(start, what, f"{err} in field idstr") from None
        instance_id, version_id = _INSTANCE_VERSION.unpack_from(raw, length)
        sec = Section(
            "start" if kind == SectionType.SECTION_START else "full",
            off,
            section_id,
            idstr,
            instance_id,
            version_id,
            payload_offset=cursor.pos,
        )
        if idstr == RAM_IDSTR:
            if self.ram_section_id is not None:
                raise FormatError(off, "one RAM section", "a second START/FULL for 'ram'")
            if version_id != RAM_SECTION_VERSION:
                self._problem(Problem(off, f"expected RAM section version {RAM_SECTION_VERSION}, found {version_id}"))
            self.ram_section_id = section_id
            self.ram.opening(cursor)
            self.ram_section_offset = off
        else:
            self._device_payload(sec)
        self._close_section(sec)
        self.sections.append(sec)

    def _part_section(self, off: int, kind: SectionType) -> None:
        cursor = self.cursor
        cursor.skip_to(off + 1, "a section")
        (section_id,) = _U32.unpack(_take(cursor, off + 1, _U32.size, "a section id"))
        is_ram = section_id == self.ram_section_id
        sec = Section(
            "part" if kind == SectionType.SECTION_PART else "end",
            off,
            section_id,
            RAM_IDSTR if is_ram else None,
            payload_offset=cursor.pos,
        )
        if is_ram:
            self.ram.payload(cursor)
        else:
            self._device_payload(sec)
        self._close_section(sec)
        self.sections.append(sec)

    def _command(self, off: int, kind: SectionType) -> None:
        """A COMMAND, and the commands that follow it at once (a stream may hold millions:
        they are read from the cursor's window without a round through the dispatch)."""
        cursor, size, log = self.cursor, self.cursor.size, self.sections
        what = "a command (be16 cmd, be16 len, data)"
        verdicts = self._command_verdicts
        buf, base = b"", off
        while True:
            start = off + 1
            if start + _COMMAND.size > base + len(buf):
                buf, base = cursor.window(off, min(size - off, 1 + _COMMAND.size))
            if start + _COMMAND.size > size:
                raise FormatError(start, what, f"the end of the file at {size:#x}")
            cmd, length = _COMMAND.unpack_from(buf, start - base)
            end = start + _COMMAND.size + length
            if end > size:
                raise FormatError(start, what, f"the end of the file at {size:#x}")
            key = cmd << 16 | length
            if key in verdicts:
                why = verdicts[key]
            else:
                why = command_problem(cmd, length)
                if len(verdicts) < _VERDICTS_KEPT:
                    verdicts[key] = why
            if why:
                self._problem(Problem(start, f"expected {why}"))
            elif cmd == OPENS_RETURN_PATH:
                self._return_path = True
            elif cmd in NEED_RETURN_PATH and not self._return_path:
                self._problem(Problem(start, f"expected {return_path_problem(cmd)}"))
            log.add_command(off, cmd, length)
            off = end
            if not (off < base + len(buf) and buf[off - base] == _COMMAND_TYPE) or off >= size:
                break
        cursor.skip_to(off, "a command's data")

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
            self._problem(
                Problem(pos, f"expected a section footer (0x7e) for {sec.idstr or sec.section_id}, found {marker:#04x}")
            )
            return
        _, footer_id = _FOOTER.unpack(_take(cursor, pos, _FOOTER.size, "a section footer"))
        sec.footer_offset = pos
        sec.end = cursor.pos
        if footer_id != sec.section_id:
            self._problem(
                Problem(pos, f"expected the footer of section {sec.section_id} ({sec.idstr}), found id {footer_id}")
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
            self._problem(
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


def _take(cursor: Cursor, start: int, length: int, what: str) -> bytes:
    """The next ``length`` bytes of an element that began at ``start``."""
    if cursor.pos + length > cursor.size:
        raise FormatError(start, what, f"the end of the file at {cursor.size:#x}")
    return cursor.read(length, what)
