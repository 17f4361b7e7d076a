"""Every on-disk structure of a QEMU snapshot file, declared once with construct.

The stream is big-endian throughout (qemu_put_be*); the libvirt header and the
mapped-ram bitmap are in the writing host's order and live apart (``libvirt_header``
here, bitmap.py for the bitmap). Each declaration names the FORMAT.md section and the
QEMU function it comes from. These schemas parse and build; where data sits at an
absolute offset, the reader seeks there (the schemas hold no I/O policy).
"""

from __future__ import annotations

from construct import (
    Array,
    Bytes,
    Const,
    Default,
    Enum,
    If,
    Int8ub,
    Int16ub,
    Int32ub,
    Int32ul,
    Int64ub,
    PascalString,
    Rebuild,
    Struct,
    Switch,
    len_,
    this,
)

from .constants import (
    LIBVIRT_MAGIC_DONE,
    QEVM_MAGIC,
    SUB_CAPABILITIES,
    SUB_TARGET_PAGE_BITS,
    SUB_UUID,
    LibvirtFormat,
    SectionType,
    VmCommand,
    enum_mapping,
)

Name8 = PascalString(Int8ub, "utf8")  # u8 len + bytes, no NUL (idstr, capability, subsection name)
Name32 = PascalString(Int32ub, "utf8")  # be32 len + bytes (the configuration's machine name)


# §7 libvirt virQEMUSaveHeader, 92 bytes in the writing host's order.
def libvirt_header(little_endian: bool = True) -> Struct:
    u32 = Int32ul if little_endian else Int32ub
    return Struct(
        "magic" / Default(Bytes(16), LIBVIRT_MAGIC_DONE),
        "version" / Default(u32, 2),
        "data_len" / u32,
        "was_running" / Default(u32, 0),
        "format" / Default(Enum(u32, **enum_mapping(LibvirtFormat)), "sparse"),
        "cookie_offset" / Default(u32, 0),
        "unused" / Default(Array(14, u32), [0] * 14),
    )


LibvirtHeaderLE = libvirt_header(True)
LibvirtHeaderBE = libvirt_header(False)
LIBVIRT_HEADER_SIZE = LibvirtHeaderLE.sizeof()  # 92

# §1.2 qemu_savevm_state_header
QevmHeader = Struct(
    "magic" / Const(QEVM_MAGIC),
    "version" / Int32ub,
)

# §1.3 vmstate_configuration: u8 0x07, be32 len, name; then 0x05-subsections.
ConfigurationHead = Struct(
    "element" / Const(SectionType.CONFIGURATION.value, Int8ub),
    "machine" / Name32,
)

# vmstate_subsection_save: u8 0x05, u8 namelen, name, be32 version_id, fields.
SubsectionHead = Struct(
    "marker" / Const(SectionType.SUBSECTION.value, Int8ub),
    "name" / Name8,
    "version_id" / Int32ub,
)

TargetPageBits = Struct("bits" / Int32ub)
CapabilityList = Struct(
    "count" / Rebuild(Int32ub, len_(this.names)),
    "names" / Array(this.count, Name8),  # put_capability(): u8 len + name
)
VmUuid = Struct("uuid" / Bytes(16))

CONFIG_SUBSECTION_BODIES = {
    SUB_TARGET_PAGE_BITS: TargetPageBits,
    SUB_CAPABILITIES: CapabilityList,
    SUB_UUID: VmUuid,
}

ConfigSubsection = Struct(
    "head" / SubsectionHead,
    "body" / Switch(this.head.name, CONFIG_SUBSECTION_BODIES),
)

# §1.4 save_section_header / save_section_footer
SectionHeaderFull = Struct(  # START and FULL
    "section_id" / Int32ub,
    "idstr" / Name8,
    "instance_id" / Int32ub,
    "version_id" / Int32ub,
)
SectionHeaderPart = Struct("section_id" / Int32ub)  # PART and END
SectionFooter = Struct(
    "marker" / Const(SectionType.SECTION_FOOTER.value, Int8ub),
    "section_id" / Int32ub,
)

# §1.5 qemu_savevm_command_send: be16 cmd, be16 len, data
CommandBody = Struct(
    "cmd" / Enum(Int16ub, **enum_mapping(VmCommand)),
    "length" / Rebuild(Int16ub, len_(this.data)),
    "data" / Bytes(this.length),
)

# §1.6 after EOF: u8 0x06, be32 json_len, json (the JSON itself is read lazily)
VmDescriptionHead = Struct(
    "element" / Const(SectionType.VMDESCRIPTION.value, Int8ub),
    "length" / Int32ub,
)

# §2 RAM section payload: be64 words whose low bits are RAM_SAVE_FLAG_*.
RamWord = Int64ub
ZeroFill = Int8ub  # the fill byte behind a ZERO record (must be 0)

# §3.2 MappedRamHeader, 28 bytes packed.
MappedRamHeader = Struct(
    "version" / Int32ub,
    "page_size" / Int64ub,
    "bitmap_offset" / Int64ub,
    "pages_offset" / Int64ub,
)
MAPPED_RAM_HEADER_SIZE = MappedRamHeader.sizeof()

# §2.2 one entry of the block list in the RAM START payload (ram_save_setup).
# Build and parse with mapped_ram=bool and ignore_shared=bool.
RamBlockEntry = Struct(
    "idstr" / Name8,
    "used_length" / Int64ub,
    "addr" / If(this._params.ignore_shared, Int64ub),  # block->mr->addr under x-ignore-shared
    "mapped_ram" / If(this._params.mapped_ram, MappedRamHeader),
)

# §2.1 the head of a legacy page record: word, then the block name unless CONTINUE.
RamPageRecordHead = Struct(
    "word" / RamWord,
    "idstr" / If(this._params.with_idstr, Name8),
)
