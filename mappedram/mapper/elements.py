"""What a walk over the stream finds: its top-level elements, and problems that do not stop it."""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass, fields
from typing import Any, Iterator, Sequence, overload

from ..formats import headers as H
from ..formats.constants import RAM_IDSTR


@dataclass(frozen=True, slots=True)
class Problem:
    """Something wrong that does not stop the walk; verify reports these."""

    offset: int
    text: str

    def __str__(self) -> str:
        return f"offset {self.offset:#x} ({self.offset}): {self.text}"


@dataclass(slots=True)
class Section:
    """One top-level element of the stream (filled in as the walker gets past it)."""

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
        # not asdict: its deep copy of each field cost dump --json half its time per section
        return {name: v for name in _SECTION_FIELDS if (v := getattr(self, name)) is not None}


_SECTION_FIELDS = tuple(f.name for f in fields(Section))


# -- the walk's sections, packed ---------------------------------------------------------------
# One row per element: a kind byte, then only what the file does not imply. Offsets are
# implied (each element starts where the one before ended) unless AT says one follows;
# payload offsets follow from the header's size; ends from the payload and the footer.
_KINDS = ("start", "full", "part", "end", "command", "eof")
_CODES = {kind: code for code, kind in enumerate(_KINDS)}
_FOOTER, _LONG, _AT, _RAM = 0x10, 0x20, 0x40, 0x80  # flags in the kind byte
_FOOTER_SIZE = H.SECTION_FOOTER.size
_FULL_FIXED = 1 + H.SECTION_ID.size + 1 + 4 + 4  # type, id, idlen, instance, version
_PART_HEAD = 1 + H.SECTION_ID.size
_COMMAND_HEAD = 1 + 4  # type, be16 cmd, be16 length
_COMMAND_NAMES = H.COMMAND_NAMES  # be16 cmd -> its name
_MARK_EVERY = 256  # rows between two (row byte position, offset) marks, for indexing
_U32, _U64, _U16X2, _U32X2 = struct.Struct(">I"), struct.Struct(">Q"), struct.Struct(">HH"), struct.Struct(">II")


class SectionLog(Sequence[Section]):
    """The walk's sections, packed into bytes: a row costs about what the element's
    header costs in the file, so millions of 5-byte commands do not cost a Python object
    each (issue 11). ``Section`` objects are made on access."""

    def __init__(self) -> None:
        self._rows = bytearray()
        self._marks = array("q")  # per _MARK_EVERY rows: byte position of the row, its offset
        self._count = 0
        self._next: int | None = None  # where the next element would start

    def __len__(self) -> int:
        return self._count

    def append(self, sec: Section) -> None:
        rows, code = self._rows, _CODES[sec.kind]
        if self._count % _MARK_EVERY == 0:
            self._marks.extend((len(rows), sec.offset))
        at = sec.offset != self._next
        length = sec.payload_length or 0
        flags = (
            code
            | (_AT if at else 0)
            | (_FOOTER if sec.footer_offset is not None else 0)
            | (_LONG if length >= 1 << 32 else 0)
            | (_RAM if sec.idstr == RAM_IDSTR and code in (2, 3) else 0)
        )
        rows.append(flags)
        if at:
            rows += _U64.pack(sec.offset)
        if code <= 1:  # start, full
            name = (sec.idstr or "").encode()
            rows += _U32.pack(sec.section_id or 0)
            rows.append(len(name))
            rows += name
            rows += _U32X2.pack(sec.instance_id or 0, sec.version_id or 0)
        elif code <= 3:  # part, end
            rows += _U32.pack(sec.section_id or 0)
        elif code == 4:
            raise ValueError("commands are logged with add_command")
        if code <= 3:
            rows += _U64.pack(length) if length >= 1 << 32 else _U32.pack(length)
        self._count += 1
        self._next = sec.end

    def add_command(self, offset: int, cmd: int, length: int) -> None:
        """A COMMAND element (be16 cmd, be16 length, data): the hot path of a stream made
        of commands, so no Section object is made."""
        rows = self._rows
        if self._count % _MARK_EVERY == 0:
            self._marks.extend((len(rows), offset))
        if offset != self._next:
            rows.append(4 | _AT)
            rows += _U64.pack(offset)
        else:
            rows.append(4)
        rows += _U16X2.pack(cmd, length)
        self._count += 1
        self._next = offset + _COMMAND_HEAD + length

    def _decode(self, pos: int, offset: int) -> tuple[Section, int]:
        """The row at byte ``pos`` of an element at ``offset`` (unless the row says
        another), and the next row's position."""
        rows = self._rows
        flags = rows[pos]
        pos += 1
        code = flags & 0x0F
        if flags & _AT:
            (offset,) = _U64.unpack_from(rows, pos)
            pos += 8
        kind = _KINDS[code]
        if code == 5:
            return Section(kind, offset, end=offset + 1), pos
        if code == 4:
            cmd, length = _U16X2.unpack_from(rows, pos)
            name = str(_COMMAND_NAMES.get(cmd, cmd))
            end = offset + _COMMAND_HEAD + length
            return Section(
                kind, offset, command=name, payload_offset=offset + 5, payload_length=length, end=end
            ), pos + 4
        (sid,) = _U32.unpack_from(rows, pos)
        pos += 4
        if code <= 1:
            n = rows[pos]
            idstr: str | None = rows[pos + 1 : pos + 1 + n].decode()
            instance, version = _U32X2.unpack_from(rows, pos + 1 + n)
            pos += 1 + n + 8
            payload_offset = offset + _FULL_FIXED + n
        else:
            idstr, instance, version = (RAM_IDSTR if flags & _RAM else None), None, None
            payload_offset = offset + _PART_HEAD
        if flags & _LONG:
            (length,) = _U64.unpack_from(rows, pos)
            pos += 8
        else:
            (length,) = _U32.unpack_from(rows, pos)
            pos += 4
        footer = payload_offset + length if flags & _FOOTER else None
        end = payload_offset + length + (_FOOTER_SIZE if footer is not None else 0)
        return Section(kind, offset, sid, idstr, instance, version, payload_offset, length, footer, None, end), pos

    def _iter_from(self, row: int) -> Iterator[Section]:
        mark = row // _MARK_EVERY
        pos, offset = self._marks[2 * mark], self._marks[2 * mark + 1]
        index = mark * _MARK_EVERY
        while index < self._count:
            sec, pos = self._decode(pos, offset)
            if index >= row:
                yield sec
            offset = sec.end
            index += 1

    def __iter__(self) -> Iterator[Section]:
        return self._iter_from(0) if self._count else iter(())

    @overload
    def __getitem__(self, index: int) -> Section: ...
    @overload
    def __getitem__(self, index: slice) -> list[Section]: ...
    def __getitem__(self, index: int | slice) -> Section | list[Section]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError("section index out of range")
        return next(self._iter_from(index))

    def __eq__(self, other: object) -> bool:
        return _same(self, other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SectionLog({self._count} sections)"


class DeviceSections(Sequence[Section]):
    """The FULL device sections (all but RAM's) of a walked SectionLog, in stream order:
    iterating decodes the log once; ``len`` and indexing keep the device rows' numbers (8
    bytes each), so a stream of a million device sections is not a million objects."""

    def __init__(self, log: SectionLog) -> None:
        self._log = log
        self._rows: array[int] | None = None

    def _index(self) -> array[int]:
        if self._rows is None:
            self._rows = array("q", (i for i, s in enumerate(self._log) if _is_device(s)))
        return self._rows

    def __len__(self) -> int:
        return len(self._index())

    def __iter__(self) -> Iterator[Section]:
        return (s for s in self._log if _is_device(s))

    @overload
    def __getitem__(self, index: int) -> Section: ...
    @overload
    def __getitem__(self, index: slice) -> list[Section]: ...
    def __getitem__(self, index: int | slice) -> Section | list[Section]:
        if isinstance(index, slice):
            return [self._log[row] for row in self._index()[index]]
        return self._log[self._index()[index]]

    def __eq__(self, other: object) -> bool:
        return _same(self, other)

    __hash__ = None  # type: ignore[assignment]


def _is_device(sec: Section) -> bool:
    return sec.kind == "full" and sec.idstr != RAM_IDSTR


def _same(a: Sequence[Section], b: object) -> bool:
    return isinstance(b, Sequence) and len(a) == len(b) and all(x == y for x, y in zip(a, b))
