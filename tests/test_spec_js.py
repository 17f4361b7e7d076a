"""The Kaitai spec's JavaScript build (what the Web IDE runs) against our reader, and the
cases the spec used to miss (a prefix without libvirt header, capabilities anywhere in
the configuration, classic-stream pages of 8 KiB), in both the Python and the JS build."""

from __future__ import annotations

import hashlib
import html
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from craft import pattern_block, write_snapshot
from test_spec import SPEC, assert_tree_agrees, spec  # noqa: F401 - spec is a fixture

import mappedram
from mappedram.formats import structs as S
from mappedram.formats.constants import (
    CAP_MAPPED_RAM,
    SUB_CAPABILITIES,
    SUB_TARGET_PAGE_BITS,
    SUB_UUID,
    RamFlag,
    SectionType,
    VmCommand,
)
from mappedram.mapper.encoder import StreamEncoder


@pytest.fixture(scope="session")
def jsbuild(tmp_path_factory):
    """The spec compiled to JavaScript as the Web IDE compiles it (debug build)."""
    node = shutil.which("node")
    runtime = SPEC / "node_modules" / "kaitai-struct"
    if node is None or not runtime.exists() or not (SPEC / "node_modules" / "kaitai-struct-compiler").exists():
        reason = "node and `npm ci --prefix spec` (compiler and kaitai-struct runtime) are needed"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("ksc-js")
    run = subprocess.run(
        [node, str(SPEC / "compile.js"), "javascript", str(out), "--debug"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr  # errors and warnings both fail
    return node, out


def jsdump(jsbuild, path, offset=None) -> dict[str, Any]:
    node, build = jsbuild
    cmd = [node, str(SPEC / "jsdump.js"), str(path), "--build", str(build)]
    if offset is not None:
        cmd += ["--offset", str(offset)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@dataclass(frozen=True)
class Digest:
    """A byte array jsdump printed as length and SHA-256; equal to the bytes it hashes."""

    length: int
    sha256: str

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (bytes, bytearray, memoryview)):
            data = bytes(other)
            return len(data) == self.length and hashlib.sha256(data).hexdigest() == self.sha256
        return isinstance(other, Digest) and (other.length, other.sha256) == (self.length, self.sha256)

    def __len__(self) -> int:
        return self.length

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class EnumValue:
    name: str | None
    value: int


class Node:
    """A jsdump object read the way the Python build is: snake_case names, enums with .name."""

    def __init__(self, tree: dict[str, Any]) -> None:
        self._tree = tree

    def __getattr__(self, name: str) -> Any:
        head, *rest = name.split("_")
        key = head + "".join(part.capitalize() for part in rest)
        if key not in self._tree:
            return None  # like the Python build's fields whose `if` is false
        value = self._tree[key]
        if isinstance(value, dict) and "error" in value:
            raise AssertionError(f"instance {name} failed in JavaScript: {value['error']}")
        return convert(value)


def convert(value: Any) -> Any:
    if isinstance(value, list):
        return [convert(v) for v in value]
    if isinstance(value, dict):
        if "enum" in value:
            return EnumValue(value["enum"].lower() if value["enum"] else None, value["value"])
        if "hex" in value:
            return bytes.fromhex(value["hex"])
        if "sha256" in value:
            return Digest(value["len"], value["sha256"])
        return Node(value)
    return value


def js_parse(jsbuild, path, offset=None) -> tuple[Node | None, Node]:
    tree = Node(jsdump(jsbuild, path, offset))
    return (None, tree) if offset is not None else (tree, tree.stream)


def test_js_fixtures_agree(jsbuild, fixture_path):
    assert_tree_agrees(*js_parse(jsbuild, fixture_path), fixture_path)


def test_js_stream_at_offset_agrees(jsbuild, fixture_path, manifest):
    offset = manifest["stream_start"]
    assert_tree_agrees(*js_parse(jsbuild, fixture_path, offset), fixture_path, offset)


def test_js_libvirt_prefix_agrees(jsbuild, tmp_path):
    xml = b"<domain/>\0"
    header = S.LibvirtHeaderLE.build({"data_len": len(xml) + 4096})
    path = write_snapshot(tmp_path / "lv.sav", {"pc.ram": pattern_block(16)}, prefix=header + xml + bytes(4096))
    root, _ = js_parse(jsbuild, path)
    assert root.libvirt_header.format.name == "sparse" and root.stream_start == 92 + len(xml) + 4096
    assert_tree_agrees(root, root.stream, path)


def test_js_big_endian_libvirt_header(jsbuild, tmp_path):
    header = S.LibvirtHeaderBE.build({"data_len": 100})
    path = write_snapshot(tmp_path / "be.sav", {"pc.ram": pattern_block(4)}, prefix=header + bytes(100))
    root, stream = js_parse(jsbuild, path)
    assert root.libvirt_header.version == 2 and root.stream_start == 192
    assert_tree_agrees(root, stream, path)


def test_js_live_rounds_and_many_blocks_agree(jsbuild, tmp_path):
    blocks = {f"blk{i}": pattern_block(3 + i, zero=(1,), seed=i) for i in range(12)}
    path = tmp_path / "live.sav"
    with mappedram.SnapshotWriter(path, blocks, channels=2) as writer:
        for i in range(3):
            blocks["blk0"][i * 4096] += 1
            writer.save_round()
        writer.complete()
    root, stream = js_parse(jsbuild, path)
    assert [b.index for b in stream.ram_start.ram_start.blocks] == list(range(12))  # flat, not nested
    assert_tree_agrees(root, stream, path)


def test_js_rejects_bad_magic(jsbuild, tmp_path):
    path = write_snapshot(tmp_path / "bad.sav", {"pc.ram": pattern_block(1)})
    with open(path, "r+b") as f:
        f.write(b"QEVX")
    tree = jsdump(jsbuild, path)  # the Web IDE shows the error at the node, and the rest of the tree
    assert tree["stream"]["error"].startswith("ValidationNotEqualError") and tree["streamStart"] == 0


# -- the gaps of issue 17, in both builds ------------------------------------------------


@pytest.fixture(params=["python", "javascript"])
def parse(request):
    """The root of a file's parse tree by the Python or the JavaScript build of the spec."""
    if request.param == "python":
        module = request.getfixturevalue("spec")
        return lambda path: module.QemuMappedRam.from_file(str(path))
    build = request.getfixturevalue("jsbuild")
    return lambda path: Node(jsdump(build, path))


def test_stream_found_behind_foreign_prefix(parse, tmp_path):
    # a management tool's own header, not page-aligned, with decoys: "Q"s, an obsolete v2 magic
    prefix = b"QQ metadata Q" + S.QevmHeader.build({"version": 2}) + bytes(range(256)) * 19 + b"Q"
    path = write_snapshot(tmp_path / "pre.sav", {"pc.ram": pattern_block(8), "vga": pattern_block(2)}, prefix=prefix)
    root = parse(path)
    stream = root.stream
    assert not root.has_libvirt_header and root.stream_start == len(prefix)
    with mappedram.open(path) as snap:
        assert snap.stream_start == len(prefix)
    assert_tree_agrees(root, stream, path)


def test_no_magic_in_first_mib_is_not_guessed(parse, tmp_path):
    path = write_snapshot(tmp_path / "far.sav", {"pc.ram": pattern_block(1)}, prefix=bytes(1 << 20))
    root = parse(path)
    assert root.stream_start == 0  # beyond the first MiB: only an explicit offset finds it


def configuration_with(subsections: list[tuple[str, Any]], machine: str) -> bytes:
    out = S.ConfigurationHead.build({"machine": machine})
    for name, body in subsections:
        out += S.ConfigSubsection.build({"head": {"name": name, "version_id": 1}, "body": body})
    return out


def test_capabilities_anywhere(parse, tmp_path, monkeypatch):
    """mapped-ram third in the names, the capabilities subsection third in the configuration."""
    caps = ["x-one", "x-two", CAP_MAPPED_RAM]
    subs = [
        (SUB_TARGET_PAGE_BITS, {"bits": 12}),
        (SUB_UUID, {"uuid": bytes(range(16))}),
        (SUB_CAPABILITIES, {"names": caps}),
    ]
    monkeypatch.setattr(
        StreamEncoder, "configuration", staticmethod(lambda machine, _caps: configuration_with(subs, machine))
    )
    path = write_snapshot(tmp_path / "caps.sav", {"pc.ram": pattern_block(8, zero=(2,))})
    root = parse(path)
    stream = root.stream
    config = stream.configuration.body
    assert stream.mapped_ram and config.caps_index == 2 and config.target_page_bits == 12
    assert [c.name for c in config.subsections[2].body.names] == caps
    assert_tree_agrees(root, stream, path)


def classic_stream(path, machine: str, page_size: int, blocks: dict[str, np.ndarray], page_bits: int | None = None):
    """A classic (no mapped-ram) stream built with the schemas: every page sent in a PART
    section (page 0 of each block twice, the later copy wins; pages of zeros as ZERO),
    SWITCHOVER_START, END, EOF and a VM description that gives the page size."""
    enc, sid = StreamEncoder(page_size), 2
    subs = [] if page_bits is None else [(SUB_TARGET_PAGE_BITS, {"bits": page_bits})]
    out = enc.header() + configuration_with(subs, machine)
    out += enc.ram_start(sid) + enc.ram_word(sum(len(d) for d in blocks.values()), RamFlag.MEM_SIZE)
    out += b"".join(enc.block_entry(name, len(data)) for name, data in blocks.items())
    out += enc.ram_word(0, RamFlag.EOS) + enc.footer(sid)
    out += enc.section_part(SectionType.SECTION_PART, sid)
    for name, data in blocks.items():
        out += enc.page_record(name, 0, bytes(page_size * [0xEE]))  # overwritten below
        for page, chunk in enumerate(data.reshape(-1, page_size)):
            out += enc.page_record(None, page, None if not chunk.any() else chunk.tobytes())
    out += enc.ram_word(0, RamFlag.EOS) + enc.footer(sid) + enc.command(VmCommand.SWITCHOVER_START)
    out += enc.ram_eos_section(SectionType.SECTION_END, sid)
    out += enc.eof({"page_size": page_size, "devices": []})
    path.write_bytes(out)
    return path


@pytest.mark.parametrize(
    ("machine", "page_size", "page_bits"),
    [("sun4u", 8192, None), ("virt-10.0", 16384, 14), ("pc-i440fx-10.0", 4096, None)],
    ids=["sparc64-8k", "target-page-bits-16k", "x86-4k"],
)
def test_classic_pages_of_the_streams_size(parse, tmp_path, machine, page_size, page_bits):
    blocks = {
        "ram": pattern_block(6, page_size=page_size, zero=(3,)),
        "rom": pattern_block(2, page_size=page_size, seed=7),
    }
    path = classic_stream(tmp_path / "classic.sav", machine, page_size, blocks, page_bits)
    root = parse(path)
    stream = root.stream
    assert not stream.mapped_ram and stream.page_size == page_size
    records = stream.after_blocks.elements[0].ram_payload.records
    pages = [r for r in records if r.word & RamFlag.PAGE]
    assert len(pages) == 2 + 5 + 2 and all(len(r.page) == page_size for r in pages)
    assert pages[-1].page == blocks["rom"][page_size:].tobytes() and pages[-1].addr == page_size
    assert_tree_agrees(root, stream, path)


def test_jsdump_html_page(jsbuild, fixture_path, manifest):
    node, build = jsbuild
    cmd = [node, str(SPEC / "jsdump.js"), str(fixture_path), "--build", str(build), "--html"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    page = run.stdout
    for i, block in enumerate(manifest["blocks"]):  # the flat list: one node per block, with its name
        name = html.escape(f'"{block["name"]}"')
        assert f'<span class="k">{i}</span> <span class="t">RamBlock {name}</span>' in page
    start = manifest["stream_start"]  # the QEVM magic's own offsets, as the IDE highlights them
    magic = '<span class="k">magic</span> = <span class="b">[4 bytes] 51 45 56 4d</span> '
    assert magic + f'<span class="pos">[{start:#x}, {start + 4:#x})</span>' in page
