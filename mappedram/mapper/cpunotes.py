"""The vCPUs of an x86 snapshot as ELF core notes, laid out as QEMU's dump-guest-memory
lays them out (target/i386/arch_dump.c, QEMU 10).

Per vCPU, in vCPU order: a "CORE" NT_PRSTATUS note; then per vCPU a "QEMU" note (type 0)
holding QEMUCPUState. Like QEMU, the first vCPU decides the layout: in long mode (EFER.LMA,
hflags bit 14) the x86_64 ``elf_prstatus`` and machine EM_X86_64, otherwise the i386
``elf_prstatus`` and EM_386 (QEMU still writes an ELF64 file for pc and q35, whose BIOS
ends at 4 GiB). Other targets have no notes: their cores carry memory only.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from ..errors import FormatError
from .devstate import decode_section

EM_386, EM_X86_64 = 3, 62
NT_PRSTATUS = 1
QEMU_NOTE_TYPE = 0
HF_LMA = 1 << 14
QEMUCPUSTATE_VERSION = 1

# QEMU's env.regs order (R_EAX, R_ECX, R_EDX, R_EBX, R_ESP, R_EBP, R_ESI, R_EDI, r8..r15)
# and env.segs order (R_ES, R_CS, R_SS, R_DS, R_FS, R_GS).
RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI = range(8)
ES, CS, SS, DS, FS, GS = range(6)

_NHDR = struct.Struct("<III")  # namesz, descsz, type (the same for Elf32 and Elf64)
# x86_64 elf_prstatus: 32 bytes, pr_pid, 76 bytes, user_regs_struct (27 x u64), 8 bytes
_PRSTATUS_64 = struct.Struct("<32xI76x27Q8x")
# i386 elf_prstatus: 24 bytes, pr_pid, 44 bytes, user_regs_struct (68 bytes), 4 bytes
_PRSTATUS_32 = struct.Struct("<24xI44x7I8H2IHHIIHH4x")
# QEMUCPUState: version, size, 18 x u64 (rax rbx rcx rdx rsi rdi rsp rbp r8-r15 rip rflags),
# 10 segments (selector, limit, flags, pad, base), cr[5], kernel_gs_base
_SEGMENT = struct.Struct("<IIIIQ")
_QEMU_HEAD = struct.Struct("<II18Q")
_QEMU_TAIL = struct.Struct("<5QQ")
QEMUCPUSTATE_SIZE = _QEMU_HEAD.size + 10 * _SEGMENT.size + _QEMU_TAIL.size


@dataclass(frozen=True)
class Segment:
    selector: int
    base: int
    limit: int
    flags: int


@dataclass(frozen=True)
class X86Cpu:
    """The registers of one vCPU, from its decoded "cpu" section."""

    index: int  # the section's instance id: QEMU's cpu_index
    regs: tuple[int, ...]  # 16 (x86_64 target) or 8 (i386 target), in env.regs order
    rip: int
    rflags: int
    hflags: int
    segs: tuple[Segment, ...]  # ES CS SS DS FS GS
    ldt: Segment
    tr: Segment
    gdt: Segment
    idt: Segment
    cr: tuple[int, int, int, int, int]  # cr[1] is not migrated: 0, as in QEMU
    kernel_gs_base: int


@dataclass(frozen=True)
class CoreNotes:
    """The PT_NOTE payload and the e_machine that goes with it."""

    machine: int
    data: bytes


def _int(fields: dict[str, Any], name: str) -> int:
    value = fields[name]
    if type(value) is not int:
        raise TypeError(name)
    return value & ((1 << 64) - 1)


def _segment(value: Any) -> Segment:
    if not isinstance(value, dict):
        raise TypeError("segment")
    return Segment(*(_int(value, k) for k in ("selector", "base", "limit", "flags")))


def x86_cpus(snap: Any) -> list[X86Cpu]:
    """Every x86 vCPU of the snapshot (empty for other targets or without a description).
    Raises FormatError when an x86 cpu section does not decode."""
    cpus = []
    for section in snap.devices:
        if section.idstr != "cpu":
            continue
        state = decode_section(snap, section)
        if state.vmsd_name != "cpu" or "env.eip" not in state.fields:
            continue
        f = state.fields
        try:
            regs = tuple(v & ((1 << 64) - 1) for v in f["env.regs"] if type(v) is int)
            segs = tuple(_segment(s) for s in f["env.segs"])
            if len(regs) not in (8, 16) or len(regs) != len(f["env.regs"]) or len(segs) != 6:
                raise TypeError("env.regs or env.segs")
            cpu = X86Cpu(
                state.instance_id,
                regs,
                _int(f, "env.eip"),
                _int(f, "env.eflags"),
                _int(f, "env.hflags"),
                segs,
                *(_segment(f[f"env.{name}"]) for name in ("ldt", "tr", "gdt", "idt")),
                cr=(_int(f, "env.cr[0]"), 0, _int(f, "env.cr[2]"), _int(f, "env.cr[3]"), _int(f, "env.cr[4]")),
                kernel_gs_base=_int(f, "env.kernelgsbase") if "env.kernelgsbase" in f else 0,
            )
        except (KeyError, TypeError) as err:
            found = str(state.problems[0]) if state.problems else f"no usable {err}"
            raise FormatError(state.payload_offset, "the registers of an x86 cpu section", found) from None
        cpus.append(cpu)
    return sorted(cpus, key=lambda c: c.index)


def _note(name: bytes, kind: int, desc: bytes) -> bytes:
    name += b"\0"
    return _NHDR.pack(len(name), len(desc), kind) + _pad4(name) + _pad4(desc)


def _pad4(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


def prstatus_x86_64(cpu: X86Cpu) -> bytes:
    r = cpu.regs + (0,) * (16 - len(cpu.regs))
    s = cpu.segs
    return _PRSTATUS_64.pack(
        cpu.index + 1,  # pr_pid: QEMU numbers vCPUs from 1
        *(r[15], r[14], r[13], r[12], r[RBP], r[RBX], r[11], r[10], r[9], r[8]),
        *(r[RAX], r[RCX], r[RDX], r[RSI], r[RDI], 0),  # orig_rax
        *(cpu.rip, s[CS].selector, cpu.rflags, r[RSP], s[SS].selector, s[FS].base, s[GS].base),
        *(s[DS].selector, s[ES].selector, s[FS].selector, s[GS].selector),
    )


def prstatus_i386(cpu: X86Cpu) -> bytes:
    low = [v & 0xFFFFFFFF for v in cpu.regs[:8]]
    s = cpu.segs
    return _PRSTATUS_32.pack(
        cpu.index + 1,
        *(low[RBX], low[RCX], low[RDX], low[RSI], low[RDI], low[RBP], low[RAX]),
        *(s[DS].selector, 0, s[ES].selector, 0, s[FS].selector, 0, s[GS].selector, 0),
        0,  # orig_eax
        cpu.rip & 0xFFFFFFFF,
        *(s[CS].selector, 0, cpu.rflags & 0xFFFFFFFF, low[RSP], s[SS].selector, 0),
    )


def qemu_cpu_state(cpu: X86Cpu) -> bytes:
    r = cpu.regs + (0,) * (16 - len(cpu.regs))
    out = _QEMU_HEAD.pack(
        QEMUCPUSTATE_VERSION,
        QEMUCPUSTATE_SIZE,
        *(r[RAX], r[RBX], r[RCX], r[RDX], r[RSI], r[RDI], r[RSP], r[RBP]),
        *r[8:16],
        cpu.rip,
        cpu.rflags,
    )
    s = cpu.segs
    for seg in (s[CS], s[DS], s[ES], s[FS], s[GS], s[SS], cpu.ldt, cpu.tr, cpu.gdt, cpu.idt):
        out += _SEGMENT.pack(seg.selector & 0xFFFFFFFF, seg.limit & 0xFFFFFFFF, seg.flags & 0xFFFFFFFF, 0, seg.base)
    return out + _QEMU_TAIL.pack(*cpu.cr, cpu.kernel_gs_base)


def cpu_notes(snap: Any) -> CoreNotes | None:
    """The PT_NOTE payload for an ELF core of this snapshot, or None (not x86, or no
    VM description to decode the CPUs with)."""
    if snap.vmdesc is None:
        return None
    cpus = x86_cpus(snap)
    return notes_for(cpus) if cpus else None


def notes_for(cpus: list[X86Cpu]) -> CoreNotes:
    """The notes of these vCPUs (the first one's mode decides the layout)."""
    long_mode = bool(cpus[0].hflags & HF_LMA)
    prstatus = prstatus_x86_64 if long_mode else prstatus_i386
    data = b"".join(_note(b"CORE", NT_PRSTATUS, prstatus(cpu)) for cpu in cpus)
    data += b"".join(_note(b"QEMU", QEMU_NOTE_TYPE, qemu_cpu_state(cpu)) for cpu in cpus)
    return CoreNotes(EM_X86_64 if long_mode else EM_386, data)
