"""The start of a snapshot file: libvirt's header, where the QEMU stream starts, the QEVM
header and the configuration section (machine, capabilities, page bits, uuid).

Read forward through a cursor, so a forward-only source serves it too; unpacked with
headers.py's struct formats (construct's import would cost more than the reading).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import FormatError
from ..formats import headers as H
from ..formats.constants import (
    LIBVIRT_MAGIC_DONE,
    LIBVIRT_MAGIC_PARTIAL,
    LIBVIRT_VERSION,
    QEVM_MAGIC,
    QEVM_VERSION,
    QEVM_VERSION_COMPAT,
    SUB_CAPABILITIES,
    SUB_TARGET_PAGE_BITS,
    SUB_UUID,
    SectionType,
)
from ..formats.layout import MAX_PAGE_BITS, MIN_PAGE_BITS
from ..formats.policy import compressed_image, libvirt_data_problem, libvirt_format_problem, libvirt_xml_problem
from .elements import Problem
from .source import Cursor

STREAM_PROBE_LIMIT = 1 << 20
# The domain XML and the cookie are read up to their NUL, at most this much each: a
# hostile data_len (up to 4 GiB) costs no more. libvirt's own XML is a few KiB.
XML_READ_LIMIT = 16 << 20
_XML_PIECE = 64 << 10
_MAGIC = len(LIBVIRT_MAGIC_DONE)
_LIBVIRT_FIELDS = H.LIBVIRT_FIELDS  # where problems in its fields are reported
LIBVIRT_FORMAT_AT = _LIBVIRT_FIELDS["format"]


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
    domain_xml: str = ""  # the data area's XML up to its NUL (at most XML_READ_LIMIT bytes read)
    cookie: str | None = None  # the cookie up to its NUL; None when cookie_offset is 0

    @property
    def stream_start(self) -> int:
        return H.LIBVIRT_HEADER_SIZE + self.data_len


@dataclass(frozen=True)
class Configuration:
    """The configuration section (FORMAT.md §1.3); all empty when the stream has none."""

    machine_type: str | None = None
    capabilities: tuple[str, ...] = ()
    target_page_bits: int | None = None
    uuid: str | None = None


@dataclass(frozen=True)
class Prologue:
    libvirt: LibvirtHeader | None
    stream_start: int  # offset of the QEVM magic
    version: int
    configuration: Configuration
    problems: tuple[Problem, ...]


class CompressedImage(FormatError):
    """A libvirt image whose stream is compressed: it reads only forward (forward.py)."""

    def __init__(self, header: LibvirtHeader, compressor: str) -> None:
        super().__init__(
            header.stream_start,
            "a QEMU stream readable at any offset; this libvirt image is "
            f"{compressor}-compressed and reads in one forward pass: open it with mappedram.open(), "
            "or use the commands dump, verify, extract, export-elf, convert",
            f"the {compressor} magic",
        )
        self.header = header
        self.compressor = compressor


def read_prologue(cursor: Cursor, explicit_start: bool) -> Prologue:
    """Read from ``cursor.pos``: the stream's start when ``explicit_start``, else the file's
    start (a libvirt header, or the first QEVM magic in the first MiB). Leaves the cursor
    on the first section. A compressed libvirt image raises CompressedImage."""
    libvirt, cut = (None, []) if explicit_start else _libvirt_header(cursor)
    if libvirt is not None and (compressor := _compressor(cursor, libvirt)):
        raise CompressedImage(libvirt, compressor)
    if not explicit_start and libvirt is None:
        _probe_stream_start(cursor)
    return read_stream_prologue(cursor, libvirt, cut)


def read_stream_prologue(cursor: Cursor, libvirt: LibvirtHeader | None, cut: list[Problem]) -> Prologue:
    """The QEVM header and the configuration from ``cursor.pos`` (behind ``libvirt``, if
    any: a decompressed stream's cursor starts where the raw image's stream would)."""
    stream_start = cursor.pos
    what = "the QEVM magic (a QEMU migration stream)"
    magic, version = H.QEVM_HEADER.unpack(_take(cursor, stream_start, H.QEVM_HEADER.size, what))
    if magic != QEVM_MAGIC:
        raise FormatError(stream_start, what, f"{magic!r} in field magic")
    if version != QEVM_VERSION:
        found = "the obsolete v2" if version == QEVM_VERSION_COMPAT else str(version)
        raise FormatError(cursor.pos - 4, f"stream version {QEVM_VERSION}", found)
    configuration = Configuration()
    if cursor.byte("the configuration section or a section") == SectionType.CONFIGURATION:
        configuration = _configuration(cursor)
    problems = [] if libvirt is None else _libvirt_problems(libvirt) + cut
    return Prologue(libvirt, stream_start, version, configuration, tuple(problems))


def _take(cursor: Cursor, start: int, length: int, what: str) -> bytes:
    """The next ``length`` bytes of ``what``, which began at ``start``."""
    if cursor.pos + length <= cursor.size:
        data = cursor.read(length, what)
        if len(data) == length:
            return data
    raise FormatError(start, what, f"the end of the file at {cursor.size:#x}")


def _text(raw: bytes, start: int, what: str, field: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError as err:
        raise FormatError(start, what, f"{err} in field {field}") from None


def _libvirt_problems(libvirt: LibvirtHeader) -> list[Problem]:
    """What libvirt's qemuSaveImageOpen would refuse in a header it could read."""
    problems = []
    if not libvirt.complete:
        problems.append(Problem(0, "expected a complete libvirt save (LibvirtQemudSave), found LibvirtQemudPart"))
    if why := libvirt_format_problem(libvirt.format):
        problems.append(Problem(LIBVIRT_FORMAT_AT, f"expected {why}"))
    if found := libvirt_data_problem(libvirt.data_len, libvirt.cookie_offset):
        field, why = found
        problems.append(Problem(_LIBVIRT_FIELDS[field], f"expected {why}"))
    return problems


def _libvirt_header(cursor: Cursor) -> tuple[LibvirtHeader | None, list[Problem]]:
    """The header with its XML and cookie, and a problem if they were cut."""
    if cursor.size < _MAGIC:
        return None, []
    buf, _ = cursor.window(cursor.pos, _MAGIC)
    if buf[:_MAGIC] not in (LIBVIRT_MAGIC_DONE, LIBVIRT_MAGIC_PARTIAL):
        return None, []
    raw = cursor.read(H.LIBVIRT_HEADER_SIZE, "the libvirt save header")
    magic, version, data_len, was_running, fmt, cookie_offset = H.LIBVIRT_HEADER_LE.unpack(raw)[:6]
    byteorder = "little"
    if version > LIBVIRT_VERSION:  # written on a host of the other byte order
        magic, version, data_len, was_running, fmt, cookie_offset = H.LIBVIRT_HEADER_BE.unpack(raw)[:6]
        byteorder = "big"
    if version != LIBVIRT_VERSION:
        raise FormatError(16, f"libvirt save header version {LIBVIRT_VERSION}", str(version))
    header = LibvirtHeader(
        complete=magic == LIBVIRT_MAGIC_DONE,
        byteorder=byteorder,
        version=version,
        data_len=data_len,
        was_running=was_running,
        format=H.LIBVIRT_FORMATS.get(fmt, str(fmt)),
        cookie_offset=cookie_offset,
    )
    start = header.stream_start
    if start + 8 > cursor.size:
        raise FormatError(
            start,
            "the QEMU stream behind the libvirt header (92 + data_len) (8 bytes) inside the file",
            f"the file ends at {cursor.size:#x}",
        )
    header, cut = _data_area(cursor, header)
    cursor.skip_to(start, "the libvirt header's data")
    return header, cut


def _compressor(cursor: Cursor, header: LibvirtHeader) -> str | None:
    """The compressor's name when the header says so and its magic is there."""
    start = header.stream_start
    buf, base = cursor.window(start, 16)
    return compressed_image(header.format, buf[start - base : start - base + 16])


def read_libvirt(cursor: Cursor) -> tuple[LibvirtHeader | None, list[Problem], str | None]:
    """The libvirt header at the cursor (or None), a problem if its XML or cookie was cut,
    and the compressor of the stream behind it (or None); leaves the cursor at the
    stream's start."""
    header, cut = _libvirt_header(cursor)
    return header, cut, None if header is None else _compressor(cursor, header)


def _data_area(cursor: Cursor, header: LibvirtHeader) -> tuple[LibvirtHeader, list[Problem]]:
    """The domain XML and the cookie from the data area behind the 92-byte header: the
    XML is cookie_offset bytes (all of data_len without a cookie), the cookie the rest,
    each NUL-terminated and padded with zeros (libvirt's qemuSaveImageReadHeader)."""
    data = H.LIBVIRT_HEADER_SIZE
    has_cookie = 0 < header.cookie_offset <= header.data_len
    xml_len = header.cookie_offset if has_cookie else header.data_len
    xml, xml_ended = _nul_string(cursor, data, xml_len, "the libvirt domain XML")
    xml_cut = not xml_ended and xml_len > XML_READ_LIMIT
    cookie: str | None = None
    cookie_cut = False
    if has_cookie:
        cookie_len = header.data_len - header.cookie_offset
        cookie, cookie_ended = _nul_string(cursor, data + header.cookie_offset, cookie_len, "the libvirt cookie")
        cookie_cut = not cookie_ended and cookie_len > XML_READ_LIMIT
    problems = []
    if header.data_len and (unparsable := libvirt_xml_problem(xml_len, has_cookie, xml_ended or xml_cut)):
        field, why = unparsable
        problems.append(Problem(_LIBVIRT_FIELDS[field], f"expected {why}"))
    if xml_cut or cookie_cut:
        problems.append(
            Problem(
                data,
                f"expected the libvirt domain XML and cookie to end (a NUL) within {XML_READ_LIMIT >> 20} MiB "
                "each, found a longer one; it is shown cut there",
            )
        )
    return replace(header, domain_xml=xml, cookie=cookie), problems


def _nul_string(cursor: Cursor, offset: int, length: int, what: str) -> tuple[str, bool]:
    """The text in [offset, offset + length) up to its first NUL, read in pieces and at
    most XML_READ_LIMIT bytes; and whether a NUL ended it there."""
    cursor.skip_to(offset, what)
    limit = min(length, XML_READ_LIMIT)
    text = bytearray()
    while len(text) < limit:
        piece = cursor.read(min(_XML_PIECE, limit - len(text)), what)
        end = piece.find(0)
        if end >= 0:
            text += piece[:end]
            return text.decode("utf-8", "replace"), True
        text += piece
    return text.decode("utf-8", "replace"), False


def _probe_stream_start(cursor: Cursor) -> None:
    """A ``file:PATH,offset=N`` save keeps whatever the management tool put in front;
    look for the QEVM v3 magic in the first MiB (an explicit offset skips this)."""
    buf, base = cursor.window(cursor.pos, min(cursor.size - cursor.pos, STREAM_PROBE_LIMIT))
    at = buf.find(H.QEVM_HEADER.pack(QEVM_MAGIC, QEVM_VERSION), cursor.pos - base, STREAM_PROBE_LIMIT)
    if at > 0:
        cursor.skip_to(base + at, "the bytes in front of the stream")


def _configuration(cursor: Cursor) -> Configuration:
    """vmstate_configuration (structs.ConfigurationHead, ConfigSubsection): the machine
    name, then the subsections; an unknown one has its head read, as the schema's Switch
    does."""
    start, what = cursor.pos, "the configuration section (machine name)"
    _take(cursor, start, 1, what)  # 0x07, seen by the caller
    (length,) = H.NAME32_LENGTH.unpack(_take(cursor, start, H.NAME32_LENGTH.size, what))
    machine = _text(_take(cursor, start, length, what), start, what, "machine")
    capabilities: tuple[str, ...] = ()
    target_page_bits = uuid = None
    while cursor.byte("a configuration subsection or a section") == SectionType.SUBSECTION:
        start, what = cursor.pos, "a known configuration subsection"
        _take(cursor, start, 1, what)  # 0x05
        name = _text(_take(cursor, start, _take(cursor, start, 1, what)[0], what), start, what, "head.name")
        _take(cursor, start, H.SUBSECTION_VERSION.size, what)
        if name == SUB_CAPABILITIES:
            (count,) = H.CAPABILITY_COUNT.unpack(_take(cursor, start, H.CAPABILITY_COUNT.size, what))
            if count > cursor.size - cursor.pos:  # each name takes a byte at least
                raise FormatError(start, what, f"the end of the file at {cursor.size:#x}")
            names = []
            for _ in range(count):
                names.append(_text(_take(cursor, start, _take(cursor, start, 1, what)[0], what), start, what, "names"))
            capabilities = tuple(names)
        elif name == SUB_TARGET_PAGE_BITS:
            (bits,) = H.TARGET_PAGE_BITS.unpack(_take(cursor, start, H.TARGET_PAGE_BITS.size, what))
            if not MIN_PAGE_BITS <= bits <= MAX_PAGE_BITS:
                raise FormatError(
                    cursor.pos - 4, f"target page bits between {MIN_PAGE_BITS} and {MAX_PAGE_BITS}", str(bits)
                )
            target_page_bits = bits
        elif name == SUB_UUID:
            uuid = _take(cursor, start, H.UUID_SIZE, what).hex()
    return Configuration(machine, capabilities, target_page_bits, uuid)
