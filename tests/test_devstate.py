"""Device sections decoded with the VM description, and the vCPUs as ELF core notes: the
fixtures, hostile descriptions, and QEMU itself (`info registers`, `dump-guest-memory`) and
gdb as the oracles."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from craft import truncate_copy

import mappedram
from mappedram.cli import main
from mappedram.mapper.cpunotes import HF_LMA, cpu_notes, notes_for, x86_cpus
from mappedram.mapper.devstate import all_device_states, configuration_state, decode_section, device_state

# What tests/guest/boot.S sets up: a flat GDT of three entries, CS 0x08, data 0x10, the stack
# at 0x7c00, and EDI walking the pages of [1 MiB, RAM - 1 MiB).
GDT_ENTRIES = (0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF)
R_ESP, R_EDI = 4, 7


def _cpu(snap):
    return device_state(snap, "cpu", 0)


def test_every_fixture_decodes_without_problems(fixture_path):
    with mappedram.open(fixture_path) as snap:
        states = all_device_states(snap)
        assert [(s.idstr, s.instance_id) for s in states] == [(s.idstr, s.instance_id) for s in snap.devices]
        assert [str(p) for s in states for p in s.problems] == []
        assert len(states) == len(snap.vmdesc["devices"])


def test_configuration_section(fixture_path):
    with mappedram.open(fixture_path) as snap:
        config = configuration_state(snap)
        machine, capabilities = snap.machine_type, snap.capabilities
        hostile = copy.deepcopy(snap.vmdesc)
        hostile["configuration"]["fields"][1]["size"] += 1
        damaged = configuration_state(_Redescribed(snap, hostile))
    assert config.problems == []
    assert config.fields["name"] == machine.encode() and config.fields["len"] == len(machine)
    sub = config.fields.get("configuration/capabilities", {"caps_count": 0, "capabilities": []})
    names = sub["capabilities"] if isinstance(sub["capabilities"], list) else [sub["capabilities"]]
    assert sub["caps_count"] == len(names) and tuple(names) == capabilities
    end = config.payload_offset + config.payload_length
    assert damaged.problems and all(config.payload_offset < p.offset <= end for p in damaged.problems)
    assert damaged.fields["len"] == len(machine)


def test_cpu_section_matches_the_guest(fixture_path, manifest):
    """The decoded registers agree with what boot.S did and with the GDT in guest RAM."""
    if manifest["target"] != "x86_64":
        pytest.skip(f"the guest of {manifest['target']} fixtures is not boot.S")
    with mappedram.open(fixture_path) as snap:
        cpu = _cpu(snap)
        ram = snap.block("pc.ram")
        gdt = cpu["env.gdt"]
        assert gdt["limit"] == 8 * len(GDT_ENTRIES) - 1
        page, within = divmod(gdt["base"], ram.page_size)
        table = bytes(ram.page(page)[within : within + 8 * len(GDT_ENTRIES)])
    entries = struct.unpack("<3Q", table)
    accessed = 1 << 40  # the CPU sets it in the descriptor when it loads the segment
    assert [e & ~accessed for e in entries] == list(GDT_ENTRIES)
    segs = cpu["env.segs"]
    assert [s["selector"] for s in segs[:4]] == [0x10, 0x08, 0x10, 0x10]
    for seg in segs[:4]:  # QEMU keeps the descriptor's high dword as the flags
        assert seg["flags"] == (entries[seg["selector"] >> 3] >> 32) & 0x00FFFF00
    assert all(s["base"] == 0 and s["limit"] == 0xFFFFFFFF for s in segs[:4])
    assert cpu["env.cr[0]"] & 1  # protected mode
    assert cpu["env.regs"][R_ESP] == 0x7C00
    edi = cpu["env.regs"][R_EDI]
    assert 0x100000 <= edi < 63 << 20 and edi % 0x1000 == 0
    assert 0x7C00 <= cpu["env.eip"] < 0x7E00
    assert isinstance(cpu["env.a20_mask"], int) and cpu["env.a20_mask"] == -1  # int32, signed
    assert len(cpu["env.xmm_regs[0]"]) == 16 and set(cpu["env.xmm_regs[0]"][0]) == {"_q_ZMMReg[0]", "_q_ZMMReg[1]"}
    assert set(cpu) >= {"cpu/poll_control_msr", "cpu/msr_smi_count"}  # the subsections


@pytest.mark.parametrize(
    ("idstr", "vendor_device"),
    [
        ("0000:00:00.0/I440FX", (0x8086, 0x1237)),
        ("0000:00:01.1/ide", (0x8086, 0x7010)),
        ("0000:00:02.0/vga", (0x1234, 0x1111)),
    ],
)
def test_pci_config_space(paused_mr, idstr, vendor_device):
    with mappedram.open(paused_mr) as snap:
        state = device_state(snap, idstr)
    pci = state.get("parent_obj") or state["dev"]
    config = pci["config[0]"]
    assert isinstance(config, bytes) and len(config) == 256
    assert struct.unpack_from("<HH", config) == vendor_device
    assert pci["version_id"] == 2  # "int32 le": less-or-equal on load, big-endian like the rest
    assert pci["irq_state"] == [0, 0, 0, 0]


def test_old_style_section_is_one_buffer(paused_mr):
    with mappedram.open(paused_mr) as snap:
        section = next(s for s in snap.devices if s.idstr == "slirp")
        slirp = device_state(snap, "slirp")
    assert list(slirp) == ["data"] and len(slirp["data"]) == section.payload_length


def test_unknown_device_is_a_key_error(paused_mr):
    with mappedram.open(paused_mr) as snap, pytest.raises(KeyError, match="no device section 'cpu' instance 7"):
        device_state(snap, "cpu", 7)


# -- every field kind, on a payload encoded here -------------------------------------------
def _device(fields, subsections=()):
    desc = {"name": "dev", "instance_id": 0, "vmsd_name": "dev", "version": 1, "fields": fields}
    if subsections:
        desc["subsections"] = list(subsections)
    return desc


class _Synthetic:
    """The decoder's three inputs (devices, vmdesc, read_bytes) for a hand-encoded payload."""

    BASE = 0x1000

    def __init__(self, desc, payload):
        self.vmdesc = {"devices": [desc]}
        self.payload = payload
        self.devices = [
            SimpleNamespace(
                idstr="dev",
                instance_id=0,
                version_id=1,
                section_id=3,
                offset=self.BASE - 20,
                payload_offset=self.BASE,
                payload_length=len(payload),
            )
        ]

    def read_bytes(self, offset, length):
        return self.payload[offset - self.BASE : offset - self.BASE + length]


def _decode(fields, payload, subsections=()):
    snap = _Synthetic(_device(fields, subsections), payload)
    return decode_section(snap, snap.devices[0])


SEGMENT = {"vmsd_name": "seg", "version": 1, "fields": [{"name": "sel", "type": "uint16", "size": 2}]}


def test_every_field_kind():
    fields = [
        {"name": "i8", "type": "int8", "size": 1},
        {"name": "u16", "type": "uint16", "size": 2},
        {"name": "le", "type": "int32 le", "size": 4},
        {"name": "eq", "type": "uint32 equal", "size": 4},
        {"name": "i64", "type": "int64", "size": 8},
        {"name": "flag", "type": "bool", "size": 1},
        {"name": "buf", "type": "buffer", "size": 3},
        {"name": "unused", "type": "unused_buffer", "size": 2},
        {"name": "arr", "array_len": 3, "type": "uint8", "size": 1},
        {"name": "idx", "index": 0, "type": "uint16", "size": 2},
        {"name": "idx", "index": 1, "type": "uint16", "size": 2},
        {"name": "segs", "array_len": 2, "type": "struct", "struct": SEGMENT, "size": 2},
        {"name": "ptrs", "type": "struct", "struct": SEGMENT, "size": 2},
        {"name": "ptrs", "type": "nullptr", "size": 1},
        {
            "name": "tmp",
            "type": "tmp",
            "vmsd_name": "t",
            "version": 0,
            "fields": [{"name": "x", "type": "int16", "size": 2}],
            "size": 2,
        },
        {"name": "cap", "type": "capability", "size": 11},
        {"name": "timer", "type": "timer", "size": 8},
        {"name": "f", "type": "float64", "size": 8},
        {"name": "mystery", "type": "qtailq", "size": 2},
    ]
    subsection = {"vmsd_name": "dev/extra", "version": 2, "fields": [{"name": "y", "type": "uint32", "size": 4}]}
    payload = (
        struct.pack(">bH", -2, 0xBEEF)
        + struct.pack(">i", -3)
        + struct.pack(">Iq?", 7, -(1 << 40), True)
        + b"abc\0\0"
        + bytes([1, 2, 3])
        + struct.pack(">5H", 10, 11, 0x20, 0x21, 0x22)
        + b"0"
        + struct.pack(">h", -9)
        + b"\x0amapped-ram"
        + struct.pack(">q", -1)
        + struct.pack(">d", 1.5)
        + b"\x01\x00"
        + b"\x05\x09dev/extra"
        + struct.pack(">II", 2, 99)
    )
    state = _decode(fields, payload, [subsection])
    assert state.problems == []
    assert state.fields == {
        "i8": -2,
        "u16": 0xBEEF,
        "le": -3,
        "eq": 7,
        "i64": -(1 << 40),
        "flag": True,
        "buf": b"abc",
        "unused": b"\0\0",
        "arr": [1, 2, 3],
        "idx": [10, 11],
        "segs": [{"sel": 0x20}, {"sel": 0x21}],
        "ptrs": [{"sel": 0x22}, None],
        "tmp": {"x": -9},
        "cap": "mapped-ram",
        "timer": -1,
        "f": 1.5,
        "mystery": b"\x01\x00",
        "dev/extra": {"y": 99},
    }
    assert json.loads(json.dumps(state.describe()))["fields"]["buf"] == "616263"


@pytest.mark.parametrize(
    ("fields", "payload", "where", "message"),
    [
        (
            [{"name": "a", "type": "uint32", "size": 3}],
            b"\0\0\0",
            0,
            "expected 4 bytes for uint32 dev/a, found a size of 3",
        ),
        (
            [{"name": "a", "type": "nullptr", "size": 1}],
            b"\0",
            0,
            "expected the null-pointer marker 0x30 for dev/a, found 0x00",
        ),
        (
            [{"name": "a", "type": "capability", "size": 4}],
            b"\x07abc",
            0,
            "capability name of 3 bytes for dev/a, found length byte 7",
        ),
        (
            [{"name": "a", "type": "struct", "size": 2}],
            b"\0\0",
            0,
            "expected the nested description of dev/a, found none",
        ),
        ([{"name": "a", "type": 5, "size": 2}], b"\0\0", 0, "expected a type name for dev/a"),
        (
            [{"name": "a", "type": "uint8", "size": 1}, {"name": "b", "type": "buffer", "size": 9}],
            b"\0" * 4,
            1,
            "expected 1 x 9 bytes for dev/b, found 3 bytes left",
        ),
        (
            [{"name": "a", "type": "uint8", "size": 1, "array_len": 10**12}],
            b"\0",
            0,
            "expected 1000000000000 x 1 bytes",
        ),
        (
            [{"name": "a", "type": "struct", "size": 0, "array_len": 10**9, "struct": {"fields": []}}],
            b"",
            0,
            "expected 1000000000 x 0 bytes",
        ),
        ([{"name": "a", "type": "uint8", "size": -1}], b"\0", 0, "expected a field with name and size"),
        (["not a field"], b"\0", 0, "expected a field with name and size"),
        (
            [
                {
                    "name": "a",
                    "type": "struct",
                    "size": 2,
                    "struct": {"fields": [{"name": "b", "type": "uint8", "size": 1}]},
                }
            ],
            b"\0\0",
            1,
            "expected dev/a to end after 2 bytes, found 1 bytes described",
        ),
        (
            [{"name": "a", "type": "uint8", "size": 1}],
            b"\0\0",
            1,
            "expected the end of dev's state, found 1 more bytes",
        ),
    ],
)
def test_field_that_does_not_fit_is_a_problem(fields, payload, where, message):
    state = _decode(fields, payload)
    assert [p.offset for p in state.problems] == [_Synthetic.BASE + where]
    assert message in state.problems[0].text
    assert f"offset {_Synthetic.BASE + where:#x}: " in json.dumps(state.fields)


def test_a_bad_field_does_not_lose_the_next():
    fields = [
        {"name": "a", "type": "uint64", "size": 3},
        {"name": "b", "type": "uint16", "size": 2},
    ]
    state = _decode(fields, b"\1\2\3\x12\x34")
    assert state.fields["b"] == 0x1234 and "_problem" in state.fields["a"]


def test_deep_nesting_is_a_problem_not_a_crash():
    inner: dict = {"fields": [{"name": "x", "type": "uint8", "size": 1}]}
    for _ in range(200):
        inner = {"fields": [{"name": "s", "type": "struct", "struct": inner, "size": 1}]}
    state = _decode(inner["fields"], b"\7")
    assert any("nested structs" in p.text for p in state.problems)


def test_subsection_markers():
    sub = {"vmsd_name": "dev/sub", "version": 1, "fields": [{"name": "y", "type": "uint8", "size": 1}]}
    field = [{"name": "x", "type": "uint8", "size": 1}]
    good = b"\1" + b"\x05\x07dev/sub" + struct.pack(">I", 1) + b"\2"
    assert _decode(field, good, [sub]).fields == {"x": 1, "dev/sub": {"y": 2}}
    wrong_marker = b"\1\x7e" + good[2:]
    state = _decode(field, wrong_marker, [sub])
    assert state.problems[0].offset == _Synthetic.BASE + 1 and "found byte 0x7e" in state.problems[0].text
    other = {**sub, "vmsd_name": "dev/suc"}
    state = _decode(field, good, [other])
    assert (
        "expected subsection 'dev/suc'" in state.problems[0].text
        and "found subsection 'dev/sub'" in state.problems[0].text
    )
    state = _decode(field, good, [{**sub, "version": 3}])
    assert [str(p) for p in state.problems] == [
        f"offset {_Synthetic.BASE + 10:#x}: expected version 3 of subsection 'dev/sub' (the description's), found 1"
    ]
    assert state.fields["dev/sub"]["y"] == 2
    state = _decode(field, b"\1\x05", [sub])
    assert "header bytes), found 1 left" in state.problems[0].text


# -- hostile descriptions built from a fixture's real one -----------------------------------
class _Redescribed:
    """A real snapshot read with a changed VM description."""

    def __init__(self, snap, vmdesc):
        self.vmdesc, self.devices, self.read_bytes = vmdesc, snap.devices, snap.read_bytes
        self.stream_start, self.sections, self.size = snap.stream_start, snap.sections, snap.size


def _cpu_desc(vmdesc):
    return next(d for d in vmdesc["devices"] if d["name"] == "cpu")


def test_hostile_changes_to_the_real_cpu_description(paused_mr):
    with mappedram.open(paused_mr) as snap:
        real = _cpu(snap)
        cpu_section = next(s for s in snap.devices if s.idstr == "cpu")
        base = cpu_section.payload_offset

        wrong_type = copy.deepcopy(snap.vmdesc)
        fields = _cpu_desc(wrong_type)["fields"]
        next(f for f in fields if f["name"] == "env.eflags")["type"] = "bool"  # size 8 stays
        state = decode_section(_Redescribed(snap, wrong_type), cpu_section)
        assert [str(p) for p in state.problems] == [
            f"offset {base + 17 * 8:#x}: expected 1 bytes for bool cpu/env.eflags, found a size of 8"
        ]
        assert state.fields["env.hflags"] == real["env.hflags"]  # decoding went on after it

        renamed = copy.deepcopy(snap.vmdesc)
        _cpu_desc(renamed)["subsections"][0]["vmsd_name"] = "cpu/not_sent"
        state = decode_section(_Redescribed(snap, renamed), cpu_section)
        assert "expected subsection 'cpu/not_sent'" in state.problems[0].text
        assert "found subsection 'cpu/poll_control_msr'" in state.problems[0].text
        assert state.fields["env.eip"] == real["env.eip"]

        extra = copy.deepcopy(snap.vmdesc)
        _cpu_desc(extra)["subsections"].append({"vmsd_name": "cpu/more", "fields": []})
        state = decode_section(_Redescribed(snap, extra), cpu_section)
        end = base + cpu_section.payload_length
        assert [p.offset for p in state.problems] == [end]

        grown = copy.deepcopy(snap.vmdesc)
        _cpu_desc(grown)["fields"][0]["array_len"] = 4000
        state = decode_section(_Redescribed(snap, grown), cpu_section)
        assert state.problems[0].offset == base and "found 1882 bytes left" in state.problems[0].text

        state = decode_section(_Redescribed(snap, {"devices": "nope"}), cpu_section)
        assert [p.text for p in state.problems] == ["expected a VM description with a device list, found none"]
        state = decode_section(_Redescribed(snap, {"devices": [{"name": "cpu", "instance_id": 1}]}), cpu_section)
        assert [p.text for p in state.problems] == ["expected 'cpu' instance 0 in the VM description, found none"]


def test_every_single_field_type_swap_is_handled(paused_mr):
    """Each of the first fields of every device given each other type: problems inside the
    section, the fields before it unchanged, never an exception."""
    kinds = ["bool", "nullptr", "capability", "int16", "uint64", "int32 le", "struct", "tmp", "timer", "float64", "x"]
    with mappedram.open(paused_mr) as snap:
        vmdesc = copy.deepcopy(snap.vmdesc)
        hostile = _Redescribed(snap, vmdesc)
        for section in snap.devices:
            real = device_state(snap, section.idstr, section.instance_id)
            dev = next(
                d for d in vmdesc["devices"] if (d["name"], d["instance_id"]) == (section.idstr, section.instance_id)
            )
            for i, fdesc in enumerate(dev["fields"][:4]):
                original = fdesc["type"]
                for kind in kinds:
                    fdesc["type"] = kind
                    state = decode_section(hostile, section)
                    end = section.payload_offset + section.payload_length
                    assert all(section.payload_offset <= p.offset <= end for p in state.problems), kind
                    before = [f["name"] for f in dev["fields"][:i] if f["name"] != fdesc["name"]]
                    assert [state.fields[n] for n in before] == [real[n] for n in before]
                fdesc["type"] = original


def _nodes(value, found):
    if isinstance(value, (dict, list)):
        found.append(value)
        for item in value.values() if isinstance(value, dict) else value:
            _nodes(item, found)
    return found


def test_randomly_damaged_descriptions(paused_mr):
    """Keys of the real description set to wrong values at random (seeded): every section
    decodes to problems inside itself and JSON, never an exception."""
    rng = np.random.default_rng(15)
    values = [None, -1, 0, 1, 2**70, "x", [], {}, 1.5, True, "struct", "nullptr", "capability", 10**9]
    keys = ["name", "type", "size", "array_len", "index", "struct", "fields", "subsections", "vmsd_name", "version"]
    with mappedram.open(paused_mr) as snap:
        spans = {(s.idstr, s.instance_id): (s.offset, s.payload_offset + s.payload_length) for s in snap.devices}
        text = json.dumps(snap.vmdesc)
        for _ in range(40):
            vmdesc = json.loads(text)
            nodes = _nodes(vmdesc["devices"], [])
            for _ in range(rng.integers(1, 6)):
                node = nodes[rng.integers(len(nodes))]
                value = values[rng.integers(len(values))]
                if isinstance(node, dict):
                    node[keys[rng.integers(len(keys))]] = value
                elif node:
                    node[rng.integers(len(node))] = value
            for state in all_device_states(_Redescribed(snap, vmdesc)):
                start, end = spans[state.idstr, state.instance_id]
                assert all(start <= p.offset <= end for p in state.problems)
                json.dumps(state.describe())


# -- the command line ------------------------------------------------------------------------
def test_cli_state_and_desc(paused_mr, capsys):
    assert main(["dump", str(paused_mr), "--state"]) == 0
    out = capsys.readouterr().out
    with mappedram.open(paused_mr) as snap:
        eip = _cpu(snap)["env.eip"]
        vmdesc = snap.vmdesc
    assert re.search(r"^cpu \(instance 0 v12, 1882 bytes at 0x[0-9a-f]+\)$", out, re.M)
    assert out.startswith("configuration (instance 0 v1, ")
    assert f"\n  env.eip: {eip:#x}\n" in out
    assert "warning" not in out
    assert main(["dump", str(paused_mr), "--state", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["configuration"]["fields"]["name"] == "pc-i440fx-10.0".encode().hex()
    devices = info["devices"]
    cpu = next(d for d in devices if d["idstr"] == "cpu")
    assert cpu["fields"]["env.eip"] == eip and cpu["problems"] == []
    assert main(["dump", str(paused_mr), "--desc"]) == 0
    assert json.loads(capsys.readouterr().out) == vmdesc


def test_cli_without_a_description(paused_mr, tmp_path, capsys):
    with mappedram.open(paused_mr) as snap:
        eof = snap.eof_offset
    bare = truncate_copy(paused_mr, tmp_path / "no-vmdesc.sav", eof + 1)
    for flag in ("--state", "--desc"):
        assert main(["dump", str(bare), flag]) == 1
        err = capsys.readouterr().err
        assert (
            err
            == f"mappedram: {bare}: offset {eof + 1:#x} ({eof + 1}): expected a VM description after EOF, found none\n"
        )


def test_cli_warns_with_the_offset(paused_mr, tmp_path, capsys):
    """A file whose description gives a field the wrong type (same sizes): decoded, one warning."""
    with mappedram.open(paused_mr) as snap:
        at = snap.vmdesc_location[0]
        vmdesc = copy.deepcopy(snap.vmdesc)
        cpu = next(s for s in snap.devices if s.idstr == "cpu")
    next(f for f in _cpu_desc(vmdesc)["fields"] if f["name"] == "env.eip")["type"] = "nullptr"
    text = json.dumps(vmdesc).encode()
    path = truncate_copy(paused_mr, tmp_path / "retyped.sav", at)
    with open(path, "ab") as f:
        f.write(b"\x06" + struct.pack(">I", len(text)) + text)
    assert main(["dump", str(path), "--state"]) == 0
    out = capsys.readouterr().out.splitlines()
    eip_at = cpu.payload_offset + 16 * 8
    problem = f"offset {eip_at:#x}: expected 1 bytes for nullptr cpu/env.eip, found a size of 8"
    assert [line for line in out if "warning" in line] == [f"  warning: {problem}"]
    assert f"  env.eip: PROBLEM: {problem}" in out
    assert "    0000: " + " ".join(["00"] * 32) in out  # slirp's 131-byte buffer, as a hex dump


# -- QEMU's own view of the registers ----------------------------------------------------------
_SEGMENT = re.compile(r"^(ES|CS|SS|DS|FS|GS|LDT|TR)\s*=([0-9a-f]+) ([0-9a-f]+) ([0-9a-f]+) ([0-9a-f]+)", re.M)
_TABLE = re.compile(r"^(GDT|IDT)=\s+([0-9a-f]+) ([0-9a-f]+)", re.M)
_REGISTER = re.compile(r"\b([A-Z][A-Z0-9]*)\s*=([0-9a-f]+)\b")  # "R8 =..." has a space
# QEMU's env.regs order, as `info registers` names them outside and inside long mode
_GPR_32 = ("EAX", "ECX", "EDX", "EBX", "ESP", "EBP", "ESI", "EDI")
_GPR_64 = tuple("R" + n[1:] for n in _GPR_32) + tuple(f"R{n}" for n in range(8, 16))
LONG_MODE_GUEST = Path(__file__).resolve().parent / "guest" / "long_mode.S"
LONG_MARK = 0x474E4F4C  # "LONG" at 0x500, then a counter at 0x508


def _info_registers(text):
    """`info registers` as {name: (value, hex digits)}; segments as {name: (sel, base, limit, flags)}."""
    regs = {m[1]: (int(m[2], 16), len(m[2])) for m in _REGISTER.finditer(text)}
    segs = {m[1]: tuple(int(x, 16) for x in m.groups()[1:]) for m in _SEGMENT.finditer(text)}
    tables = {m[1]: (int(m[2], 16), int(m[3], 16)) for m in _TABLE.finditer(text)}
    return regs, segs, tables


def _wait_long_mode(vm):
    deadline = time.monotonic() + 60
    while not (vm.read_u32(0x500) == LONG_MARK and vm.read_u32(0x508) > 2):
        assert time.monotonic() < deadline, "the long-mode guest did not start"
        time.sleep(0.1)


@pytest.fixture(scope="module", params=["protected", "long", "protected-3-vcpus"])
def paused_qemu(request, tmp_path_factory):
    """One paused run of a guest (boot.S in 32-bit protected mode, or long_mode.S; with 3
    vCPUs, the firmware's halted APs beside boot.S): QEMU's `info registers` (of the first
    vCPU), its dump-guest-memory core and its mapped-ram save of the same vCPUs."""
    from qemu_vm import Vm, boot_and_wait, build_guest, qemu_binary, save

    if qemu_binary() is None or shutil.which("as") is None:
        if os.environ.get("CI"):
            raise RuntimeError("CI needs qemu-system-x86_64 >= 10 and GNU as: run .ci/install-qemu")
        pytest.skip("needs qemu-system-x86_64 >= 10.0 and GNU as (see .ci/install-qemu)")
    workdir = tmp_path_factory.mktemp(f"devstate-{request.param}")
    long_mode = request.param == "long"
    vcpus = 3 if request.param.endswith("3-vcpus") else 1
    image = build_guest(workdir, source=LONG_MODE_GUEST, long_mode=True) if long_mode else build_guest(workdir)
    files = SimpleNamespace(long_mode=long_mode, vcpus=vcpus, save=workdir / "regs.sav", core=workdir / "qemu.core")
    with Vm(workdir, image, name=f"regs{time.monotonic_ns()}", smp=vcpus) as vm:
        if long_mode:
            _wait_long_mode(vm)
        else:
            boot_and_wait(vm)
        vm.cmd("stop")
        files.registers = vm.hmp("info registers")
        vm.cmd("dump-guest-memory", paging=False, protocol=f"file:{files.core}")
        save(vm, f"file:{files.save}", mapped_ram=True)
    return files


@pytest.mark.qemu
def test_cpu_section_equals_info_registers(paused_qemu):
    regs, segs, tables = _info_registers(paused_qemu.registers)
    with mappedram.open(paused_qemu.save) as snap:
        cpu = _cpu(snap)

    def same(name, value):
        shown, digits = regs[name]
        assert value & ((1 << 4 * digits) - 1) == shown, name

    long_mode = paused_qemu.long_mode
    for i, name in enumerate(_GPR_64 if long_mode else _GPR_32):
        same(name, cpu["env.regs"][i])
    same("RIP" if long_mode else "EIP", cpu["env.eip"])
    same("RFL" if long_mode else "EFL", cpu["env.eflags"])
    for n in (0, 2, 3, 4):
        same(f"CR{n}", cpu[f"env.cr[{n}]"])
    same("EFER", cpu["env.efer"])
    for n in (0, 1, 2, 3, 6, 7):
        same(f"DR{n}", cpu["env.dr"][n])
    same("FCW", cpu["env.fpuc"])
    same("MXCSR", cpu["env.mxcsr"])
    decoded = dict(zip(("ES", "CS", "SS", "DS", "FS", "GS"), cpu["env.segs"]))
    decoded.update(LDT=cpu["env.ldt"], TR=cpu["env.tr"])
    assert set(segs) == set(decoded)
    for name, (selector, base, limit, flags) in segs.items():
        seg = decoded[name]
        assert (seg["selector"], seg["base"], seg["limit"], seg["flags"] & 0x00FFFF00) == (selector, base, limit, flags)
    for name, (base, limit) in tables.items():
        seg = cpu[f"env.{name.lower()}"]
        assert (seg["base"], seg["limit"]) == (base, limit)
    if long_mode:  # what long_mode.S set: page tables at 0x1000, PAE, LME+LMA, its registers
        assert (regs["CR3"][0], regs["CR4"][0], regs["EFER"][0]) == (0x1000, 0x20, 0x500)
        assert regs["R15"][0] == (1 << 64) - 1 and regs["RSP"][0] == 0x7000
    else:
        assert regs["EIP"][0] != 0 and regs["ESP"][0] == 0x7C00 and tables["GDT"][0] != 0


# -- the vCPUs as ELF core notes -------------------------------------------------------------
_GDB_LINE = re.compile(r"^(\w+)\s+(0x[0-9a-f]+)\s", re.M)
I386_GDB = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi")
X86_64_GDB = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi") + tuple(f"r{n}" for n in range(8, 16))
SEG_NAMES = ("es", "cs", "ss", "ds", "fs", "gs")


def _gdb_registers(core, extra=""):
    """What `gdb -batch -ex 'info registers' -c CORE` shows (plus `info registers EXTRA`)."""
    if shutil.which("gdb") is None:
        pytest.skip("needs gdb")
    commands = ["-ex", "info registers"] + (["-ex", f"info registers {extra}"] if extra else [])
    out = subprocess.run(
        ["gdb", "-nx", "-batch", *commands, "-c", str(core)], capture_output=True, text=True, timeout=120
    ).stdout
    return {m[1]: int(m[2], 16) for m in _GDB_LINE.finditer(out)}


def _notes(core):
    """(name, type, desc) of every note in the PT_NOTE segment of an ELF64 core, and e_machine."""
    data = core.read_bytes()[: 1 << 16]
    machine = struct.unpack_from("<H", data, 18)[0]
    phoff, phentsize, phnum = struct.unpack_from("<Q", data, 32)[0], *struct.unpack_from("<HH", data, 54)
    for i in range(phnum):
        p_type, _, offset, _, _, size = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_type == 4:
            break
    else:
        return machine, []
    notes, pos = [], offset
    while pos < offset + size:
        namesz, descsz, kind = struct.unpack_from("<III", data, pos)
        name_at = pos + 12
        desc_at = name_at + -(-namesz // 4) * 4
        notes.append((data[name_at : name_at + namesz], kind, data[desc_at : desc_at + descsz]))
        pos = desc_at + -(-descsz // 4) * 4
    return machine, notes


def test_notes_for_x86_only(fixture_path, manifest):
    """x86 vCPUs give notes (every fixture, live and classic streams too); other targets none."""
    with mappedram.open(fixture_path) as snap:
        notes = cpu_notes(snap)
    if manifest["target"] == "x86_64":
        assert notes is not None and notes.machine == 3  # boot.S stays in 32-bit protected mode
    else:
        assert notes is None


def test_export_carries_the_registers_gdb_reads(paused_mr, tmp_path):
    core = tmp_path / "core.elf"
    assert main(["export-elf", str(paused_mr), "-o", str(core)]) == 0
    machine, notes = _notes(core)
    assert machine == 3  # EM_386: the guest is not in long mode, as QEMU decides
    assert [(n, t, len(d)) for n, t, d in notes] == [(b"CORE\0", 1, 144), (b"QEMU\0", 0, 440)]
    with mappedram.open(paused_mr) as snap:
        cpu = _cpu(snap)
    gdb = _gdb_registers(core)
    assert [gdb[name] for name in I386_GDB] == [v & 0xFFFFFFFF for v in cpu["env.regs"][:8]]
    assert (gdb["eip"], gdb["eflags"]) == (cpu["env.eip"], cpu["env.eflags"])
    assert [gdb[name] for name in SEG_NAMES] == [s["selector"] for s in cpu["env.segs"]]


def test_x86_64_prstatus_as_gdb_reads_it(paused_mr, tmp_path):
    """A long-mode vCPU (the fixture's, with every register made distinct) in an x86_64 core."""
    with mappedram.open(paused_mr) as snap:
        (real,) = x86_cpus(snap)
    segs = tuple(dataclasses.replace(s, selector=0x10 + 8 * i, base=0x1000 * (i + 1)) for i, s in enumerate(real.segs))
    cpu = dataclasses.replace(
        real,
        regs=tuple(0x1111_0000_0000 + i for i in range(16)),
        rip=0xFFFF_FFFF_8100_0000,
        rflags=0x246,
        hflags=real.hflags | HF_LMA,
        segs=segs,
    )
    notes = notes_for([cpu])
    assert notes.machine == 62
    header = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\2\1\1", 4, 62, 1, 0, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    header += struct.pack("<IIQQQQQQ", 4, 0, 120, 0, 0, len(notes.data), len(notes.data), 0)
    core = tmp_path / "x86_64.core"
    core.write_bytes(header + notes.data)
    gdb = _gdb_registers(core, "fs_base gs_base")
    assert [gdb[name] for name in X86_64_GDB] == list(cpu.regs)
    assert (gdb["rip"], gdb["eflags"]) == (cpu.rip, 0x246)
    assert [gdb[name] for name in SEG_NAMES] == [s.selector for s in segs]
    assert (gdb["fs_base"], gdb["gs_base"]) == (segs[4].base, segs[5].base)


def test_no_description_no_notes(paused_mr, tmp_path):
    with mappedram.open(paused_mr) as snap:
        eof = snap.eof_offset
    bare = truncate_copy(paused_mr, tmp_path / "no-vmdesc.sav", eof + 1)
    core = tmp_path / "core.elf"
    assert main(["export-elf", str(bare), "-o", str(core)]) == 0
    assert _notes(core) == (62, [])


def test_undecodable_cpu_section_is_one_line(paused_mr, tmp_path, capsys):
    with mappedram.open(paused_mr) as snap:
        at = snap.vmdesc_location[0]
        vmdesc = copy.deepcopy(snap.vmdesc)
        cpu = next(s for s in snap.devices if s.idstr == "cpu")
    next(f for f in _cpu_desc(vmdesc)["fields"] if f["name"] == "env.eip")["type"] = "bool"
    text = json.dumps(vmdesc).encode()
    path = truncate_copy(paused_mr, tmp_path / "retyped.sav", at)
    with open(path, "ab") as f:
        f.write(b"\x06" + struct.pack(">I", len(text)) + text)
    assert main(["export-elf", str(path), "-o", str(tmp_path / "core.elf")]) == 1
    eip_at = cpu.payload_offset + 16 * 8
    assert capsys.readouterr().err == (
        f"mappedram: {path}: offset {cpu.payload_offset:#x} ({cpu.payload_offset}): expected the registers of an "
        f"x86 cpu section, found offset {eip_at:#x}: expected 1 bytes for bool cpu/env.eip, found a size of 8\n"
    )
    assert not (tmp_path / "core.elf").exists()


@pytest.mark.qemu
def test_notes_equal_dump_guest_memory(paused_qemu, tmp_path):
    """Our export of the save carries the very notes QEMU's dump-guest-memory wrote."""
    ours = tmp_path / "ours.core"
    assert main(["export-elf", str(paused_qemu.save), "-o", str(ours)]) == 0
    machine, notes = _notes(ours)
    assert (machine, notes) == _notes(paused_qemu.core)
    prstatus = (62, 336) if paused_qemu.long_mode else (3, 144)  # EM_X86_64 or EM_386
    vcpus = paused_qemu.vcpus  # as QEMU writes them: every NT_PRSTATUS, then every QEMU note
    assert (machine, [(n, t, len(d)) for n, t, d in notes]) == (
        prstatus[0],
        [(b"CORE\0", 1, prstatus[1])] * vcpus + [(b"QEMU\0", 0, 440)] * vcpus,
    )
    pid_at = 32 if paused_qemu.long_mode else 24  # QEMU's pid field: the vCPU's index + 1
    assert [struct.unpack_from("<I", d, pid_at)[0] for _, t, d in notes if t == 1] == list(range(1, vcpus + 1))
    assert _gdb_registers(ours) == _gdb_registers(paused_qemu.core)
