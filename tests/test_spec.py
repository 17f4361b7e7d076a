"""The Kaitai spec, compiled by the official compiler, against the construct schemas."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO
from craft import pattern_block, write_snapshot

import mappedram
from mappedram.formats import structs as S
from mappedram.formats.constants import RamFlag

SPEC = REPO / "spec"


@pytest.fixture(scope="session")
def spec(tmp_path_factory):
    """Compile spec/qemu_mapped_ram.ksy to Python with kaitai-struct-compiler (npm) and import it."""
    node = shutil.which("node")
    if node is None or not (SPEC / "node_modules" / "kaitai-struct-compiler").exists():
        reason = "node and `npm ci --prefix spec` are needed to compile the Kaitai spec"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("ksc")
    run = subprocess.run([node, str(SPEC / "compile.js"), "python", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr  # errors and warnings both fail
    sys.path.insert(0, str(out))
    try:
        module = importlib.import_module("qemu_mapped_ram")
    finally:
        sys.path.remove(str(out))
    return module


def kaitai_parse(spec, path, offset=None):
    from kaitaistruct import KaitaiStream

    f = open(path, "rb")
    io = KaitaiStream(f)
    if offset is None:
        root = spec.QemuMappedRam(io)
        return root, root.stream
    io.seek(offset)
    return None, spec.QemuMappedRam.QevmStream(io)


def assert_same(spec, path, offset=None):
    """Everything both sides know about the file must agree."""
    assert_tree_agrees(*kaitai_parse(spec, path, offset), path, offset)


def assert_tree_agrees(root, stream, path, offset=None):
    """The parse tree (``root`` None for a stream parsed at ``offset``) against our reader."""
    with mappedram.open(path, offset=offset) as snap:
        if root is not None:
            assert root.stream_start == snap.stream_start
            assert root.has_libvirt_header == (snap.libvirt is not None)
            if snap.libvirt:
                assert root.libvirt_header.data_len == snap.libvirt.data_len
                assert root.libvirt_header.format.name == snap.libvirt.format
        assert stream.configuration.body.machine_type == snap.machine_type
        subs = getattr(stream.configuration.body, "subsections", None) or []  # absent: no subsection
        caps = [c.name for sub in subs if sub.name == "configuration/capabilities" for c in sub.body.names]
        assert tuple(caps) == snap.capabilities
        assert stream.mapped_ram == (snap.format == "mapped-ram")
        ram = stream.ram_start
        assert ram.full_header.section_id == next(s.section_id for s in snap.sections if s.idstr == "ram")
        assert ram.ram_start.mem_size == snap.ram_total
        assert ram.ram_start.mem_size_flags.name == "mem_size"
        blocks = stream.ram_start.ram_start.blocks  # a flat list
        assert [b.idstr for b in blocks] == list(snap.blocks)
        for kb, block in zip(blocks, snap):
            assert kb.used_length == block.used_length
            assert kb.entry_pos == block.entry_offset
            if stream.mapped_ram:
                hdr = kb.mapped_ram_header
                assert (hdr.version, hdr.page_size) == (block.version, block.page_size)
                assert (hdr.bitmap_offset, hdr.pages_offset) == (block.bitmap_offset, block.pages_offset)
                assert kb.bitmap_size == block.bitmap_size
                assert kb.bitmap == snap.read_bytes(block.bitmap_offset, block.bitmap_size)
        # the elements after the block list: RAM PART/END sections and commands, as we walked them
        ours = [s for s in snap.sections if s.kind in ("part", "end", "command") and (s.idstr or s.command)]
        theirs = [e for e in stream.after_blocks.elements if not e.is_device and e.element_type.name != "eof"]
        assert len(theirs) == len(ours)
        for e, s in zip(theirs, ours):
            if s.kind == "command":
                assert e.command.cmd.name == s.command
            else:
                assert e.element_type.name == f"section_{s.kind}" and e.part_header.section_id == s.section_id
        if not stream.mapped_ram:
            assert_page_records_agree(stream, theirs, snap)
        last = stream.after_blocks.elements[-1]
        first_device = next((s for s in snap.sections if s.kind == "full" and s.idstr != "ram"), None)
        if first_device is not None:
            assert last.is_device and last.full_header.idstr == first_device.idstr


def assert_page_records_agree(stream, ram_sections, snap):
    """A classic stream: the page records, read with the stream's page size, hold the pages we read."""
    assert stream.page_size == snap.page_size
    last = {}  # (block, page) -> the page's last PAGE record, None after a ZERO record
    name = None
    payloads = [stream.after_blocks.ram_start_tail]
    payloads += [e.ram_payload for e in ram_sections if getattr(e, "ram_payload", None)]
    for payload in payloads:
        for rec in payload.records:
            if rec.word & (RamFlag.PAGE | RamFlag.ZERO):
                name = rec.idstr if not rec.word & RamFlag.CONTINUE else name
                last[(name, rec.addr // stream.page_size)] = rec.page if rec.word & RamFlag.PAGE else None
    for block in snap:
        pages = sorted(page for (owner, page), data in last.items() if owner == block.name and data is not None)
        assert pages == block.index[0].tolist()
        for page in pages:
            assert last[(block.name, page)] == bytes(block.page(page))


def test_fixtures_agree(spec, fixture_path):
    assert_same(spec, fixture_path)  # the spec finds the stream itself, behind any prefix


def test_libvirt_prefix_agrees(spec, tmp_path):
    xml = b"<domain/>\0"
    header = S.LibvirtHeaderLE.build({"data_len": len(xml) + 4096})
    prefix = header + xml + bytes(4096)
    path = write_snapshot(tmp_path / "lv.sav", {"pc.ram": pattern_block(16)}, prefix=prefix)
    assert_same(spec, path)


def test_big_endian_libvirt_header(spec, tmp_path):
    header = S.LibvirtHeaderBE.build({"data_len": 100})
    path = write_snapshot(tmp_path / "be.sav", {"pc.ram": pattern_block(4)}, prefix=header + bytes(100))
    root, _ = kaitai_parse(spec, path)
    assert root.libvirt_header.version == 2 and root.libvirt_header.data_len == 100
    assert root.stream_start == 192
    assert_same(spec, path)


def test_8k_pages_and_many_blocks_agree(spec, tmp_path):
    blocks = {f"blk{i}": pattern_block(3 + i, page_size=8192, zero=(1,), seed=i) for i in range(5)}
    path = write_snapshot(tmp_path / "sparc.sav", blocks, page_size=8192, machine_type="sun4u")
    assert_same(spec, path)


def test_live_rounds_agree(spec, tmp_path):
    data = pattern_block(64)
    path = tmp_path / "live.sav"
    with mappedram.SnapshotWriter(path, {"pc.ram": data, "vga": pattern_block(8)}, channels=2) as writer:
        for i in range(4):
            data[i * 4096] += 1
            writer.save_round()
        writer.complete()
    assert_same(spec, path)


def test_spec_rejects_bad_magic(spec, tmp_path):
    from kaitaistruct import ValidationNotEqualError

    path = write_snapshot(tmp_path / "bad.sav", {"pc.ram": pattern_block(1)})
    with open(path, "r+b") as f:
        f.write(b"QEVX")
    with pytest.raises(ValidationNotEqualError):
        kaitai_parse(spec, path)[0].stream  # noqa: B018 - parsing is the test


def test_ksdump_prints_tree(spec, paused_mr):
    build = os.path.dirname(spec.__file__)
    cmd = [sys.executable, str(SPEC / "ksdump.py"), str(paused_mr), "--build", build]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "machine_type: 'pc-i440fx-10.0'" in run.stdout
    assert "idstr: 'pc.ram'" in run.stdout and "pages_offset: 1048576 (0x100000)" in run.stdout
    assert "prev:" not in run.stdout  # a block's predecessor is not printed again under it
