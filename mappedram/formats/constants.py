"""Named constants and enums of the QEMU migration stream (FORMAT.md §1.1, §1.5, §2.1, §3.2, §7)."""

from __future__ import annotations

import enum

QEVM_MAGIC = b"QEVM"
QEVM_VERSION = 3
QEVM_VERSION_COMPAT = 2  # rejected by QEMU: "SaveVM v2 format is obsolete"

RAM_IDSTR = "ram"
RAM_SECTION_VERSION = 4

MAPPED_RAM_VERSION = 1
MAPPED_RAM_ALIGNMENT = 0x100000  # MAPPED_RAM_FILE_OFFSET_ALIGNMENT
MAPPED_RAM_LOAD_BUF_SIZE = 0x100000  # the largest single read QEMU does on load

LIBVIRT_MAGIC_DONE = b"LibvirtQemudSave"
LIBVIRT_MAGIC_PARTIAL = b"LibvirtQemudPart"
LIBVIRT_VERSION = 2

CAP_MAPPED_RAM = "mapped-ram"
CAP_IGNORE_SHARED = "x-ignore-shared"

SUB_TARGET_PAGE_BITS = "configuration/target-page-bits"
SUB_CAPABILITIES = "configuration/capabilities"
SUB_UUID = "configuration/uuid"


class SectionType(enum.IntEnum):
    """The byte that opens every top-level stream element (QEMU_VM_*)."""

    EOF = 0x00
    SECTION_START = 0x01
    SECTION_PART = 0x02
    SECTION_END = 0x03
    SECTION_FULL = 0x04
    SUBSECTION = 0x05
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08
    SECTION_FOOTER = 0x7E


class VmCommand(enum.IntEnum):
    """MIG_CMD_* of a COMMAND element."""

    INVALID = 0
    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    PACKAGED = 7
    ENABLE_COLO = 8
    POSTCOPY_RESUME = 9
    RECV_BITMAP = 10
    SWITCHOVER_START = 11


class RamFlag(enum.IntFlag):
    """RAM_SAVE_FLAG_*: the low bits of every be64 word of the RAM section payload."""

    FULL = 0x01
    ZERO = 0x02
    MEM_SIZE = 0x04
    PAGE = 0x08
    EOS = 0x10
    CONTINUE = 0x20
    XBZRLE = 0x40
    HOOK = 0x80
    COMPRESS_PAGE = 0x100
    MULTIFD_FLUSH = 0x200


class LibvirtFormat(enum.IntEnum):
    """virQEMUSaveFormat: how libvirt stored the QEMU stream behind its header."""

    RAW = 0
    GZIP = 1
    BZIP2 = 2
    XZ = 3
    LZOP = 4
    ZSTD = 5
    SPARSE = 6  # mapped-ram


def enum_mapping(cls: type[enum.IntEnum]) -> dict[str, int]:
    """The ``name=value`` pairs a construct ``Enum`` takes, from one of the enums above."""
    return {member.name.lower(): member.value for member in cls}
