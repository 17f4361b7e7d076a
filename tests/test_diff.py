"""mappedram diff: pages compared as QEMU restores them, checked against numpy on the real fixtures."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import fixture_file
from craft import patch, pattern_block, truncate_copy, write_snapshot

import mappedram
from mappedram.cli import main
from mappedram.textsafe import printable
from mappedram.visual.diff import NotComparable

A = "pc64-a-paused-mr.bin"
LIVE = "pc64-c-live-mr-mfd4.bin"
LEGACY = "pc64-d-paused-legacy.bin"


def _expected(path_a: Path, path_b: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Independently: per block, (differing pages, of them present in A only, in B only),
    from the whole blocks read into memory and compared page by page."""
    out = {}
    with mappedram.open(path_a) as sa, mappedram.open(path_b) as sb:
        for name, ba in sa.blocks.items():
            bb = sb.block(name)
            rows_a = ba.read().reshape(ba.num_pages, ba.page_size)
            rows_b = bb.read().reshape(bb.num_pages, bb.page_size)
            differ = np.array([not np.array_equal(x, y) for x, y in zip(rows_a, rows_b)], dtype=bool)
            pa, pb = ba.present(), bb.present()
            out[name] = (np.flatnonzero(differ), np.flatnonzero(differ & pa & ~pb), np.flatnonzero(differ & pb & ~pa))
    return out


def _device_payloads(path: Path) -> dict[tuple[str, int], bytes]:
    with mappedram.open(path) as snap:
        return {(s.idstr, s.instance_id): snap.read_bytes(s.payload_offset, s.payload_length) for s in snap.devices}


def _copy(name: str, tmp_path: Path) -> Path:
    dest = tmp_path / name
    shutil.copyfile(fixture_file(name), dest)
    return dest


def _page_file_offset(path: Path, block: str, page: int) -> int:
    with mappedram.open(path) as snap:
        offset = snap.block(block).page_offset(page)
    assert offset is not None
    return offset


def test_diff_with_itself_is_empty(fixture_path, capsys):
    result = mappedram.diff(fixture_path, fixture_path)
    assert result.identical
    assert set(result.blocks) == set(mappedram.open(fixture_path).blocks)
    assert all(bd.count == 0 and bd.runs() == [] for bd in result.blocks.values())
    assert main(["diff", str(fixture_path), str(fixture_path)]) == 0
    assert "identical" in capsys.readouterr().out


@pytest.mark.parametrize("pair", [(A, LIVE), (A, LEGACY), ("pc64-b-paused-mr-mfd4.bin", LIVE)])
def test_diff_of_two_saves_matches_page_by_page_comparison(pair):
    path_a, path_b = (fixture_file(n) for n in pair)
    result = mappedram.diff(path_a, path_b)
    expected = _expected(path_a, path_b)
    assert set(result.blocks) == set(expected)
    for name, (pages, only_a, only_b) in expected.items():
        bd = result.blocks[name]
        assert np.array_equal(bd.pages, pages), name
        assert np.array_equal(bd.only_a, only_a) and np.array_equal(bd.only_b, only_b), name
        assert np.array_equal(np.flatnonzero(bd.mask()), pages)
        assert sum(count for _, count in bd.runs()) == len(pages)
    assert sum(len(p) for p, _, _ in expected.values()) > 1000  # two saves of a running guest differ
    # device state: the sections whose payload bytes differ
    da, db = _device_payloads(path_a), _device_payloads(path_b)
    changed = {key for key in da if key in db and da[key] != db[key]}
    assert {(d.idstr, d.instance_id) for d in result.devices if d.change == "changed"} == changed
    assert not result.identical


def test_diff_independent_of_chunks_and_workers():
    path_a, path_b = fixture_file(A), fixture_file(LEGACY)
    reference = mappedram.diff(path_a, path_b)
    for workers, chunk in [(1, 3 * 4096), (4, 5 * 4096), (3, 1 << 20)]:
        other = mappedram.diff(path_a, path_b, workers=workers, chunk_bytes=chunk)
        for name, bd in reference.blocks.items():
            assert np.array_equal(other.blocks[name].pages, bd.pages), (workers, chunk, name)
            assert np.array_equal(other.blocks[name].only_b, bd.only_b), (workers, chunk, name)


@pytest.mark.parametrize("source, to", [(LEGACY, "mapped-ram"), (A, "stream")])
def test_stream_and_its_conversion_are_identical(tmp_path, capsys, source, to):
    src = fixture_file(source)
    out = tmp_path / f"converted-{to}.sav"
    mappedram.convert(src, out, to)
    result = mappedram.diff(src, out)
    assert result.identical, [(bd.name, bd.count) for bd in result.blocks.values() if bd.count]
    assert main(["diff", str(src), str(out)]) == 0


def test_one_planted_byte_is_exactly_one_page(tmp_path, capsys):
    copy = _copy(A, tmp_path)
    page = 4000
    offset = _page_file_offset(copy, "pc.ram", page) + 1234
    with open(copy, "rb") as f:
        f.seek(offset)
        old = f.read(1)[0]
    patch(copy, offset, bytes([old ^ 0x5A]))
    result = mappedram.diff(fixture_file(A), copy)
    assert {n: bd.pages.tolist() for n, bd in result.blocks.items() if bd.count} == {"pc.ram": [page]}
    assert result.blocks["pc.ram"].changed.tolist() == [page] and not result.devices
    assert main(["diff", "--json", str(fixture_file(A)), str(copy)]) == 1
    out = json.loads(capsys.readouterr().out)
    (ram,) = [b for b in out["blocks"] if b["pages_differ"]]
    assert (ram["name"], ram["runs"], ram["changed"]) == ("pc.ram", [[page, 1]], 1)


def test_bytes_in_a_clear_page_slot_do_not_count(tmp_path):
    """A clear bit restores zeros whatever its slot in the page region holds."""
    copy = _copy(A, tmp_path)
    with mappedram.open(copy) as snap:
        ram = snap.block("pc.ram")
        clear = int(np.flatnonzero(~ram.present())[-1])
        slot = ram.pages_offset + clear * ram.page_size
    patch(copy, slot, b"\xff" * 64)
    assert mappedram.diff(fixture_file(A), copy).identical


def test_present_zero_page_equals_absent_page(tmp_path):
    """A page present and all zero in one file, absent in the other: identical, as QEMU
    restores both as zeros; against the original it is a page present in A only."""
    zeroed = _copy(A, tmp_path)
    with mappedram.open(zeroed) as snap:
        ram = snap.block("pc.ram")
        page = 5000
        assert ram.present()[page]
        slot, bitmap = ram.page_offset(page), ram.bitmap_offset
    patch(zeroed, slot, bytes(4096))
    cleared = tmp_path / "cleared.bin"
    shutil.copyfile(zeroed, cleared)
    with open(cleared, "rb") as f:
        f.seek(bitmap + page // 8)
        byte = f.read(1)[0]
    patch(cleared, bitmap + page // 8, bytes([byte & ~(1 << page % 8)]))  # little-endian words: LSB first
    with mappedram.open(cleared) as snap:
        assert not snap.block("pc.ram").present()[page]
    assert mappedram.diff(zeroed, cleared).identical
    back = mappedram.diff(fixture_file(A), cleared).blocks["pc.ram"]
    assert (back.pages.tolist(), back.only_a.tolist(), back.only_b.tolist()) == ([page], [page], [])


def test_different_vms_are_refused_with_one_line(tmp_path, capsys):
    other = write_snapshot(tmp_path / "other.sav", {"pc.ram": pattern_block(16)}, channels=1)
    with pytest.raises(NotComparable, match="different RAM blocks"):
        mappedram.diff(fixture_file(A), other)
    assert main(["diff", str(fixture_file(A)), str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not snapshots of one VM" in err and "vga.vram" in err


def test_unreadable_and_truncated_files_exit_2(tmp_path, capsys):
    assert main(["diff", str(fixture_file(A)), str(tmp_path / "missing.sav")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.sav" in err
    short = truncate_copy(fixture_file(A), tmp_path / "short.sav", 40 << 20)  # inside pc.ram's pages
    assert main(["diff", str(fixture_file(A)), str(short)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mappedram: ") and "Traceback" not in err
    cut = truncate_copy(fixture_file(LEGACY), tmp_path / "cut.sav", 30 << 20)  # in its page records
    assert main(["diff", str(fixture_file(LEGACY)), str(cut)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"mappedram: {cut}: offset ") and "page data" in err


def _qemu_missing() -> str | None:
    from qemu_vm import qemu_binary

    if qemu_binary() is not None and shutil.which("as") is not None:
        return None
    if os.environ.get("CI"):
        pytest.fail("CI needs qemu-system-x86_64 >= 10 and GNU as: run .ci/install-qemu")
    return "needs qemu-system-x86_64 >= 10.0 and GNU as (see .ci/install-qemu)"


@pytest.mark.qemu
def test_two_saves_of_one_running_guest(tmp_path):
    """One guest saved paused (mapped-ram), resumed, saved paused again (a classic stream):
    the diff finds exactly the pages a page-by-page comparison finds, among them every page
    whose counter the guest moved in between."""
    if why := _qemu_missing():
        pytest.skip(why)
    from qemu_vm import RAM_MB, Vm, boot_and_wait, build_guest, save

    image = build_guest(tmp_path)
    first, later = tmp_path / "first.sav", tmp_path / "later.sav"
    with Vm(tmp_path, image, name="diff") as vm:
        boot_and_wait(vm)
        save(vm, f"file:{first}", mapped_ram=True)  # stops the guest first
        vm.cmd("cont")
        before = vm.read_u32(0x100000)
        while vm.read_u32(0x100000) == before:
            time.sleep(0.05)
        save(vm, f"file:{later}", mapped_ram=False)
    result = mappedram.diff(first, later)
    for name, (pages, only_a, only_b) in _expected(first, later).items():
        bd = result.blocks[name]
        assert np.array_equal(bd.pages, pages) and np.array_equal(bd.only_a, only_a), name
        assert np.array_equal(bd.only_b, only_b), name
    stamped = np.arange(0x100, (RAM_MB - 1) << 8)  # the pages whose counters the guest increments
    with mappedram.open(first) as a, mappedram.open(later) as b:
        counters_a = a.block("pc.ram").read().view("<u4").reshape(-1, 1024)[stamped, 0]
        counters_b = b.block("pc.ram").read().view("<u4").reshape(-1, 1024)[stamped, 0]
    moved = stamped[counters_a != counters_b]
    assert len(moved) > 1000 and np.isin(moved, result.blocks["pc.ram"].pages).all()
    assert mappedram.diff(later, later).identical


def test_text_output_one_line_per_block_whatever_its_name(tmp_path, capsys):
    name = "ram\nforged: 0 of 4 pages differ"
    a = write_snapshot(tmp_path / "a.sav", {name: pattern_block(4, seed=1)}, channels=1)
    b = write_snapshot(tmp_path / "b.sav", {name: pattern_block(4, seed=2)}, channels=1)
    assert main(["diff", str(a), str(b)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(printable(name) + ": 4 of 4 pages differ")
