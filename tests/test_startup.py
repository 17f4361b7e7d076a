"""Start-up (issue 14 item 3): what ``mappedram dump`` and ``verify`` import, and the
numpy- and construct-free paths that let them skip it, checked against the schemas and
against numpy. Module checks, not timings (bench/bench_huge.py times them)."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import fixture_file
from craft import patch, write_snapshot

import mappedram
from mappedram.errors import FormatError
from mappedram.formats import headers as H
from mappedram.formats import structs as S
from mappedram.formats.bitmap import BIG_ENDIAN_64, LITTLE_ENDIAN_64, POPCOUNT_PIECE, BitmapLayout, popcount
from mappedram.formats.constants import (
    CAP_MAPPED_RAM,
    LIBVIRT_MAGIC_DONE,
    QEVM_MAGIC,
    SUB_CAPABILITIES,
    SUB_TARGET_PAGE_BITS,
    SUB_UUID,
    SectionType,
)
from mappedram.mapper import vmdesc
from mappedram.mapper.encoder import StreamComposer
from mappedram.mapper.prologue import read_prologue
from mappedram.mapper.source import Cursor

REPO = Path(__file__).resolve().parent.parent

# What dump and verify of a mapped-ram file must not load: numpy and construct (most of
# a small file's run), the plots, the writer, and the modules of the other commands.
NOT_LOADED = (
    "numpy",
    "construct",
    "matplotlib",
    "mappedram.formats.structs",
    "mappedram.mapper.writer",
    "mappedram.mapper.encoder",
    "mappedram.mapper.convert",
    "mappedram.mapper.restore",
    "mappedram.mapper.parallel_load",
    "mappedram.mapper.copy_plan",
    "mappedram.mapper.stale",
    "mappedram.mapper.devstate",
    "mappedram.mapper.extract_all",
    "mappedram.mapper.physical",
    "mappedram.visual.diff",
    "mappedram.visual.plot",
    "mappedram.visual.report",
)

# The command line in a child; prints its exit code, peak traced memory and modules.
_CHILD = """\
import json, sys, tracemalloc
tracemalloc.start()
from mappedram.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({"code": code, "peak": peak, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


def run_cli(*args: str) -> tuple[dict, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, env=env)
    return json.loads(proc.stderr.strip().splitlines()[-1]), proc.stdout


def loaded(modules: list[str], name: str) -> bool:
    return any(m == name or m.startswith(name + ".") for m in modules)


@pytest.mark.parametrize("fixture", ["pc64-a-paused-mr.bin", "pc64-f-paused-mr-libvirt.bin"])
@pytest.mark.parametrize("command", [["dump"], ["dump", "--json"], ["verify"]])
def test_dump_and_verify_of_mapped_ram_load_nothing_heavy(fixture, command):
    out, stdout = run_cli(*command, str(fixture_file(fixture)))
    assert out["code"] == 0
    assert "valid" in stdout if command == ["verify"] else "pc.ram" in stdout
    assert [m for m in NOT_LOADED if loaded(out["modules"], m)] == []


def test_version_and_help_load_nothing_heavy():
    for args in (["--version"], ["dump", "--help"]):
        out, _ = run_cli(*args)
        assert out["code"] == 0
        assert [m for m in NOT_LOADED if loaded(out["modules"], m)] == []


def test_a_classic_stream_loads_numpy_for_its_records_but_not_construct():
    out, stdout = run_cli("dump", str(fixture_file("pc64-d-paused-legacy.bin")))
    assert out["code"] == 0 and "pc.ram" in stdout
    assert loaded(out["modules"], "numpy")  # the record runs are indexed with it
    assert not loaded(out["modules"], "construct")


# -- a 1 TiB sparse guest: only the bitmap is read, in bounded pieces ----------------------------
def sparse_guest(path: Path, ram_bytes: int, set_pages: list[int], layout: BitmapLayout = LITTLE_ENDIAN_64) -> Path:
    """A one-block mapped-ram file whose bitmap has ``set_pages`` set (the rest of it, and
    every page, holes)."""
    comp = StreamComposer(4096, capabilities=[CAP_MAPPED_RAM], machine="pc-q35-10.0")
    head = comp.head()
    pieces, (place,), end = comp.ram_start(len(head), [("pc.ram", ram_bytes)], layout)
    with path.open("wb") as f:
        f.write(head)
        for offset, data in pieces:
            f.seek(offset)
            f.write(data)
        words: dict[int, int] = {}
        for page in set_pages:
            words[page // 64] = words.get(page // 64, 0) | 1 << page % 64
        for word, bits in words.items():
            f.seek(place.bitmap_offset + word * 8)
            f.write(bits.to_bytes(8, layout.byteorder))
        f.seek(end)
        f.write(comp.tail())
    return path


def test_a_1tib_guest_is_dumped_and_verified_in_bounded_memory_without_numpy(tmp_path):
    """The 32 MiB bitmap is counted 1 MiB at a time: the peak is that of a 1 GiB guest
    (256 KiB of bitmap) plus about a MiB; verify reads only its last word."""
    small = sparse_guest(tmp_path / "1g.bin", 1 << 30, [0])
    pages = 1 << 28
    set_pages = [0, 1, 97, (1 << 23) + 5, pages - 1]  # the last page, and pages in two bitmap chunks
    path = sparse_guest(tmp_path / "1t.bin", pages * 4096, set_pages)
    for command in ("dump", "verify"):
        base, _ = run_cli(command, "--json", str(small))
        out, stdout = run_cli(command, "--json", str(path))
        assert out["code"] == 0 and not loaded(out["modules"], "numpy")
        assert out["peak"] < base["peak"] + (3 << 19), (command, out["peak"], base["peak"])
        if command == "dump":
            block = json.loads(stdout)["blocks"][0]
            assert (block["pages_present"], block["pages_total"], block["bitmap_size"]) == (5, pages, 32 << 20)
        else:
            assert json.loads(stdout)["valid"]


# -- the bitmap counted without numpy ----------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, 7, POPCOUNT_PIECE - 1, POPCOUNT_PIECE, 3 * POPCOUNT_PIECE + 5])
def test_popcount_across_piece_borders(size):
    data = bytearray(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes())
    if size > 3 * POPCOUNT_PIECE:  # an all-zero piece, an all-one piece, a sparse piece
        data[POPCOUNT_PIECE : 2 * POPCOUNT_PIECE] = bytes(POPCOUNT_PIECE)
        data[2 * POPCOUNT_PIECE : 3 * POPCOUNT_PIECE] = b"\xff" * POPCOUNT_PIECE
        data[:POPCOUNT_PIECE] = bytes(data[i] if i % 97 == 0 else 0 for i in range(POPCOUNT_PIECE))
    expected = int(np.unpackbits(np.frombuffer(bytes(data), dtype=np.uint8)).sum())
    assert popcount(bytes(data)) == expected


@pytest.mark.parametrize("layout", [LITTLE_ENDIAN_64, BIG_ENDIAN_64])
@pytest.mark.parametrize("num_pages", [1, 63, 64, 65, 100, 128])
def test_stray_bits_follow_the_word_layout(tmp_path, layout, num_pages):
    """Bit n is bit n % 64 of word n / 64 in the writing host's byte order: a stray bit
    just past the last page is found (and not counted as a page) in both layouts."""
    size = layout.size(num_pages)
    present = np.zeros(size * 8, dtype=bool)
    present[:num_pages:3] = True
    stray = list(range(num_pages, size * 8, 5))
    present[stray] = True
    raw = layout.pack(present)  # the writer's own packing
    tail_start = num_pages // 8 // 8 * 8
    assert layout.stray_bits(raw[tail_start:], num_pages - tail_start * 8) == len(stray)
    assert popcount(raw) == int(present.sum())

    data = np.zeros(num_pages * 4096, np.uint8)
    data[:: 4096 * 3] = 1  # every third page non-zero, as ``present`` has them
    path = write_snapshot(tmp_path / "b.bin", {"pc.ram": data}, bitmap_layout=layout)
    with mappedram.open(path, bitmap_layout=layout) as snap:
        block = snap.block("pc.ram")
        patch(path, block.bitmap_offset, raw)
    with mappedram.open(path, bitmap_layout=layout) as snap:
        block = snap.block("pc.ram")
        assert block.stray_bits() == len(stray)
        assert block.populated == len(range(0, num_pages, 3)) == int(block.present().sum())


# -- headers.py against the schemas ------------------------------------------------------------
def schema_offsets(schema) -> dict[str, int]:
    offsets, at = {}, 0
    for sub in schema.subcons:
        offsets[sub.name] = at
        at += sub.sizeof()
    return offsets


@pytest.mark.parametrize("little", [True, False])
def test_libvirt_header_format_matches_the_schema(little):
    schema = S.libvirt_header(little)
    fmt = H.LIBVIRT_HEADER_LE if little else H.LIBVIRT_HEADER_BE
    value = {"version": 2, "data_len": 0x12345, "was_running": 1, "format": "zstd", "cookie_offset": 77}
    raw = schema.build({**value, "unused": list(range(14))})
    assert fmt.size == len(raw) == schema.sizeof() == H.LIBVIRT_HEADER_SIZE
    assert fmt.unpack(raw) == (LIBVIRT_MAGIC_DONE, 2, 0x12345, 1, 5, 77, *range(14))
    assert H.LIBVIRT_FIELDS == schema_offsets(schema)
    for number in (0, 5, 6, 99):  # known formats by name, others as the number
        parsed = schema.parse(fmt.pack(LIBVIRT_MAGIC_DONE, 2, 0, 0, number, 0, *[0] * 14))
        assert H.LIBVIRT_FORMATS.get(number, str(number)) == str(parsed.format)


def test_stream_header_formats_match_the_schemas():
    assert S.QevmHeader.build({"version": 3}) == H.QEVM_HEADER.pack(QEVM_MAGIC, 3)
    header = {"version": 1, "page_size": 4096, "bitmap_offset": 0x1234, "pages_offset": 1 << 40}
    assert S.MappedRamHeader.build(header) == H.MAPPED_RAM_HEADER.pack(*header.values())
    assert H.MAPPED_RAM_FIELDS == schema_offsets(S.MappedRamHeader)
    assert H.MAPPED_RAM_HEADER.size == S.MAPPED_RAM_HEADER_SIZE
    assert S.RamWord.build(0x1234_0000_0028) == H.RAM_WORD.pack(0x1234_0000_0028)
    assert S.SectionHeaderPart.build({"section_id": 7}) == H.SECTION_ID.pack(7)
    assert S.SectionHeaderFull.subcons[0].sizeof() == H.SECTION_ID.size
    assert S.SectionFooter.build({"section_id": 7}) == H.SECTION_FOOTER.pack(SectionType.SECTION_FOOTER, 7)
    assert S.VmDescriptionHead.build({"length": 404}) == H.VMDESC_HEAD.pack(SectionType.VMDESCRIPTION, 404)
    assert {k: str(v) for k, v in S.CommandBody.cmd.subcon.decmapping.items()} == H.COMMAND_NAMES
    assert S.ConfigurationHead.build({"machine": "pc"}) == b"\x07" + H.NAME32_LENGTH.pack(2) + b"pc"
    assert S.SubsectionHead.build({"name": "ab", "version_id": 9}) == b"\x05\x02ab" + H.SUBSECTION_VERSION.pack(9)
    assert S.TargetPageBits.build({"bits": 12}) == H.TARGET_PAGE_BITS.pack(12)
    assert S.CapabilityList.build({"names": ["x"]}) == H.CAPABILITY_COUNT.pack(1) + b"\x01x"
    assert S.VmUuid.sizeof() == H.UUID_SIZE


# -- the prologue read with struct, against construct's parse ------------------------------------
def config_bytes(machine: str, subsections: list[tuple[str, dict]]) -> bytes:
    out = S.ConfigurationHead.build({"machine": machine})
    for name, body in subsections:
        out += S.ConfigSubsection.build({"head": {"name": name, "version_id": 1}, "body": body})
    return out


def read(data: bytes):
    return read_prologue(Cursor(lambda at, n: data[at : at + n], len(data), 0), explicit_start=True)


CONFIGS = [
    ("pc-q35-10.0", []),
    ("pc", [(SUB_CAPABILITIES, {"names": ["mapped-ram", "x-ignore-shared"]})]),
    ("s", [(SUB_TARGET_PAGE_BITS, {"bits": 13}), (SUB_UUID, {"uuid": bytes(range(16))})]),
    ("q", [("configuration/unknown", None), (SUB_CAPABILITIES, {"names": []})]),
]


@pytest.mark.parametrize("machine, subsections", CONFIGS)
def test_configuration_as_the_schemas_parse_it(machine, subsections):
    config = config_bytes(machine, subsections)
    data = S.QevmHeader.build({"version": 3}) + config + b"\x01"
    prologue = read(data)
    expected = {"machine_type": S.ConfigurationHead.parse(config).machine}
    at = len(S.ConfigurationHead.build({"machine": machine}))
    for _ in subsections:
        sub = S.ConfigSubsection.parse(config[at:])
        at += len(S.ConfigSubsection.build(sub))
        if sub.head.name == SUB_CAPABILITIES:
            expected["capabilities"] = tuple(sub.body.names)
        elif sub.head.name == SUB_TARGET_PAGE_BITS:
            expected["target_page_bits"] = sub.body.bits
        elif sub.head.name == SUB_UUID:
            expected["uuid"] = sub.body.uuid.hex()
    got = prologue.configuration
    assert {k: getattr(got, k) for k in expected} == expected
    assert (prologue.version, prologue.stream_start) == (3, 0)


@pytest.mark.parametrize("machine, subsections", CONFIGS[1:3])
def test_a_cut_prologue_names_the_element_and_the_end(machine, subsections):
    """Cut anywhere, the error names the start of the element it cut (QEVM header,
    configuration, subsection) and the file's end; cut between two, the next one's byte."""
    starts = [0, 8, 8 + len(S.ConfigurationHead.build({"machine": machine}))]
    for sub in subsections[:-1]:
        starts.append(starts[-1] + len(config_bytes("", [sub])) - len(config_bytes("", [])))
    data = S.QevmHeader.build({"version": 3}) + config_bytes(machine, subsections)
    for cut in range(len(data)):
        with pytest.raises(FormatError) as err:
            read(data[:cut])
        if cut in starts[1:]:
            assert (err.value.offset, err.value.found) == (cut, f"the file ends at {cut:#x}")
        else:
            assert (err.value.offset, err.value.found) == (
                max(s for s in starts if s < cut or s == 0),
                f"the end of the file at {cut:#x}",
            )


def test_prologue_errors_keep_offset_expected_found():
    qevm = S.QevmHeader.build({"version": 3})
    counted = qevm + config_bytes("pc", []) + b"\x05\x1a" + SUB_CAPABILITIES.encode() + struct.pack(">II", 1, 1 << 31)
    cases = {
        b"QEVX" + qevm[4:] + b"\x01": (0, "the QEVM magic (a QEMU migration stream)", "b'QEVX' in field magic"),
        qevm[:4] + struct.pack(">I", 2) + b"\x01": (4, "stream version 3", "the obsolete v2"),
        qevm + b"\x07" + struct.pack(">I", 2) + b"\xff\xfe\x01": (8, "the configuration section (machine name)", None),
        # a capability count past the file fails at once, not after a loop of that many names
        counted: (15, "a known configuration subsection", f"the end of the file at {len(counted):#x}"),
    }
    for data, (offset, expected, found) in cases.items():
        with pytest.raises(FormatError) as err:
            read(data)
        assert (err.value.offset, err.value.expected) == (offset, expected)
        if found is None:
            assert "can't decode byte 0xff" in err.value.found and err.value.found.endswith("in field machine")
        else:
            assert err.value.found == found


# -- the VM description's depth check without numpy ------------------------------------------------
def deepest(data: bytes) -> int | None:
    """The offset of the first bracket deeper than MAX_DEPTH outside strings, by a plain
    loop over the rule vmdesc states: a backslash escapes the next byte, wherever it is;
    quotes toggle strings."""
    depth, in_string, escaped = 0, False, False
    for at, byte in enumerate(data):
        if escaped:
            escaped = False
        elif byte == ord("\\"):
            escaped = True
        elif byte == ord('"'):
            in_string = not in_string
        elif not in_string and byte in b"[{":
            depth += 1
            if depth > vmdesc.MAX_DEPTH:
                return at
        elif not in_string and byte in b"]}":
            depth -= 1
    return None


def test_the_depth_check_agrees_with_a_plain_scan():
    rng = random.Random(14)
    for _ in range(400):
        opening = rng.choice([0.5, 0.55, 0.6, 0.7])
        out = bytearray()
        for _ in range(rng.choice([300, 1000, 3000])):
            r = rng.random()
            out += (
                rng.choice([b"[", b"{"])
                if r < opening * 0.9
                else rng.choice([b'"a[\\"[', b'"{{"', b"1,"])
                if r < opening
                else rng.choice([b"]", b"}"])
            )
        data = bytes(out)
        assert vmdesc._first_too_deep(data) == deepest(data)
        if vmdesc._shallow(vmdesc._ESCAPE.sub(b"__", data)):
            assert deepest(data) is None


def nested(rng: random.Random, depth: int, deepest_allowed: int) -> bytes:
    """Balanced JSON-like text whose nesting reaches ``deepest_allowed`` once."""
    if depth == deepest_allowed:
        return b"1"
    inner = [nested(rng, depth + 1, deepest_allowed)]
    side = min(deepest_allowed, depth + 3)  # short branches beside the deep one
    inner += [nested(rng, depth + 1, rng.randint(depth + 1, side)) for _ in range(rng.randint(0, 2))]
    rng.shuffle(inner)
    inner.append(b'"[{\\"}"')
    opening, closing = rng.choice([(b"[", b"]"), (b"{", b"}")])
    return opening + b",".join(inner) + closing


@pytest.mark.parametrize("depth", [13, 99, 100, 101, 130])
def test_balanced_text_is_shallow_exactly_up_to_max_depth(depth):
    """For balanced brackets (QEMU's descriptions) the numpy-free check decides alone."""
    data = nested(random.Random(depth), 0, depth)
    assert vmdesc._shallow(vmdesc._ESCAPE.sub(b"__", data)) == (depth <= vmdesc.MAX_DEPTH)
    assert vmdesc._first_too_deep(data) == deepest(data)
    assert (deepest(data) is None) == (depth <= vmdesc.MAX_DEPTH)


def test_qemu_descriptions_are_shallow_without_numpy(paused_mr):
    with mappedram.open(paused_mr) as snap:
        offset, length = snap.vmdesc_location
        data = snap.read_bytes(offset + H.VMDESC_HEAD.size, length)
    assert data.count(b"[") + data.count(b"{") > vmdesc.MAX_DEPTH  # the first check does not decide
    assert vmdesc._shallow(data)
