"""Stale slots: a clear bit with non-zero bytes in the slot (dump --stale, extract --stale)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import NAMES, fixture_file
from craft import PAGE, block_info, patch, pattern_block, write_snapshot

import mappedram
from mappedram.cli import main
from mappedram.mapper.stale import stale_slots


def count_by_reading(path) -> dict[str, int]:
    """Independent count: every clear page's slot read and tested, no holes skipped."""
    out = {}
    with mappedram.open(path) as snap, open(path, "rb") as f:
        for block in snap:
            n = 0
            for page in np.flatnonzero(~block.present()).tolist():
                f.seek(block.pages_offset + page * block.page_size)
                n += any(f.read(block.page_size))
            out[block.name] = n
    return out


@pytest.mark.parametrize("name", [n for n in NAMES if "legacy" not in n])
def test_real_files_agree_with_reading_every_slot(name):
    path = fixture_file(name)
    with mappedram.open(path) as snap:
        counted = {b.name: stale_slots(b, snap.size) for b in snap}
    assert counted == count_by_reading(path)


def planted(tmp_path, page_size=PAGE):
    """pc.ram with pages 3, 4, 5 and 40 zero (clear bits, hole slots); then old bytes put
    back in the slots of 3 and 40 and zeros written into the slot of 5."""
    path = write_snapshot(
        tmp_path / "live.sav", {"pc.ram": pattern_block(64, page_size, zero=(3, 4, 5, 40))}, page_size=page_size
    )
    info = block_info(path, "pc.ram")
    slot = lambda i: info["pages_offset"] + i * page_size  # noqa: E731
    old3, old40 = b"\x01" + bytes(page_size - 2) + b"\x02", b"secret" * 100
    patch(path, slot(3), old3)
    patch(path, slot(40) + 100, old40)
    patch(path, slot(5), bytes(page_size))  # data, but zero: not stale
    return path, {3: old3, 40: bytes(100) + old40 + bytes(page_size - 100 - len(old40))}


def test_planted_slots_counted_and_dumped(tmp_path, capsys):
    path, _ = planted(tmp_path)
    with mappedram.open(path) as snap:
        assert stale_slots(snap.block("pc.ram"), snap.size) == 2
    assert count_by_reading(path) == {"pc.ram": 2}
    assert main(["dump", "--json", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["blocks"][0]["stale_slots"] is None  # not counted by default
    assert main(["dump", "--json", "--stale", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["blocks"][0]["stale_slots"] == 2
    assert main(["dump", "--stale", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(i for i, x in enumerate(lines) if x.split()[:1] == ["block"])
    assert lines[head].split()[3] == "stale" and lines[head + 1].split()[:4] == ["pc.ram", str(64 * PAGE), "60/64", "2"]


def test_extract_stale_writes_the_old_bytes_at_their_pages(tmp_path, capsys):
    path, old = planted(tmp_path)
    out = tmp_path / "stale.raw"
    assert main(["extract", str(path), "--block", "pc.ram", "--stale", "-o", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert "2 stale slots" in line and "NOT the guest's RAM at save time" in line
    data = out.read_bytes()
    assert len(data) == 64 * PAGE
    expect = bytearray(64 * PAGE)
    for page, content in old.items():
        expect[page * PAGE : (page + 1) * PAGE] = content
    assert data == bytes(expect)
    fd = os.open(out, os.O_RDONLY)
    try:  # sparse: the first data is the first stale slot
        assert os.lseek(fd, 0, os.SEEK_DATA) == 3 * PAGE
    finally:
        os.close(fd)
    assert main(["extract", str(path), "--block", "pc.ram", "--stale", "-o", str(out)]) == 2  # no --force


def test_page_larger_than_a_filesystem_block_counted_once(tmp_path):
    """A 64 KiB page whose slot holds data, a hole, data: two data ranges, one slot."""
    page = 64 << 10
    path = write_snapshot(tmp_path / "big.sav", {"ram": pattern_block(8, page, zero=(2,))}, page_size=page)
    info = block_info(path, "ram")
    patch(path, info["pages_offset"] + 2 * page, b"A" * 4096)
    patch(path, info["pages_offset"] + 3 * page - 4096, b"B" * 4096)
    with mappedram.open(path) as snap:
        assert stale_slots(snap.block("ram"), snap.size) == 1


def test_sparse_huge_block_skips_its_holes(tmp_path):
    """A 16 GiB block, one page set, one stale slot near its end: the holes are skipped
    (reading them would be 16 GiB of zeros)."""
    from mappedram.formats.bitmap import LITTLE_ENDIAN_64
    from mappedram.formats.constants import CAP_MAPPED_RAM
    from mappedram.mapper.encoder import StreamComposer

    size = 16 << 30
    comp = StreamComposer(PAGE, capabilities=[CAP_MAPPED_RAM], machine="pc-q35-10.0")
    head = comp.head()
    pieces, (place,), end = comp.ram_start(len(head), [("pc.ram", size)], LITTLE_ENDIAN_64)
    path = tmp_path / "huge.sav"
    with open(path, "wb") as f:
        f.write(head)
        for offset, data in pieces:
            f.seek(offset)
            f.write(data)
        f.seek(place.bitmap_offset)
        f.write(b"\x01")  # page 0 set
        f.seek(place.pages_offset + (size // PAGE - 2) * PAGE)
        f.write(b"old")
        f.seek(end)
        f.write(comp.tail())
    with mappedram.open(path) as snap:
        assert stale_slots(snap.block("pc.ram"), snap.size) == 1


def test_classic_stream_has_no_slots(tmp_path, capsys):
    legacy = fixture_file("pc64-d-paused-legacy.bin")
    with mappedram.open(legacy) as snap:
        assert stale_slots(snap.block("pc.ram"), snap.size) is None
    assert main(["dump", "--json", "--stale", str(legacy)]) == 0
    assert {b["stale_slots"] for b in json.loads(capsys.readouterr().out)["blocks"]} == {None}
    out = tmp_path / "x.raw"
    assert main(["extract", str(legacy), "--block", "pc.ram", "--stale", "-o", str(out)]) == 2
    assert "stale slots exist only in mapped-ram files" in capsys.readouterr().err
    assert not out.exists()
