"""What the loaders accept, said once: RAM words per mode, VM commands, libvirt formats.

QEMU spreads ``migrate_mapped_ram()`` checks over ram.c and multifd.c; here one table
says which RAM_SAVE_FLAG_* words a mode may carry and which channel syncs happen at
which event, and the reader, verifier and writer ask it instead of testing the mode.
Sources: FORMAT.md §3.5, §3.6 and §4.2 (ram_load_precopy's ``invalid_flags`` and its
``switch (flags & ~RAM_SAVE_FLAG_CONTINUE)``, multifd_ram_sync_per_round,
multifd_recv_sync_main); savevm.c's ``mig_cmd_args`` and loadvm_process_command;
libvirt's virQEMUSaveFormat and qemuSaveImageOpen; the x-ignore-shared marker of
mapped_ram_setup_ramblock / parse_ramblock_mapped_ram (QEMU 11).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping

from .constants import CAP_MAPPED_RAM, LibvirtFormat, RamFlag, VmCommand


class Mode(enum.Enum):
    MAPPED_RAM = "mapped-ram"
    STREAM = "stream"  # the classic stream: pages inline as PAGE/ZERO records


class Event(enum.Enum):
    """Points where a channel sync may be due."""

    ROUND_END = "round-end"  # writer: a pass over the dirty pages is queued
    LOAD_END = "load-end"  # reader: every block's pages are queued


class Sync(enum.Enum):
    NONE = "none"
    LOCAL = "local"  # wait until every channel thread is idle; nothing is written to the stream


@dataclass(frozen=True)
class ModePolicy:
    mode: Mode
    # What a RAM word may be, CONTINUE aside: ram_load_precopy switches on
    # ``flags & ~CONTINUE`` and refuses every value that is not one of these single flags
    # ("Unknown combination of migration flags"), so 0, CONTINUE alone and PAGE|ZERO fail.
    word_kinds: frozenset[RamFlag]
    decoded_kinds: frozenset[RamFlag]  # the subset this project decodes
    pages_in_stream: bool  # PAGE/ZERO records in the stream, else at fixed offsets
    block_has_mapped_ram_header: bool
    syncs: Mapping[Event, Sync] = field(default_factory=dict)

    def sync_at(self, event: Event) -> Sync:
        return self.syncs.get(event, Sync.NONE)

    def word_problem(self, flags: int) -> str | None:
        """Why a RAM word with these flag bits is not allowed here, or None."""
        kind = flags & ~int(RamFlag.CONTINUE)  # int: ~ of an IntFlag drops the bits it does not name
        if kind not in self.word_kinds:
            kinds = _kinds(self.word_kinds)
            return f"RAM flags valid under {self.mode.value}: one of {kinds}, with or without CONTINUE"
        if kind not in self.decoded_kinds:
            return f"RAM flags this reader decodes: one of {_kinds(self.decoded_kinds)}"
        return None

    def later_word_problem(self, flags: int) -> str | None:
        """``word_problem`` for any word but the one opening the RAM section."""
        return self.word_problem(flags) or ("no second MEM_SIZE word" if flags & RamFlag.MEM_SIZE else None)


def flag_names(flags: int) -> str:
    """``MEM_SIZE|EOS`` for 0x14; unknown bits in hex."""
    names = [f.name for f in RamFlag if f.name and flags & f]
    rest = flags & ~sum(RamFlag)
    return "|".join(names + ([f"{rest:#x}"] if rest else [])) or "0"


def _kinds(kinds: frozenset[RamFlag]) -> str:
    return ", ".join(flag_names(k) for k in sorted(kinds))


POLICIES: Mapping[Mode, ModePolicy] = {
    Mode.MAPPED_RAM: ModePolicy(
        mode=Mode.MAPPED_RAM,
        # QEMU rejects HOOK|MULTIFD_FLUSH|PAGE|XBZRLE|ZERO; FULL and COMPRESS_PAGE are gone.
        word_kinds=frozenset({RamFlag.MEM_SIZE, RamFlag.EOS}),
        decoded_kinds=frozenset({RamFlag.MEM_SIZE, RamFlag.EOS}),
        pages_in_stream=False,
        block_has_mapped_ram_header=True,
        # Sender: a local thread sync at the end of every dirty pass, no flush word.
        # Receiver: one sync after the block list, "once and for all".
        syncs={Event.ROUND_END: Sync.LOCAL, Event.LOAD_END: Sync.LOCAL},
    ),
    Mode.STREAM: ModePolicy(
        mode=Mode.STREAM,
        # HOOK is left out although QEMU's default branch hands it to RDMA: only an RDMA
        # transport writes it, never a file.
        word_kinds=frozenset(
            {RamFlag.MEM_SIZE, RamFlag.EOS, RamFlag.PAGE, RamFlag.ZERO, RamFlag.XBZRLE, RamFlag.MULTIFD_FLUSH}
        ),
        decoded_kinds=frozenset({RamFlag.MEM_SIZE, RamFlag.EOS, RamFlag.PAGE, RamFlag.ZERO, RamFlag.MULTIFD_FLUSH}),
        pages_in_stream=True,
        block_has_mapped_ram_header=False,
        # A file stream has one writer channel: pages are in order in the stream itself.
        # QEMU loads it inline; our parallel reader, once the pages are indexed, syncs
        # its channels once at the end like mapped-ram.
        syncs={Event.LOAD_END: Sync.LOCAL},
    ),
}


# The capability in the configuration section that announces a mode; a stream that
# announces none is a classic stream.
MODE_CAPABILITIES: Mapping[Mode, str] = {Mode.MAPPED_RAM: CAP_MAPPED_RAM}


def policy_for(capabilities: tuple[str, ...] | list[str]) -> ModePolicy:
    """The policy of a stream whose configuration announced these capabilities."""
    announced = [mode for mode, cap in MODE_CAPABILITIES.items() if cap in capabilities]
    return POLICIES[announced[0] if announced else Mode.STREAM]


# -- VM commands ------------------------------------------------------------------------
# The payload lengths loadvm_process_command accepts (savevm.c's mig_cmd_args; POSTCOPY_ADVISE
# is checked by loadvm_postcopy_handle_advise: nothing, or two be64 page sizes). None: the
# length varies with the payload. INVALID and anything past the last command are refused.
COMMAND_LENGTHS: Mapping[VmCommand, frozenset[int] | None] = {
    VmCommand.OPEN_RETURN_PATH: frozenset({0}),
    VmCommand.PING: frozenset({4}),
    VmCommand.POSTCOPY_ADVISE: frozenset({0, 16}),
    VmCommand.POSTCOPY_LISTEN: frozenset({0}),
    VmCommand.POSTCOPY_RUN: frozenset({0}),
    VmCommand.POSTCOPY_RAM_DISCARD: None,
    VmCommand.PACKAGED: frozenset({4}),
    VmCommand.ENABLE_COLO: frozenset({0}),
    VmCommand.POSTCOPY_RESUME: frozenset({0}),
    VmCommand.RECV_BITMAP: None,
    VmCommand.SWITCHOVER_START: frozenset({0}),
}


# Commands loadvm_process_command refuses unless an OPEN_RETURN_PATH came before them
# (PING answers on the return path: "received with no return path").
OPENS_RETURN_PATH = VmCommand.OPEN_RETURN_PATH
NEED_RETURN_PATH: frozenset[int] = frozenset({VmCommand.PING})


def return_path_problem(cmd: int) -> str:
    """Why QEMU refuses ``cmd`` (one of NEED_RETURN_PATH) before any OPEN_RETURN_PATH."""
    return f"an OPEN_RETURN_PATH command before {VmCommand(cmd).name} (no return path: QEMU refuses it), found none"


def command_problem(cmd: int, length: int) -> str | None:
    """Why QEMU refuses a COMMAND with this be16 cmd and be16 length (the text after
    "expected"), or None."""
    try:
        known: VmCommand | None = VmCommand(cmd)
    except ValueError:
        known = None
    if known not in COMMAND_LENGTHS:
        names = ", ".join(f"{c.name} ({c.value})" for c in COMMAND_LENGTHS)
        return f"a known VM command ({names}), found cmd {cmd:#x}"
    lengths = COMMAND_LENGTHS[known]
    if lengths is not None and length not in lengths:
        want = " or ".join(str(n) for n in sorted(lengths))
        return f"a {known.name} command with a payload of {want} bytes, found {length}"
    return None


# -- libvirt save formats -----------------------------------------------------------------
@dataclass(frozen=True)
class SaveFormat:
    """One virQEMUSaveFormat: what libvirt put behind its header."""

    name: str
    magic: bytes | None  # what the compressor writes first; None: the QEMU stream itself
    mapped_ram: bool  # sparse images hold a mapped-ram stream, the others a classic one


# The compressors' own magics (gzip RFC 1952, bzip2, xz, lzop, zstd RFC 8878). libvirt
# compresses only classic streams, and restores a sparse image with the mapped-ram
# capability on, so QEMU's capability check refuses a mapped-ram stream behind raw and a
# classic one behind sparse.
_COMPRESSOR_MAGIC: Mapping[LibvirtFormat, bytes] = {
    LibvirtFormat.GZIP: b"\x1f\x8b",
    LibvirtFormat.BZIP2: b"BZh",
    LibvirtFormat.XZ: b"\xfd7zXZ\x00",
    LibvirtFormat.LZOP: b"\x89LZO\x00\r\n\x1a\n",
    LibvirtFormat.ZSTD: b"\x28\xb5\x2f\xfd",
}
# Keyed by the name LibvirtHeader.format shows (an unknown number shows as its digits).
SAVE_FORMATS: Mapping[str, SaveFormat] = {
    f.name.lower(): SaveFormat(f.name.lower(), _COMPRESSOR_MAGIC.get(f), f == LibvirtFormat.SPARSE)
    for f in LibvirtFormat
}
COMPRESSED_FORMATS = tuple(f.name for f in SAVE_FORMATS.values() if f.magic is not None)  # convert --compress


def libvirt_format_problem(name: str) -> str | None:
    """Why libvirt refuses a header whose format field reads ``name`` (an unknown number;
    qemuSaveImageGetCompressionCommand: "Invalid compressed save format"), or None."""
    if name in SAVE_FORMATS:
        return None
    known = ", ".join(f"{LibvirtFormat[f.upper()].value} {f}" for f in SAVE_FORMATS)
    return f"a libvirt save format ({known}), found {name}"


def libvirt_data_problem(data_len: int, cookie_offset: int) -> tuple[str, str] | None:
    """(the header field at fault, why) qemuSaveImageOpen refuses this data area: an empty
    one ("invalid header data length"), or a cookie said to start past its end (the
    cookie length underflows)."""
    if data_len == 0:
        return "data_len", "a libvirt data_len above 0 (the domain XML follows the header), found 0"
    if cookie_offset > data_len:
        why = f"a libvirt cookie offset inside the data area of {data_len} bytes, found {cookie_offset}"
        return "cookie_offset", why
    return None


def libvirt_xml_problem(xml_len: int, has_cookie: bool, terminated: bool) -> tuple[str, str] | None:
    """(the header field at fault, why) libvirt cannot parse the domain XML: it reads
    ``xml_len`` bytes (cookie_offset, or data_len without a cookie) and parses them as a C
    string, so a NUL must end the XML inside them."""
    if terminated:
        return None
    field = "cookie_offset" if has_cookie else "data_len"
    return field, f"the libvirt domain XML to end with a NUL within its {xml_len} bytes ({field}), found none"


def compressed_image(name: str, head: bytes) -> str | None:
    """The compressor's name when the stream start holds the magic the format promises."""
    fmt = SAVE_FORMATS.get(name)
    return fmt.name if fmt is not None and fmt.magic is not None and head.startswith(fmt.magic) else None


def libvirt_stream_problem(name: str, mode: Mode) -> str | None:
    """Why a readable QEMU stream of ``mode`` contradicts the header's format ``name``."""
    fmt = SAVE_FORMATS.get(name)
    if fmt is None:
        return None  # libvirt_format_problem has said it
    if fmt.magic is not None:
        return f"{fmt.name}-compressed data as the header's format says, found an uncompressed QEMU stream"
    if fmt.mapped_ram != (mode == Mode.MAPPED_RAM):
        want, found = ("mapped-ram", "classic") if fmt.mapped_ram else ("classic", "mapped-ram")
        return f"a {want} stream behind a libvirt header of format {fmt.name}, found a {found} stream"
    return None


# -- x-ignore-shared ----------------------------------------------------------------------
def block_in_file(ignore_shared: bool, bitmap_offset: int, pages_offset: int) -> bool:
    """False for a block QEMU 11 leaves out of a mapped-ram file: under x-ignore-shared,
    mapped_ram_setup_ramblock writes both offsets as 0 for a shared block and reserves no
    space; parse_ramblock_mapped_ram skips such a block and the stream goes on right
    after its header. Its used_length still counts toward MEM_SIZE."""
    return not (ignore_shared and bitmap_offset == 0 and pages_offset == 0)
