"""Device state of compressed libvirt images, read in their one forward pass: dump --state,
extract --all, export-elf's CPU notes, the cap on the bytes kept, and the progress bar.

The images hold real QEMU streams: the classic-stream fixture behind libvirt's header
through each compressor (as tests/test_compressed.py builds them), the libvirt mapped-ram
fixture through ``convert --to stream --compress``, and a paused QEMU's own save beside
its dump-guest-memory core. Each result is held against the same stream uncompressed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import fixture_file, load_manifest
from test_compressed import COMPRESS, FORMATS, libvirt_header, write_image

import mappedram
from mappedram.cli import main
from mappedram.formats.constants import SectionType
from mappedram.mapper.devstate import MAX_PAYLOAD, all_device_states, configuration_state
from mappedram.mapper.encoder import StreamEncoder
from mappedram.mapper.forward import DEVICE_STATE_LIMIT, ForwardSnapshot

LEGACY = "pc64-d-paused-legacy.bin"  # QEMU's classic stream of a paused pc guest
LIBVIRT = "pc64-f-paused-mr-libvirt.bin"  # QEMU's mapped-ram save behind libvirt's header
PT_LOAD, PT_NOTE = 1, 4


@pytest.fixture(scope="module")
def legacy(tmp_path_factory) -> dict[str, Path]:
    """The legacy fixture behind libvirt's header: raw, and through each compressor."""
    out = tmp_path_factory.mktemp("legacy")
    stream = fixture_file(LEGACY).read_bytes()
    fmts = ["raw"] + [f for f in COMPRESS if f != "lzop" or shutil.which("lzop")]
    return {fmt: write_image(out / f"img.{fmt}", fmt, stream) for fmt in fmts}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> SimpleNamespace:
    """The libvirt fixture by convert: a zstd-compressed stream and a raw one."""
    out = tmp_path_factory.mktemp("converted")
    zstd, raw = out / "zstd.sav", out / "raw.sav"
    src = str(fixture_file(LIBVIRT))
    assert main(["convert", src, str(zstd), "--to", "stream", "--compress", "zstd"]) == 0
    assert main(["convert", src, str(raw), "--to", "stream"]) == 0
    return SimpleNamespace(zstd=zstd, raw=raw)


def run(capsys, *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def state_json(capsys, path: Path) -> dict:
    code, out, err = run(capsys, "dump", "--state", "--json", path)
    assert code == 0 and err == ""
    state = json.loads(out)
    assert state.pop("file") == str(path)
    return state


def shifted(state: dict, delta: int) -> dict:
    """A --state --json object with every offset moved by ``delta`` (no problems in it)."""
    out = copy.deepcopy(state)
    for dev in [out["configuration"], *out["devices"]]:
        assert dev["problems"] == []
        dev["payload_offset"] += delta
    return out


# -- dump --state and device_state ------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_dump_state_json_equals_the_uncompressed_stream(legacy, fmt, capsys):
    ours = state_json(capsys, legacy[fmt])
    assert ours == state_json(capsys, legacy["raw"])
    # the bare fixture: the same devices, its offsets less the libvirt header in front
    assert ours == shifted(state_json(capsys, fixture_file(LEGACY)), len(libvirt_header(fmt)))
    assert ours["configuration"]["fields"]["name"] == b"pc-i440fx-10.0".hex()
    assert len(ours["devices"]) == 33 and any(d["idstr"] == "cpu" for d in ours["devices"])


def test_dump_state_tree_and_desc_of_a_converted_image(converted, capsys):
    for flags in (["--state"], ["--desc"], ["--state", "--json"]):
        code, ours, err = run(capsys, "dump", *flags, converted.zstd)
        assert code == 0 and err == ""
        assert run(capsys, "dump", *flags, converted.raw)[1] == ours.replace(str(converted.zstd), str(converted.raw))
    with mappedram.open(fixture_file(LIBVIRT)) as snap:  # and the fields of QEMU's own file
        fixture = [(d.idstr, d.instance_id, d.fields) for d in all_device_states(snap)]
    with mappedram.open(converted.zstd) as snap:
        assert isinstance(snap, ForwardSnapshot) and snap.compressor == "zstd"
        assert [(d.idstr, d.instance_id, d.fields) for d in all_device_states(snap)] == fixture


def test_device_state_after_the_pages_were_restored(legacy):
    """The library: one pass restores the RAM and keeps the registers."""
    with mappedram.open(legacy["raw"]) as snap:
        expected = snap.device_state("cpu", 0)
    with mappedram.open(legacy["xz"]) as snap:
        ram = np.zeros(snap.block("pc.ram").used_length, dtype=np.uint8)
        snap.restore_into({"pc.ram": ram})
        assert snap.device_state("cpu", 0) == expected
        assert expected["env.eip"] != 0 and len(expected["env.regs"]) == 16
    digest = next(b["sha256"] for b in load_manifest(LEGACY)["blocks"] if b["name"] == "pc.ram")
    assert hashlib.sha256(ram).hexdigest() == digest


# -- extract --all ----------------------------------------------------------------------------
def _tree(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("fmt", ["gzip", "zstd"])
def test_extract_all_gives_the_same_files(legacy, fmt, tmp_path, capsys):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    assert run(capsys, "extract", legacy[fmt], "--all", "-o", ours)[0] == 0
    assert run(capsys, "extract", legacy["raw"], "--all", "-o", theirs)[0] == 0
    a, b = _tree(ours), _tree(theirs)
    for name in ("blocks.json", "state.json"):  # they name their input
        a[name] = a[name].replace(str(legacy[fmt]).encode(), b"IN")
        b[name] = b[name].replace(str(legacy["raw"]).encode(), b"IN")
    assert a == b
    assert {"blocks.json", "desc.json", "state.json", "pc.ram.raw", "pc.bios.raw"} <= set(a)
    for block in load_manifest(LEGACY)["blocks"]:  # QEMU's ground truth
        if "sha256" in block:
            path = ours / json.loads(a["blocks.json"])["blocks"][block["name"]]["path"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == block["sha256"], block["name"]
    ram = ours / "pc.ram.raw"
    assert os.stat(ram).st_blocks * 512 < ram.stat().st_size  # absent pages stay holes


def test_extract_all_of_a_converted_image(converted, tmp_path, capsys):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    assert run(capsys, "extract", converted.zstd, "--all", "-o", ours)[0] == 0
    assert run(capsys, "extract", fixture_file(LIBVIRT), "--all", "-o", theirs)[0] == 0
    a, b = _tree(ours), _tree(theirs)
    # convert drops the mapped-ram capability from the configuration; the devices are QEMU's
    assert json.loads(a["desc.json"])["devices"] == json.loads(b["desc.json"])["devices"]
    assert {k: v for k, v in a.items() if k.endswith(".raw")} == {k: v for k, v in b.items() if k.endswith(".raw")}
    fields = [(d["idstr"], d["fields"]) for d in json.loads(a["state.json"])["devices"]]
    assert fields == [(d["idstr"], d["fields"]) for d in json.loads(b["state.json"])["devices"]]


def test_extract_all_refuses_an_existing_json_before_the_pass(legacy, tmp_path, capsys):
    """The description comes at the image's end: its files' names are checked up front."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "state.json").write_text("mine")
    code, _, err = run(capsys, "extract", legacy["zstd"], "--all", "-o", out)
    assert code == 2 and err.count("\n") == 1 and "state.json: exists; give --force" in err
    assert sorted(p.name for p in out.iterdir()) == ["state.json"]


# -- export-elf: the notes ------------------------------------------------------------------
def elf(path: Path) -> tuple[int, list[tuple[int, int, int, int]]]:
    """e_machine and every program header's (p_type, p_offset, p_paddr, p_filesz)."""
    with open(path, "rb") as f:
        head = f.read(64)
        assert head[:4] == b"\x7fELF" and head[4:6] == b"\x02\x01"
        (machine,) = struct.unpack_from("<H", head, 18)
        (phoff,) = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    phdrs = []
    for i in range(phnum):
        p_type, _, offset, _, paddr, filesz = struct.unpack_from("<IIQQQQ", table, i * phentsize)
        phdrs.append((p_type, offset, paddr, filesz))
    return machine, phdrs


def note_bytes(path: Path) -> bytes:
    """The PT_NOTE segment, wherever it lies in the file (b"" without one)."""
    notes = [(off, size) for kind, off, _, size in elf(path)[1] if kind == PT_NOTE]
    if not notes:
        return b""
    ((off, size),) = notes
    with open(path, "rb") as f:
        return os.pread(f.fileno(), size, off)


def note_names(data: bytes) -> list[tuple[bytes, int, int]]:
    """(name, type, descsz) of each note."""
    out, pos = [], 0
    while pos < len(data):
        namesz, descsz, kind = struct.unpack_from("<III", data, pos)
        name = data[pos + 12 : pos + 12 + namesz]
        out.append((name, kind, descsz))
        pos += 12 + -(-namesz // 4) * 4 + -(-descsz // 4) * 4
    return out


def loads_equal(a: Path, b: Path) -> None:
    la = [p for p in elf(a)[1] if p[0] == PT_LOAD]
    lb = [p for p in elf(b)[1] if p[0] == PT_LOAD]
    assert [(p[2], p[3]) for p in la] == [(p[2], p[3]) for p in lb] and la
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for (_, off_a, _, size), (_, off_b, _, _) in zip(la, lb):
            assert os.pread(fa.fileno(), size, off_a) == os.pread(fb.fileno(), size, off_b)


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_elf_carries_the_notes_of_the_uncompressed_file(legacy, fmt, tmp_path, capsys):
    ours, theirs, bare = tmp_path / "ours.core", tmp_path / "theirs.core", tmp_path / "bare.core"
    assert run(capsys, "export-elf", legacy[fmt], "-o", ours)[0] == 0
    assert run(capsys, "export-elf", legacy["raw"], "-o", theirs)[0] == 0
    assert run(capsys, "export-elf", fixture_file(LEGACY), "-o", bare)[0] == 0
    notes = note_bytes(ours)
    assert notes == note_bytes(theirs) == note_bytes(bare)
    assert note_names(notes) == [(b"CORE\0", 1, 144), (b"QEMU\0", 0, 440)]  # i386 prstatus, as QEMU
    assert elf(ours)[0] == elf(theirs)[0] == 3  # EM_386: boot.S's vCPU is not in long mode
    # one vCPU's notes fit before the first segment: the very file of the uncompressed stream
    assert ours.read_bytes() == theirs.read_bytes() == bare.read_bytes()


def _many_cpus(stream: bytes, count: int) -> bytes:
    """The legacy stream with ``count`` cpu sections (copies of QEMU's, instances 0..count-1,
    each with its own section id and registers) and their entries in the description."""
    with mappedram.open(fixture_file(LEGACY)) as snap:
        cpu = next(s for s in snap.devices if s.idstr == "cpu")
        vmdesc, eof = copy.deepcopy(snap.vmdesc), snap.eof_offset
        top = max(s.section_id for s in snap.sections if s.section_id is not None)
    payload = stream[cpu.payload_offset : cpu.payload_offset + cpu.payload_length]
    enc = StreamEncoder(4096)
    copies = b""
    for i in range(1, count):
        changed = bytearray(payload)
        struct.pack_into(">Q", changed, 0, 0x1111 * i)  # env.regs[0]: RAX (EAX) differs per vCPU
        sid = top + i
        copies += enc.section_full(SectionType.SECTION_FULL, sid, "cpu", i, cpu.version_id) + changed + enc.footer(sid)
    at = next(i for i, d in enumerate(vmdesc["devices"]) if d["name"] == "cpu")
    for i in range(1, count):
        vmdesc["devices"].insert(at + i, {**vmdesc["devices"][at], "instance_id": i})
    return stream[: cpu.end] + copies + stream[cpu.end : eof] + enc.eof(vmdesc)


def test_notes_that_do_not_fit_before_the_segments_go_after_them(tmp_path, capsys):
    """8 vCPUs: 5 KiB of notes, more than the room before the first segment; the one pass
    puts them after the last segment, and they are the uncompressed file's notes."""
    stream = _many_cpus(fixture_file(LEGACY).read_bytes(), 8)
    raw, image = write_image(tmp_path / "raw.sav", "raw", stream), write_image(tmp_path / "z.sav", "zstd", stream)
    ours, theirs = tmp_path / "ours.core", tmp_path / "theirs.core"
    assert run(capsys, "export-elf", image, "-o", ours)[0] == 0
    assert run(capsys, "export-elf", raw, "-o", theirs)[0] == 0
    notes = note_bytes(ours)
    assert notes == note_bytes(theirs) and len(notes) == 8 * (164 + 460)
    assert note_names(notes) == [(b"CORE\0", 1, 144)] * 8 + [(b"QEMU\0", 0, 440)] * 8
    eax = [struct.unpack_from("<I", notes, 164 * i + 20 + 24 + 4 + 44 + 6 * 4)[0] for i in range(8)]
    assert eax[1:] == [0x1111 * i for i in range(1, 8)]  # each vCPU its own registers
    loads_equal(ours, theirs)
    (note,) = [p for p in elf(ours)[1] if p[0] == PT_NOTE]
    end = max(off + -(-size // 4096) * 4096 for kind, off, _, size in elf(ours)[1] if kind == PT_LOAD)
    assert note[1] == end == ours.stat().st_size - len(notes)
    assert elf(ours)[1][0][0] == PT_NOTE  # the first program header, as QEMU writes it


def test_gdb_reads_the_notes_after_the_segments(tmp_path, capsys):
    if shutil.which("gdb") is None:
        pytest.skip("needs gdb")
    image = write_image(tmp_path / "z.sav", "gzip", _many_cpus(fixture_file(LEGACY).read_bytes(), 8))
    core = tmp_path / "core"
    assert run(capsys, "export-elf", image, "-o", core)[0] == 0
    commands = ["-ex", "info threads"] + [
        x for n in (3, 8) for x in ("-ex", f"thread {n}", "-ex", "info registers eax")
    ]
    out = subprocess.run(
        ["gdb", "-nx", "-batch", *commands, "-c", str(core)], capture_output=True, text=True, timeout=120
    ).stdout
    assert len(re.findall(r"^[* ] +\d+ +LWP \d+", out, re.M)) == 8
    assert re.findall(r"^eax +(0x[0-9a-f]+)", out, re.M) == [hex(0x1111 * 2), hex(0x1111 * 7)]  # vCPUs 2 and 7


def test_image_without_a_description(tmp_path, capsys):
    """(suppress-vmdesc) export-elf writes memory only, dump --state says so in one line,
    extract --all writes the blocks without desc.json and state.json: as uncompressed."""
    stream = fixture_file(LEGACY).read_bytes()
    with mappedram.open(fixture_file(LEGACY)) as snap:
        eof = snap.eof_offset
    image = write_image(tmp_path / "bare.sav", "gzip", stream[: eof + 1])
    raw = write_image(tmp_path / "bare.raw", "raw", stream[: eof + 1])
    ours, theirs = tmp_path / "ours.core", tmp_path / "theirs.core"
    assert run(capsys, "export-elf", image, "-o", ours)[0] == 0
    assert run(capsys, "export-elf", raw, "-o", theirs)[0] == 0
    assert note_bytes(ours) == b"" and elf(ours)[0] == 62
    assert ours.read_bytes() == theirs.read_bytes()
    at = len(libvirt_header("gzip")) + eof + 1
    assert run(capsys, "dump", "--state", image) == (
        1,
        "",
        f"mappedram: {image}: offset {at:#x} ({at}): expected a VM description after EOF, found none\n",
    )
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(capsys, "extract", image, "--all", "-o", a)[0] == 0
    assert run(capsys, "extract", raw, "--all", "-o", b)[0] == 0
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    assert "blocks.json" in {p.name for p in a.iterdir()} and not (a / "state.json").exists()
    assert json.loads((a / "blocks.json").read_text())["state"] is None


def test_undecodable_cpu_section_is_one_line_and_no_core(tmp_path, capsys):
    """The notes come last in the pass: a cpu section they cannot use removes the core."""
    stream = fixture_file(LEGACY).read_bytes()
    with mappedram.open(fixture_file(LEGACY)) as snap:
        vmdesc, eof = copy.deepcopy(snap.vmdesc), snap.eof_offset
        cpu = next(s for s in snap.devices if s.idstr == "cpu")
    desc = next(d for d in vmdesc["devices"] if d["name"] == "cpu")
    next(f for f in desc["fields"] if f["name"] == "env.eip")["type"] = "bool"
    image = write_image(tmp_path / "retyped.sav", "xz", stream[:eof] + StreamEncoder(4096).eof(vmdesc))
    core = tmp_path / "core.elf"
    at, eip_at = (len(libvirt_header("xz")) + x for x in (cpu.payload_offset, cpu.payload_offset + 16 * 8))
    assert run(capsys, "export-elf", image, "-o", core) == (
        1,
        "",
        f"mappedram: {image}: offset {at:#x} ({at}): expected the registers of an x86 cpu section, found offset "
        f"{eip_at:#x}: expected 1 bytes for bool cpu/env.eip, found a size of 8\n",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["retyped.sav"]  # no core, no .partial


# -- the cap on what the pass keeps -----------------------------------------------------------
BIG = MAX_PAYLOAD - (4 << 20)  # device sections of this size, each one decoded (devstate's bound)
COUNT = DEVICE_STATE_LIMIT // BIG + 1  # this many of them: more than DEVICE_STATE_LIMIT together


def _big_state(stream: bytes) -> tuple[bytes, int]:
    """The legacy stream with COUNT device sections of BIG bytes (each one buffer field, in
    the description too) before QEMU's first device section; and the last one's offset."""
    with mappedram.open(fixture_file(LEGACY)) as snap:
        first = snap.devices[0]
        vmdesc, eof = copy.deepcopy(snap.vmdesc), snap.eof_offset
        top = max(s.section_id for s in snap.sections if s.section_id is not None)
    enc = StreamEncoder(4096)
    pieces, entries = [], []
    for i in range(1, COUNT + 1):
        sid = top + i
        pieces.append(enc.section_full(SectionType.SECTION_FULL, sid, f"big{i}", 0, 1) + bytes(BIG) + enc.footer(sid))
        entries.append({"name": f"big{i}", "instance_id": 0, "vmsd_name": "big", "version": 1,
                        "fields": [{"name": "data", "type": "buffer", "size": BIG}]})  # fmt: skip
    vmdesc["devices"][0:0] = entries
    last = first.offset + sum(map(len, pieces[:-1]))
    return stream[: first.offset] + b"".join(pieces) + stream[first.offset : eof] + enc.eof(vmdesc), last


def test_more_device_state_than_the_cap_is_one_line(tmp_path, capsys):
    assert COUNT * BIG > DEVICE_STATE_LIMIT >= (COUNT - 1) * BIG
    stream, second = _big_state(fixture_file(LEGACY).read_bytes())
    image = write_image(tmp_path / "big.sav", "zstd", stream)
    at = len(libvirt_header("zstd")) + second
    line = (
        f"mappedram: {image}: offset {at:#x} ({at}): expected at most {DEVICE_STATE_LIMIT} bytes of device state "
        "(what one forward pass keeps of the configuration and non-RAM sections), found more with the section here\n"
    )
    assert run(capsys, "dump", "--state", image) == (1, "", line)
    code, out, err = run(capsys, "dump", "--state", "--json", image)
    assert code == 1 and err == line and json.loads(out)["error"]["offset"] == at
    out_dir = tmp_path / "all"
    assert run(capsys, "extract", image, "--all", "-o", out_dir) == (1, "", line)
    assert list(out_dir.iterdir()) == []  # the state is decoded before any block file appears
    # the walk is not refused: dump and verify read it, and the registers after it were kept
    assert run(capsys, "dump", image)[0] == 0
    assert run(capsys, "verify", image)[:2] == (0, f"{image}: valid\n")
    core = tmp_path / "core"
    assert run(capsys, "export-elf", image, "-o", core)[0] == 0
    assert note_names(note_bytes(core)) == [(b"CORE\0", 1, 144), (b"QEMU\0", 0, 440)]
    with mappedram.open(image) as snap:  # the first big section fit, and decodes
        assert snap.device_state("big1") == {"data": bytes(BIG)}


def test_the_cap_is_a_constructor_argument(legacy):
    """Smaller than the header and configuration: nothing is kept, each read names its element."""
    with ForwardSnapshot(legacy["gzip"], device_state_limit=16) as snap:
        cpu = next(s for s in snap.devices if s.idstr == "cpu")
        for read, offset in (
            (lambda: snap.device_state("cpu", 0), cpu.offset),
            (lambda: configuration_state(snap), snap.stream_start),
        ):
            with pytest.raises(mappedram.FormatError, match="expected at most 16 bytes of device state") as err:
                read()
            assert err.value.offset == offset


# -- progress ---------------------------------------------------------------------------------
def test_dump_reports_the_compressed_bytes_read(legacy):
    seen: list[tuple[int, int]] = []
    size = legacy["bzip2"].stat().st_size - len(libvirt_header("bzip2"))  # the compressed bytes
    with mappedram.open(legacy["bzip2"], progress=lambda d, t: seen.append((d, t))) as snap:
        snap.describe()
    assert {t for _, t in seen} == {size} and seen[-1][0] == size
    assert len(seen) > 2 and [d for d, _ in seen] == sorted(d for d, _ in seen)


def _on_a_terminal(args: list[str], stdout: Path) -> tuple[int, bytes]:
    """The CLI in a child whose stderr is a pseudo-terminal (stdout to a file, which a long
    output cannot fill up): its exit code and what the terminal got."""
    master, slave = pty.openpty()
    package = Path(mappedram.__file__).resolve().parent.parent  # the copy under test
    env = {**os.environ, "PYTHONPATH": f"{package}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with open(stdout, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mappedram", *args], stdout=out, stderr=slave, env=env)
    os.close(slave)
    terminal = b""
    while select.select([master], [], [], 120)[0]:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # EIO: the child's end is closed
            break
        if not chunk:
            break
        terminal += chunk
    os.close(master)
    return proc.wait(timeout=60), terminal


@pytest.mark.parametrize(
    ("command", "label"), [(["dump"], b"dump ["), (["dump", "--state"], b"dump ["), (["verify"], b"verify [")]
)
def test_dump_and_verify_draw_a_bar_on_a_terminal(legacy, command, label, tmp_path):
    out = tmp_path / "out"
    code, terminal = _on_a_terminal([*command, str(legacy["xz"])], out)
    assert code == 0 and label in terminal and b"100.0%" in terminal
    assert terminal.endswith(b"\r\n") and terminal.count(b"\n") == 1  # the bar's one line, ended
    assert out.stat().st_size > 0  # the output itself went to stdout


# -- against QEMU itself ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def long_mode_qemu(tmp_path_factory) -> SimpleNamespace:
    """A paused long-mode guest: QEMU's dump-guest-memory core and its classic-stream save,
    the save behind libvirt's header through zstd (as `virsh save --image-format zstd`)."""
    from qemu_vm import Vm, build_guest, qemu_binary, save
    from test_devstate import LONG_MODE_GUEST, _wait_long_mode

    if qemu_binary() is None or shutil.which("as") is None:
        if os.environ.get("CI"):
            raise RuntimeError("CI needs qemu-system-x86_64 >= 10 and GNU as: run .ci/install-qemu")
        pytest.skip("needs qemu-system-x86_64 >= 10.0 and GNU as (see .ci/install-qemu)")
    workdir = tmp_path_factory.mktemp("long-mode")
    files = SimpleNamespace(core=workdir / "qemu.core", stream=workdir / "stream.sav")
    with Vm(workdir, build_guest(workdir, source=LONG_MODE_GUEST, long_mode=True), name="fwd") as vm:
        _wait_long_mode(vm)
        vm.cmd("stop")
        vm.cmd("dump-guest-memory", paging=False, protocol=f"file:{files.core}")
        save(vm, f"file:{files.stream}")  # no mapped-ram: the classic stream libvirt compresses
    files.image = write_image(workdir / "image.zst", "zstd", files.stream.read_bytes())
    return files


@pytest.mark.qemu
def test_notes_of_a_compressed_image_equal_dump_guest_memory(long_mode_qemu, tmp_path, capsys):
    ours = tmp_path / "ours.core"
    assert run(capsys, "export-elf", long_mode_qemu.image, "-o", ours)[0] == 0
    notes = note_bytes(ours)
    assert notes == note_bytes(long_mode_qemu.core)
    assert note_names(notes) == [(b"CORE\0", 1, 336), (b"QEMU\0", 0, 440)]  # x86_64 prstatus
    assert elf(ours)[0] == elf(long_mode_qemu.core)[0] == 62
