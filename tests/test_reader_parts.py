"""The reader in parts: a file that shrinks under an open Snapshot, the layout stated once,
the copy plan, and the facade's public attributes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import REPO, fixture_file

import mappedram

MR = "pc64-a-paused-mr.bin"
STREAM = "pc64-d-paused-legacy.bin"

# Runs in a child process, so that a SIGBUS shows as a negative return code instead of
# killing pytest. Opens one Snapshot per operation, shrinks the file, then runs each
# operation and prints what it did: "ok" or the exception's class and text.
_SHRINK_SCRIPT = r"""
import json, os, sys
import numpy as np
import mappedram
from mappedram.mapper.verify import block_sha256

path, cut, walked, out_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
OPS = ["page", "read", "read_into", "restore_into", "extents", "extract", "sha256", "verify"]
snaps = {op: mappedram.open(path) for op in OPS}
first = snaps["page"]
name = max(first.blocks.values(), key=lambda b: b.used_length).name
if walked:
    for snap in snaps.values():
        snap.sections  # the whole stream walked, the page index built, before the cut
with open(path, "r+b") as f:
    f.truncate(cut)

def last_page(snap):
    block = snap.block(name)
    ext = list(block.extents())[-1]
    return block.page(ext.first_page + ext.count - 1)

ops = {
    "page": lambda s: len(last_page(s)),
    "read": lambda s: s.block(name).read(),
    "read_into": lambda s: s.block(name).read_into(np.zeros(s.block(name).used_length, np.uint8)),
    "restore_into": lambda s: s.restore_into({name: np.zeros(s.block(name).used_length, np.uint8)}, channels=2),
    "extents": lambda s: sum(e.count for e in s.block(name).extents()),
    "extract": lambda s: mappedram.extract(s, name, os.path.join(out_dir, "out.raw")),
    "sha256": lambda s: block_sha256(s.block(name)),
    "verify": lambda s: mappedram.verify(path, hash_blocks=True).ok or "not valid",
}
result = {}
for op in OPS:
    try:
        value = ops[op](snaps[op])
        result[op] = ["ok", str(value)[:80]]
    except (mappedram.FormatError, OSError) as err:
        result[op] = [type(err).__name__, str(err)]
print(json.dumps(result))
"""


def _shrink(tmp_path: Path, fixture: str, fraction: float, walked: bool) -> dict[str, list[str]]:
    path = tmp_path / "shrinking.sav"
    shutil.copyfile(fixture_file(fixture), path)
    cut = int(path.stat().st_size * fraction)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _SHRINK_SCRIPT, str(path), str(cut), "1" if walked else "0", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def _assert_refused(result: dict[str, list[str]], ops: list[str]) -> None:
    for op in ops:
        kind, text = result[op]
        if op == "verify":
            assert kind == "ok" and text == "not valid", (op, kind, text)
            continue
        assert kind in ("FormatError", "OSError"), (op, kind, text)
        assert "offset" in text and "expected" in text, (op, text)


DATA_OPS = ["page", "read", "read_into", "restore_into", "extract", "sha256", "verify"]


@pytest.mark.parametrize("fraction", [0.5, 0.0])
def test_mapped_ram_file_shrinking_under_an_open_snapshot(tmp_path, fraction):
    result = _shrink(tmp_path, MR, fraction, walked=False)
    _assert_refused(result, DATA_OPS)
    if fraction == 0.0:  # the bitmaps are gone too
        _assert_refused(result, ["extents"])
    else:  # the bitmaps sit in the first half: the extents are still readable
        assert result["extents"][0] == "ok" and int(result["extents"][1]) > 0
    assert not (tmp_path / "out.raw").exists()  # the failed extract left nothing behind


@pytest.mark.parametrize("fraction", [0.5, 0.0])
@pytest.mark.parametrize("walked", [False, True])
def test_stream_file_shrinking_under_an_open_snapshot(tmp_path, fraction, walked):
    result = _shrink(tmp_path, STREAM, fraction, walked)
    _assert_refused(result, DATA_OPS if walked else [*DATA_OPS, "extents"])
    if walked:  # the index was built before the cut: it still says where the pages were
        assert result["extents"][0] == "ok" and int(result["extents"][1]) > 0
    assert not (tmp_path / "out.raw").exists()


# -- the reader in parts -------------------------------------------------------------


def _imports(path: Path, package: str) -> set[str]:
    """Modules of the package that ``path`` imports, anywhere in it (function bodies too)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            found |= {target, *(f"{target}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mappedram"):
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return found


def test_no_import_cycles():
    root = REPO / "mappedram"
    modules = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        modules[name.removesuffix(".__init__")] = (path, package)
    graph = {
        name: {m for m in _imports(path, package) if m in modules and m != name and not path.name == "__init__.py"}
        for name, (path, package) in modules.items()
    }
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            mod = todo.pop()
            assert mod != start, f"{start} imports itself through {sorted(seen)}"
            if mod not in seen:
                seen.add(mod)
                todo += graph.get(mod, ())
    assert "mappedram.mapper.snapshot" in graph["mappedram.mapper.restore"]  # the graph is real
    assert "mappedram.mapper.restore" not in graph["mappedram.mapper.snapshot"]


def _forward_only_fetch(f: Any, log: list[int]):
    """A fetch like a decompressor's: bytes in order, a skip reads and drops, no going back."""
    state = {"pos": 0}

    def fetch(offset: int, length: int) -> bytes:
        assert offset >= state["pos"], f"asked for {offset:#x} after {state['pos']:#x}"
        f.read(offset - state["pos"])
        data = f.read(length)
        state["pos"] = offset + len(data)
        log.append(offset)
        return data

    return fetch


def test_the_walker_reads_a_stream_forward_only():
    from mappedram.formats.policy import policy_for
    from mappedram.mapper.prologue import read_prologue
    from mappedram.mapper.ram_section import PageIndex, StreamRamSectionReader
    from mappedram.mapper.source import Cursor, Source
    from mappedram.mapper.walker import StreamWalker

    path = fixture_file(STREAM)
    with mappedram.open(path) as snap:
        expected = [s.describe() for s in snap.sections]
        vmdesc, vmdesc_offset, page_size = snap.vmdesc, snap.vmdesc_location[0], snap.page_size
        index = {b.name: b.index for b in snap}
    log: list[int] = []
    stream = open(path, "rb")
    cursor = Cursor(_forward_only_fetch(stream, log), path.stat().st_size, 0)
    prologue = read_prologue(cursor, explicit_start=False)
    problems: list = []
    holder: dict = {}
    pages = PageIndex(lambda: holder["walker"].walk())
    src = Source(path)  # the blocks' page reads; the walk does not use it
    policy = policy_for(prologue.configuration.capabilities)
    ram = StreamRamSectionReader(src, policy, page_size, problems, ignore_shared=False, index=pages)
    walker = StreamWalker(cursor, ram, problems, vmdesc=lambda: vmdesc, vmdesc_offset=vmdesc_offset)
    holder["walker"] = walker
    walker.walk()
    src.close()
    stream.close()
    assert [s.describe() for s in walker.sections] == expected
    assert log == sorted(log) and len(log) > 1
    for name, (page_numbers, offsets) in index.items():
        got = pages.pages(name)
        assert (got[0] == page_numbers).all() and (got[1] == offsets).all()
    assert problems == []


def test_layout_field_offsets_from_the_schema(paused_mr):
    import struct

    from mappedram.formats.layout import HEADER_FIELDS, HEADER_SIZE

    # MappedRamHeader: be32 version, be64 page_size, be64 bitmap_offset, be64 pages_offset
    sizes = [struct.calcsize(">I"), struct.calcsize(">Q"), struct.calcsize(">Q"), struct.calcsize(">Q")]
    starts = [sum(sizes[:i]) for i in range(4)]
    assert HEADER_FIELDS == dict(zip(["version", "page_size", "bitmap_offset", "pages_offset"], starts))
    assert HEADER_SIZE == sum(sizes)
    with mappedram.open(paused_mr) as snap:
        for block in snap:
            place = block.place
            for field in HEADER_FIELDS:
                width = 4 if field == "version" else 8
                raw = snap.read_bytes(place.field_offset(field), width)
                assert int.from_bytes(raw, "big") == getattr(block, field if field != "version" else "version")
            assert place.header_end == place.bitmap_offset  # QEMU puts the bitmap right after the header


def test_reader_and_writer_share_the_placement_rule(tmp_path):
    from craft import pattern_block, write_snapshot

    from mappedram.formats.bitmap import LITTLE_ENDIAN_64
    from mappedram.formats.layout import place_block

    path = write_snapshot(tmp_path / "two.sav", {"a": pattern_block(5), "bb": pattern_block(3, zero=(1,))})
    with mappedram.open(path) as snap:
        for block in snap:
            assert block.place == place_block(
                block.name, block.used_length, block.page_size, block.entry_offset, LITTLE_ENDIAN_64
            )


@pytest.mark.parametrize("name", [MR, STREAM])
def test_snapshot_mode_and_describe_keys(name):
    from mappedram.formats.policy import Mode

    with mappedram.open(fixture_file(name)) as snap:
        assert snap.mode is (Mode.MAPPED_RAM if name == MR else Mode.STREAM) and Mode is mappedram.Mode
        assert snap.format == snap.mode.value
        info = snap.describe()
        mapped = snap.mode is Mode.MAPPED_RAM
    assert list(info) == [  # README's Library section: keys are only ever added
        "file", "size", "format", "libvirt", "stream_start", "version", "machine_type", "capabilities",
        "target_page_bits", "uuid", "page_size", "ram_total", "ram_section_offset", "blocks", "vmdesc",
        "sections", "eof_offset",
    ]  # fmt: skip
    block_keys = ["name", "used_length", "page_size", "pages_total", "pages_present", "entry_offset", "addr", "in_file"]
    if mapped:
        block_keys += ["header_offset", "mapped_ram_version", "bitmap_offset", "bitmap_size", "pages_offset"]
    block_keys.append("stale_slots")  # null unless counted (describe(stale=True), dump --stale)
    assert all(list(b) == block_keys for b in info["blocks"])


def test_unknown_flag_bits_are_named_as_such(tmp_path):
    from craft import patch, pattern_block, section, write_snapshot

    from mappedram.formats.constants import RamFlag
    from mappedram.mapper.convert import to_stream

    mr = write_snapshot(tmp_path / "mr.sav", {"pc.ram": pattern_block(4)})
    path = tmp_path / "stream.sav"
    with mappedram.open(mr) as snap:
        to_stream(snap, path)
    part = section(path, "part", "ram")

    # The first page record's word, with MEM_SIZE and a bit no RamFlag names (0x400) added.
    with open(path, "rb") as f:
        f.seek(part.payload_offset)
        word = int.from_bytes(f.read(8), "big")
    patch(path, part.payload_offset, (word | RamFlag.MEM_SIZE | 0x400).to_bytes(8, "big"))
    with pytest.raises(mappedram.FormatError) as err:
        with mappedram.open(path) as snap:
            snap.sections
    assert err.value.offset == part.payload_offset
    assert err.value.expected.startswith("RAM flags valid under stream"), err.value


# -- the copy plan ------------------------------------------------------------------


def _check_plan(block, start: int, end: int, piece: int) -> tuple[int, int]:
    """Steps cover [start, end) in order; data steps hold present pages, gaps absent ones."""
    from mappedram.mapper.copy_plan import GAP, copy_plan

    present = block.present()
    ps = block.page_size
    at, data = start, 0
    for steps in copy_plan(block.extent_arrays(), ps, start, end, piece):
        for dest, length, file_offset in steps:
            assert dest == at and length > 0
            pages = present[dest // ps : -(-(dest + length) // ps)]
            if file_offset == GAP:
                assert not pages.any()
            else:
                assert pages.all() and length <= piece
                assert file_offset == block.page_offset(dest // ps) + dest % ps
                data += length
            at = dest + length
    assert at == end
    return at, data


@pytest.mark.parametrize("name", [MR, STREAM])
def test_copy_plan_covers_the_block_and_clips(name):
    with mappedram.open(fixture_file(name)) as snap:
        block = snap.block("pc.ram")
        _, data = _check_plan(block, 0, block.used_length, 1 << 20)
        assert data == block.populated * block.page_size
        # a range cut inside pages at both ends, as export-elf's regions may be
        start, end = 0xA0000 + 123, block.used_length // 2 + 77
        _check_plan(block, start, end, 3 * block.page_size)


def _deltas(calls: list[int]) -> list[int]:
    return [b - a for a, b in zip([0, *calls], calls)]


def test_progress_moves_in_pieces(paused_mr, tmp_path):
    """A block's progress moves at least every MiB of page data, not once per run."""
    from mappedram.formats.constants import MAPPED_RAM_LOAD_BUF_SIZE as PIECE
    from mappedram.mapper.parallel_load import ITEM_BYTES

    with mappedram.open(paused_mr) as snap:
        block = snap.block("pc.ram")
        total = block.populated * block.page_size
        assert max(e.count for e in block.extents()) * block.page_size > 4 * PIECE  # long runs to cut
        seen: dict[str, list[int]] = {"read_into": [], "extract": [], "restore_into": []}
        block.read(progress=lambda done, _: seen["read_into"].append(done))
        mappedram.extract(snap, "pc.ram", tmp_path / "ram.raw", progress=lambda d, _: seen["extract"].append(d))
        target = {"pc.ram": np.zeros(block.used_length, np.uint8)}
        snap.restore_into(target, channels=1, progress=lambda d, _: seen["restore_into"].append(d))
    for what, calls in seen.items():
        assert calls[-1] == total, what
        limit = PIECE if what != "restore_into" else ITEM_BYTES + PIECE  # a channel item: about 4 MiB of pieces
        assert max(_deltas(calls)) <= limit, what


def test_hash_of_a_huge_claim_is_chunked(tmp_path):
    """A stream block claiming far more RAM than the file holds: its hash is fed zeros
    from one shared buffer, so memory stays bounded whatever the claim."""
    import hashlib
    import tracemalloc

    from craft import pattern_block, stream_claiming

    from mappedram.mapper.verify import block_sha256

    pages = pattern_block(4)
    claim = 256 << 20
    legacy = stream_claiming(tmp_path, claim, pages)
    expected = hashlib.sha256(pages.tobytes())
    zeros = bytes(1 << 20)
    for _ in range((claim - len(pages)) // len(zeros)):
        expected.update(zeros)
    expected.update(zeros[: (claim - len(pages)) % len(zeros)])
    with mappedram.open(legacy) as snap:
        block = snap.block("pc.ram")
        block.populated  # the index, walked before measuring
        calls: list[int] = []
        tracemalloc.start()
        try:
            digest = block_sha256(block, calls.append)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert digest == expected.hexdigest()
    assert peak < 24 << 20  # the shared zero buffer and one 8 MiB piece, not the claim
    assert calls[-1] == claim and max(_deltas(calls)) <= 8 << 20


@pytest.mark.parametrize("page_size", [0, 3000, 1 << 31])
def test_header_page_size_checked_before_use(tmp_path, page_size):
    from craft import patch_header, pattern_block, write_snapshot

    path = write_snapshot(tmp_path / "ps.sav", {"pc.ram": pattern_block(4)})
    info = patch_header(path, "pc.ram", page_size=page_size)
    with pytest.raises(mappedram.FormatError) as err:
        mappedram.open(path)
    assert err.value.offset == info["header_offset"] + 4  # be32 version, then the be64 page size
    assert err.value.expected == "a power-of-two page size for 'pc.ram'" and err.value.found == str(page_size)


def test_a_failed_walk_fails_again_the_same_way(tmp_path):
    """The walk never resumes inside the element it failed in."""
    from craft import truncate_copy

    path = fixture_file(STREAM)
    cut = truncate_copy(path, tmp_path / "cut.sav", path.stat().st_size // 2)
    with mappedram.open(cut) as snap:
        block = snap.block("pc.ram")
        with pytest.raises(mappedram.FormatError) as first:
            snap.sections
        for again in (lambda: block.populated, lambda: snap.eof_offset, lambda: snap.sections):
            with pytest.raises(mappedram.FormatError) as err:
                again()
            assert str(err.value) == str(first.value)
    assert "end of the file" in first.value.found


def test_device_sizes_that_are_no_numbers_fall_back_to_the_footers(tmp_path, paused_mr):
    """A VM description is free-form JSON: a field size of Infinity is a problem (the
    description is refused where it is loaded), and the device sections are delimited by
    their footers instead."""
    import dataclasses

    from craft import pattern_block, write_snapshot

    with mappedram.open(paused_mr) as snap:
        devices = mappedram.DeviceState.from_snapshot(snap)
    broken = json.loads(json.dumps(devices.descriptions))
    sized = next(d for d in broken if d.get("fields"))
    sized["fields"][0]["size"] = float("inf")
    devices = dataclasses.replace(devices, descriptions=broken)
    path = write_snapshot(tmp_path / "inf.sav", {"pc.ram": pattern_block(4)}, devices=devices)
    with mappedram.open(path) as snap:
        names = [s.idstr for s in snap.devices]
        problems = [p.text for p in snap.problems]
    assert sized["name"] in names and len(names) == len(broken)
    assert len(problems) == 1 and "found Infinity, which is not JSON" in problems[0], problems


def test_every_word_is_judged_by_the_policy():
    """A rule on a combination of known flags, added to the policy, reaches the record
    loop: the loop asks the policy once per flags value, not a bit mask of its own."""
    import dataclasses

    from mappedram.formats.constants import RamFlag
    from mappedram.formats.policy import ModePolicy, policy_for
    from mappedram.mapper.prologue import read_prologue
    from mappedram.mapper.ram_section import PageIndex, StreamRamSectionReader
    from mappedram.mapper.source import Source
    from mappedram.mapper.walker import StreamWalker

    class NoZeroPages(ModePolicy):
        def word_problem(self, flags: int) -> str | None:
            if flags & RamFlag.ZERO:
                return "no ZERO records (a test rule)"
            return super().word_problem(flags)

    path = fixture_file(STREAM)
    with mappedram.open(path) as snap:
        first_part = next(s for s in snap.sections if s.idstr == "ram" and s.kind == "part")
        vmdesc = snap.vmdesc
    src = Source(path)
    try:
        cursor = src.cursor(0)
        prologue = read_prologue(cursor, explicit_start=False)
        stock = policy_for(prologue.configuration.capabilities)
        policy = NoZeroPages(**{f.name: getattr(stock, f.name) for f in dataclasses.fields(stock)})
        problems: list = []
        holder: dict = {}
        ram = StreamRamSectionReader(
            src, policy, 4096, problems, ignore_shared=False, index=PageIndex(lambda: holder["w"].walk())
        )
        walker = holder["w"] = StreamWalker(cursor, ram, problems, vmdesc=lambda: vmdesc, vmdesc_offset=None)
        with pytest.raises(mappedram.FormatError) as err:
            walker.walk()
    finally:
        src.close()
    assert err.value.expected == "no ZERO records (a test rule)"
    assert err.value.offset >= first_part.payload_offset
    with mappedram.open(path) as snap:
        word = int.from_bytes(snap.read_bytes(err.value.offset, 8), "big")
    assert word & 0xFFF & RamFlag.ZERO  # the walk stopped at a ZERO record
