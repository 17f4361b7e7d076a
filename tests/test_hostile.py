"""Hostile input: a quick fuzz run, the regression corpus, and resource bounds."""

from __future__ import annotations

import os
import tracemalloc

import pytest
from craft import block_info, patch, pattern_block, stream_claiming, write_snapshot
from fuzz_harness import CORPUS, exercise, make_seeds, run

import mappedram
from mappedram import FormatError
from mappedram.formats import structs as S
from mappedram.formats.bitmap import LITTLE_ENDIAN_64
from mappedram.mapper.encoder import StreamComposer


@pytest.fixture(scope="module")
def seeds(tmp_path_factory, paused_mr):
    return make_seeds(paused_mr, tmp_path_factory.mktemp("seeds"))


def test_seeds_are_real_and_valid(seeds):
    for seed in seeds:
        assert exercise(seed, seed.parent) == "ok"
        with mappedram.open(seed) as snap:
            assert len(snap.devices) == 33  # the fixture's device sections, carried over


def test_quick_fuzz_run(seeds, tmp_path):
    counts = run(seeds, 150, tmp_path, seed=12345)
    assert counts["ok"] + counts["format-error"] == 150
    assert counts["format-error"] > 0  # the mutations do reach the checks


def test_regression_corpus(tmp_path):
    cases = sorted(CORPUS.glob("*.bin"))
    assert cases, "the corpus keeps every input that ever failed"
    for case in cases:
        exercise(case, tmp_path)


def _peak_during(fn):
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_mapped_ram_block_claiming_2_60_bytes(tmp_path):
    path = write_snapshot(tmp_path / "huge.sav", {"pc.ram": pattern_block(4)})
    info = block_info(path, "pc.ram")
    patch(path, info["entry_offset"] + 1 + len("pc.ram"), S.RamWord.build(1 << 60))

    def attempt():
        with pytest.raises(FormatError) as err:
            mappedram.open(path)
        return err.value

    err, peak = _peak_during(attempt)
    assert (
        err.offset == info["bitmap_offset"]
        and "bitmap of 'pc.ram' (35184372088832 bytes) inside the file" in err.expected
    )
    assert peak < 4 << 20


def test_stream_claiming_2_60_bytes_allocates_nothing(tmp_path, paused_mr):
    """A classic stream may hold few pages of a huge guest: opening it must not allocate
    for the claimed size, and reading the block is refused clearly."""
    legacy = stream_claiming(tmp_path, 1 << 60)

    def walk():
        with mappedram.open(legacy) as snap:
            block = snap.block("pc.ram")
            assert block.used_length == 1 << 60 and block.populated == 4
            assert mappedram.verify(legacy).ok
            with pytest.raises(MemoryError, match="claims 1152921504606846976 bytes"):
                block.read()

    _, peak = _peak_during(walk)
    assert peak < 16 << 20


def test_name_of_255_bytes_with_nothing_behind(tmp_path):
    """A block entry cut after its name's length byte (255) and 10 of the name's bytes."""
    comp = StreamComposer(4096, capabilities=["mapped-ram"], machine="pc-q35-10.0")
    head = comp.head()
    pieces, _, _ = comp.ram_start(len(head), [("x" * 255, 1 << 20)], LITTLE_ENDIAN_64)
    (start_at, start), (entry_at, entry) = pieces[:2]
    assert (start_at, entry_at, entry[:1]) == (len(head), len(head) + len(start), b"\xff")
    data = head + start + entry[:11]
    path = tmp_path / "name.sav"
    path.write_bytes(data)
    with pytest.raises(FormatError) as err:
        mappedram.open(path)
    assert err.value.offset == entry_at and "RAM block entry 0" in err.value.expected
    assert "end of the file" in err.value.found


def test_vmdesc_length_of_4_gib(tmp_path, paused_mr):
    path = tmp_path / "vm.sav"
    with mappedram.open(paused_mr) as snap:
        devices = mappedram.DeviceState.from_snapshot(snap)
    write_snapshot(path, {"pc.ram": pattern_block(2)}, devices=devices, alignment=4096)
    with mappedram.open(path) as snap:
        at = snap.vmdesc_location[0]
        eof = snap.eof_offset
    patch(path, at + 1, b"\xff\xff\xff\xff")

    def check():
        report = mappedram.verify(path)
        return report

    report, peak = _peak_during(check)
    assert [(p.offset, p.text.split(",")[0]) for p in report.problems] == [
        (eof + 1, "expected the VM description or the end of the file after EOF")
    ]
    assert peak < 16 << 20
    assert os.path.getsize(path) < 1 << 20
