"""Bytes of the main stream, built with the schemas, and the order of a stream's parts
(StreamComposer).

The writer and convert decide what to write and when; this module says how each element
looks and in which order the parts of a stream come (where a block's bitmap and pages go
is formats/layout.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from ..formats import structs as S
from ..formats.bitmap import BitmapLayout
from ..formats.constants import (
    MAPPED_RAM_ALIGNMENT,
    MAPPED_RAM_VERSION,
    QEVM_VERSION,
    RAM_IDSTR,
    RAM_SECTION_VERSION,
    SUB_CAPABILITIES,
    SUB_TARGET_PAGE_BITS,
    RamFlag,
    SectionType,
    VmCommand,
)
from ..formats.layout import BlockPlace, place_block

Piece = tuple[int, bytes]  # (file offset, bytes to write there)


DEFAULT_MACHINE = "pc-i440fx-10.0"  # the machine type of a stream whose source names none
DEFAULT_RAM_SECTION_ID = 2


class StreamEncoder:
    """The elements of a QEVM v3 stream as bytes."""

    def __init__(self, page_size: int, footers: bool = True) -> None:
        self.page_size = page_size
        self.footers = footers

    @staticmethod
    def header() -> bytes:
        return S.QevmHeader.build({"version": QEVM_VERSION})

    @staticmethod
    def configuration(machine: str, capabilities: Iterable[str] = (), target_page_bits: int | None = None) -> bytes:
        out = S.ConfigurationHead.build({"machine": machine})
        if target_page_bits is not None:
            out += S.ConfigSubsection.build(
                {"head": {"name": SUB_TARGET_PAGE_BITS, "version_id": 1}, "body": {"bits": target_page_bits}}
            )
        caps = list(capabilities)
        if caps:
            out += S.ConfigSubsection.build(
                {"head": {"name": SUB_CAPABILITIES, "version_id": 1}, "body": {"names": caps}}
            )
        return out

    @staticmethod
    def section_full(kind: SectionType, section_id: int, idstr: str, instance_id: int, version_id: int) -> bytes:
        return bytes([kind]) + S.SectionHeaderFull.build(
            {"section_id": section_id, "idstr": idstr, "instance_id": instance_id, "version_id": version_id}
        )

    @staticmethod
    def section_part(kind: SectionType, section_id: int) -> bytes:
        return bytes([kind]) + S.SectionHeaderPart.build({"section_id": section_id})

    def footer(self, section_id: int) -> bytes:
        return S.SectionFooter.build({"section_id": section_id}) if self.footers else b""

    @staticmethod
    def ram_word(value: int, flags: RamFlag) -> bytes:
        return S.RamWord.build(value | int(flags))

    def ram_start(self, section_id: int) -> bytes:
        return self.section_full(SectionType.SECTION_START, section_id, RAM_IDSTR, 0, RAM_SECTION_VERSION)

    def ram_eos_section(self, kind: SectionType, section_id: int) -> bytes:
        """A PART or END section of a mapped-ram stream: only EOS in the payload."""
        return self.section_part(kind, section_id) + self.ram_word(0, RamFlag.EOS) + self.footer(section_id)

    @staticmethod
    def block_entry(name: str, used_length: int, place: BlockPlace | None = None, addr: int | None = None) -> bytes:
        header = (
            None
            if place is None
            else {
                "version": MAPPED_RAM_VERSION,
                "page_size": place.page_size,
                "bitmap_offset": place.bitmap_offset,
                "pages_offset": place.pages_offset,
            }
        )
        return S.RamBlockEntry.build(
            {"idstr": name, "used_length": used_length, "addr": addr, "mapped_ram": header},
            mapped_ram=place is not None,
            ignore_shared=addr is not None,
        )

    @staticmethod
    def command(cmd: VmCommand, data: bytes = b"") -> bytes:
        return bytes([SectionType.COMMAND]) + S.CommandBody.build({"cmd": cmd.name.lower(), "data": data})

    @staticmethod
    def eof(vmdesc: dict[str, Any] | None) -> bytes:
        out = bytes([SectionType.EOF])
        if vmdesc is not None:
            text = json.dumps(vmdesc, separators=(", ", ": ")).encode()
            out += S.VmDescriptionHead.build({"length": len(text)}) + text
        return out

    def page_record(self, name: str | None, page: int, data: bytes | memoryview | None) -> bytes:
        """A classic-stream PAGE record (``data``) or ZERO record (None); ``name`` None = CONTINUE."""
        flags = RamFlag.PAGE if data is not None else RamFlag.ZERO
        if name is None:
            flags |= RamFlag.CONTINUE
        head = S.RamPageRecordHead.build(
            {"word": page * self.page_size | int(flags), "idstr": name}, with_idstr=name is not None
        )
        return head + (bytes(data) if data is not None else S.ZeroFill.build(0))


def configuration_vmdesc(machine: str, capabilities: list[str]) -> dict[str, Any]:
    """The JSON description QEMU gives of its configuration section."""
    desc: dict[str, Any] = {
        "vmsd_name": "configuration",
        "version": 1,
        "fields": [
            {"name": "len", "type": "uint32", "size": 4},
            {"name": "name", "type": "buffer", "size": len(machine.encode())},
        ],
    }
    if capabilities:
        desc["subsections"] = [
            {
                "vmsd_name": SUB_CAPABILITIES,
                "version": 1,
                "fields": [
                    {"name": "caps_count", "type": "uint32", "size": 4},
                    {
                        "name": "capabilities",
                        "type": "capability",
                        "size": sum(1 + len(c.encode()) for c in capabilities),
                    },
                ],
            }
        ]
    return desc


@dataclass(frozen=True)
class DeviceState:
    """Non-RAM sections taken unchanged from an existing snapshot."""

    sections: bytes  # headers, payloads and footers, in stream order
    descriptions: list[dict[str, Any]]  # their entries of the VM description
    ram_section_id: int
    machine_type: str | None
    footers: bool

    @classmethod
    def from_snapshot(cls, snap: Any) -> "DeviceState":
        """Every section of ``snap`` that is not RAM, a command or EOF."""
        parts = []
        for sec in snap.sections:
            if sec.kind in ("command", "eof") or sec.idstr == RAM_IDSTR:
                continue
            parts.append(snap.read_bytes(sec.offset, sec.end - sec.offset))
        devices = (snap.vmdesc or {}).get("devices", [])
        ram = next(s for s in snap.sections if s.idstr == RAM_IDSTR)
        return cls(b"".join(parts), list(devices), ram.section_id, snap.machine_type, snap.section_footers)


class StreamComposer:
    """The parts of a QEVM v3 stream in QEMU's order, for the writer, convert, the benches
    and the tests:

    - ``head()``: QEVM header, configuration (machine type, capabilities);
    - ``ram_start()``: the RAM START section: MEM_SIZE, the block list (mapped-ram: each
      entry followed by its header, then bitmap and pages at their places), EOS;
    - RAM PART sections: ``round_end()`` (mapped-ram: EOS only), or ``part_start()``,
      ``page_record()``s and ``section_end()`` (classic);
    - ``tail()``: [SWITCHOVER_START], the RAM END section, the device sections, EOF and the
      JSON description.

    ``devices`` carries over another snapshot's device sections, machine type, RAM section
    id and footer use; without it the stream has no devices and ``machine`` or
    DEFAULT_MACHINE.
    """

    def __init__(
        self,
        page_size: int,
        *,
        capabilities: Sequence[str] = (),
        machine: str | None = None,
        devices: DeviceState | None = None,
    ) -> None:
        self.page_size = page_size
        self.capabilities = list(capabilities)
        self.devices = devices
        self.machine = machine or (devices.machine_type if devices else None) or DEFAULT_MACHINE
        self.ram_id = devices.ram_section_id if devices else DEFAULT_RAM_SECTION_ID
        self.encoder = StreamEncoder(page_size, footers=devices.footers if devices else True)

    def head(self) -> bytes:
        return self.encoder.header() + self.encoder.configuration(self.machine, self.capabilities)

    def ram_start(
        self,
        offset: int,
        blocks: Sequence[tuple[str, int]],
        layout: BitmapLayout | None = None,
        alignment: int = MAPPED_RAM_ALIGNMENT,
    ) -> tuple[list[Piece], list[BlockPlace | None], int]:
        """The RAM START section from ``offset`` for ``blocks`` (name, used_length): the
        pieces to write, each block's place (mapped-ram, given the bitmap ``layout``; else
        None) and the offset after the section."""
        enc = self.encoder
        start = enc.ram_start(self.ram_id) + enc.ram_word(sum(n for _, n in blocks), RamFlag.MEM_SIZE)
        pieces = [(offset, start)]
        places: list[BlockPlace | None] = []
        pos = offset + len(start)
        for name, used_length in blocks:
            place = None if layout is None else place_block(name, used_length, self.page_size, pos, layout, alignment)
            entry = enc.block_entry(name, used_length, place)
            pieces.append((pos, entry))
            places.append(place)
            pos = place.resume_offset if place is not None else pos + len(entry)
        end = self.section_end()
        pieces.append((pos, end))
        return pieces, places, pos + len(end)

    def round_end(self) -> bytes:
        """A mapped-ram PART section: EOS only (the pages are at their places)."""
        return self.encoder.ram_eos_section(SectionType.SECTION_PART, self.ram_id)

    def part_start(self) -> bytes:
        return self.encoder.section_part(SectionType.SECTION_PART, self.ram_id)

    def page_record(self, name: str | None, page: int, data: bytes | memoryview | None) -> bytes:
        return self.encoder.page_record(name, page, data)

    def section_end(self) -> bytes:
        """EOS and the footer: the end of a RAM section's payload."""
        return self.encoder.ram_word(0, RamFlag.EOS) + self.encoder.footer(self.ram_id)

    def tail(self, switchover_start: bool = True) -> bytes:
        enc = self.encoder
        out = enc.command(VmCommand.SWITCHOVER_START) if switchover_start else b""
        out += enc.ram_eos_section(SectionType.SECTION_END, self.ram_id)
        out += self.devices.sections if self.devices else b""
        return out + enc.eof(
            {
                "configuration": configuration_vmdesc(self.machine, self.capabilities),
                "page_size": self.page_size,
                "devices": self.devices.descriptions if self.devices else [],
            }
        )
