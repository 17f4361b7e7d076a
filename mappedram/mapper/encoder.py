"""Bytes of the main stream, built with the schemas.

The writer decides what to write and when; this module only says how each element
looks (where a block's bitmap and pages go is formats/layout.py).
"""

from __future__ import annotations

import json
from typing import Any, Iterable

from ..formats import structs as S
from ..formats.constants import (
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
from ..formats.layout import BlockPlace


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
