"""The fixed-size parts of structs.py's schemas as ``struct`` formats, for the reader.

structs.py stays the one declaration of the format; the reader unpacks these instead
because importing construct costs ~15 ms, more than ``dump`` of a huge mapped-ram file
spends reading. tests/test_startup.py checks every format, size and field offset here
against its schema (building with construct, unpacking with these).
"""

from __future__ import annotations

import struct

from .constants import LibvirtFormat, VmCommand, enum_mapping


def _fields(order: str, fields: tuple[tuple[str, str], ...]) -> tuple[struct.Struct, dict[str, int]]:
    """A packed struct of ``fields`` (name, struct code) and each field's offset in it."""
    offsets, at = {}, 0
    for name, code in fields:
        offsets[name] = at
        at += struct.calcsize(order + code)
    return struct.Struct(order + "".join(code for _, code in fields)), offsets


# §7 structs.libvirt_header: 92 bytes in the writing host's order.
_LIBVIRT = (
    ("magic", "16s"),
    ("version", "I"),
    ("data_len", "I"),
    ("was_running", "I"),
    ("format", "I"),
    ("cookie_offset", "I"),
    ("unused", "14I"),
)
LIBVIRT_HEADER_LE, LIBVIRT_FIELDS = _fields("<", _LIBVIRT)
LIBVIRT_HEADER_BE, _ = _fields(">", _LIBVIRT)
LIBVIRT_HEADER_SIZE = LIBVIRT_HEADER_LE.size
LIBVIRT_FORMATS = {value: name for name, value in enum_mapping(LibvirtFormat).items()}  # the schema's Enum

# §1.2 structs.QevmHeader: magic, be32 version.
QEVM_HEADER = struct.Struct(">4sI")

# §1.3 structs.ConfigurationHead after its 0x07 byte: be32 length of the machine name.
# structs.SubsectionHead after its 0x05 byte: u8 name length, name, then be32 version_id.
NAME32_LENGTH = struct.Struct(">I")
SUBSECTION_VERSION = struct.Struct(">I")
TARGET_PAGE_BITS = struct.Struct(">I")  # structs.TargetPageBits
CAPABILITY_COUNT = struct.Struct(">I")  # structs.CapabilityList's count; each name u8 length + name
UUID_SIZE = 16  # structs.VmUuid

# §1.4 structs.SectionHeaderPart (also the first field of SectionHeaderFull), SectionFooter.
SECTION_ID = struct.Struct(">I")
SECTION_FOOTER = struct.Struct(">BI")  # 0x7e, section id

# §1.5 structs.CommandBody's cmd values and their names, as the schema's Enum decodes them.
COMMAND_NAMES = {value: name for name, value in enum_mapping(VmCommand).items()}

# §1.6 structs.VmDescriptionHead: 0x06, be32 JSON length.
VMDESC_HEAD = struct.Struct(">BI")

# §2 structs.RamWord, §3.2 structs.MappedRamHeader (28 bytes packed).
RAM_WORD = struct.Struct(">Q")
MAPPED_RAM_HEADER, MAPPED_RAM_FIELDS = _fields(
    ">", (("version", "I"), ("page_size", "Q"), ("bitmap_offset", "Q"), ("pages_offset", "Q"))
)
