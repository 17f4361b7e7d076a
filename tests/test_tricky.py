"""Tricky files built with the schemas, each with the result it must give."""

from __future__ import annotations

import os

import numpy as np
import pytest
from craft import PAGE, block_info, patch, patch_header, pattern_block, section, truncate_copy, write_snapshot

import mappedram
from mappedram import FormatError
from mappedram.cli import main
from mappedram.formats import structs as S
from mappedram.formats.constants import RamFlag


@pytest.fixture
def two_blocks(tmp_path):
    blocks = {"pc.ram": pattern_block(64, zero=(3, 4, 40)), "extra": pattern_block(10, seed=2)}
    return write_snapshot(tmp_path / "two.bin", blocks), blocks


def problems(path, **kw):
    report = mappedram.verify(path, **kw)
    return [(p.offset, p.text) for p in report.problems]


def test_own_file_round_trip(two_blocks):
    path, blocks = two_blocks
    assert problems(path) == []
    with mappedram.open(path) as snap:
        assert snap.format == "mapped-ram"
        assert snap.capabilities == ("mapped-ram",)
        for name, data in blocks.items():
            block = snap.block(name)
            assert np.array_equal(block.read(), data)
            pages = data.reshape(-1, PAGE)
            assert block.populated == int(pages.any(axis=1).sum())
            assert block.pages_offset % (1 << 20) == 0


def test_stale_slot_behind_clear_bit(two_blocks):
    """QEMU's live saves leave old bytes behind cleared bits; readers must not show them."""
    path, blocks = two_blocks
    info = block_info(path, "pc.ram")
    patch(path, info["pages_offset"] + 3 * PAGE, b"\xee" * PAGE)  # page 3 is zero: its bit is clear
    with mappedram.open(path) as snap:
        block = snap.block("pc.ram")
        assert bytes(block.page(3)) == bytes(PAGE)
        assert not block.read()[3 * PAGE : 4 * PAGE].any()
        assert block.page_offset(3) is None
        assert block.page_offset(5) == info["pages_offset"] + 5 * PAGE
        restored = mappedram.restore(path)["pc.ram"]
        assert np.array_equal(restored, blocks["pc.ram"])
        reused = np.full(block.used_length, 0xAB, dtype=np.uint8)  # a dirty target buffer
        snap.restore_into({"pc.ram": reused}, channels=2)
        assert np.array_equal(reused, blocks["pc.ram"])
    assert problems(path) == []


@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_libvirt_header_prefix(tmp_path, byteorder):
    xml = b"<domain type='kvm'><name>t</name></domain>\0"
    data_len = len(xml) + 65536
    header = (S.LibvirtHeaderLE if byteorder == "little" else S.LibvirtHeaderBE).build({"data_len": data_len})
    prefix = header + xml + bytes(data_len - len(xml))
    data = pattern_block(16)
    path = write_snapshot(tmp_path / "lv.sav", {"pc.ram": data}, prefix=prefix)
    with mappedram.open(path) as snap:
        assert snap.libvirt is not None and snap.libvirt.complete
        assert snap.libvirt.byteorder == byteorder
        assert snap.libvirt.format == "sparse"
        assert snap.stream_start == 92 + data_len
        block = snap.block("pc.ram")
        # the mapped-ram offsets are absolute, prefix included
        assert block.bitmap_offset > snap.stream_start
        assert np.array_equal(block.read(), data)
    assert problems(path) == []
    patch(path, 0, b"LibvirtQemudPart")
    found = problems(path)
    assert found == [(0, "expected a complete libvirt save (LibvirtQemudSave), found LibvirtQemudPart")]


def test_stream_offset_without_libvirt_header(tmp_path):
    data = pattern_block(8)
    path = write_snapshot(tmp_path / "off.bin", {"pc.ram": data}, prefix=b"\x55" * 0x1000)
    with mappedram.open(path) as snap:  # found by the probe
        assert snap.stream_start == 0x1000
    with mappedram.open(path, offset=0x1000) as snap:
        assert np.array_equal(snap.block("pc.ram").read(), data)
    with pytest.raises(FormatError) as err:
        mappedram.open(path, offset=0x800)
    assert err.value.offset == 0x800 and "QEVM" in err.value.expected


def test_big_endian_bitmap(tmp_path):
    data = pattern_block(100, zero=tuple(range(1, 100)))  # only page 0 holds data
    path = write_snapshot(tmp_path / "be.bin", {"pc.ram": data}, bitmap_layout=mappedram.BIG_ENDIAN_64)
    with mappedram.open(path, bitmap_layout=mappedram.BIG_ENDIAN_64) as snap:
        block = snap.block("pc.ram")
        assert np.flatnonzero(block.present()).tolist() == [0]
        assert np.array_equal(block.read(), data)
    assert problems(path, bitmap_layout=mappedram.BIG_ENDIAN_64) == []
    with mappedram.open(path) as snap:  # read as little-endian, bit 0 lands on bit 56
        assert np.flatnonzero(snap.block("pc.ram").present()).tolist() == [56]
    assert main(["verify", "--bitmap-order", "big", str(path)]) == 0


def test_8k_pages(tmp_path):
    data = pattern_block(20, page_size=8192, zero=(7,))
    path = write_snapshot(tmp_path / "sparc.bin", {"sun4u.ram": data}, page_size=8192, machine_type="sun4u")
    with mappedram.open(path) as snap:
        assert snap.page_size == 8192 and snap.machine_type == "sun4u"
        block = snap.block("sun4u.ram")
        assert block.page_size == 8192 and block.num_pages == 20 and block.populated == 19
        assert np.array_equal(block.read(), data)
        assert bytes(block.page(7)) == bytes(8192)
    assert problems(path) == []


def test_truncated_everywhere(two_blocks, tmp_path):
    """Every cut gives a FormatError naming an offset, never another exception."""
    path, _ = two_blocks
    size = os.path.getsize(path)
    info = block_info(path, "extra")
    with mappedram.open(path) as snap:
        eof = snap.eof_offset
    cuts = [
        0,
        3,
        8,
        20,
        60,
        120,
        info["bitmap_offset"] + 2,
        info["pages_offset"] + 100,
        info["pages_offset"] + info["used_length"] + 3,
        eof,
        eof + 3,
        size - 1,
    ]
    for cut in cuts:
        short = truncate_copy(path, tmp_path / f"cut{cut}.bin", cut)
        found = problems(short)
        assert found, cut
        assert all(offset <= cut for offset, _ in found), (cut, found)
        assert main(["verify", str(short)]) == 1
        if cut > eof:  # only the description is cut: a problem, but the file still reads
            assert found == [
                (
                    eof + 1,
                    f"expected the VM description or the end of the file after EOF, found {cut - eof - 1} other bytes",
                )
            ]
            continue
        with pytest.raises(FormatError):
            with mappedram.open(short) as snap:
                snap.sections  # noqa: B018 - walks the stream
                for block in snap:
                    block.read()


def test_truncated_real_fixture(paused_mr, tmp_path):
    with mappedram.open(paused_mr) as snap:
        cut = snap.devices[5].offset + 7
    short = truncate_copy(paused_mr, tmp_path / "short.bin", cut)
    found = problems(short)
    assert len(found) == 1 and found[0][0] <= cut


def test_overlapping_regions(two_blocks):
    path, _ = two_blocks
    ram = block_info(path, "pc.ram")
    patch_header(path, "extra", bitmap_offset=ram["pages_offset"] + 2 * PAGE)  # inside pc.ram's pages
    found = problems(path)
    assert any("the bitmap of 'extra'" in text and "overlapping" in text for _, text in found), found
    with mappedram.open(path) as snap:
        snap.block("extra").populated  # noqa: B018 - still readable, just wrong


def test_bitmap_offset_past_end(two_blocks):
    path, _ = two_blocks
    size = os.path.getsize(path)
    info = patch_header(path, "extra", bitmap_offset=size + 4096)
    with pytest.raises(FormatError) as err:
        mappedram.open(path)
    assert err.value.offset == size + 4096
    assert "the bitmap of 'extra'" in err.value.expected
    assert f"{size:#x}" in err.value.found
    assert main(["dump", str(path)]) == 1
    assert info["bitmap_offset"] < size


def test_mapped_ram_header_version(two_blocks):
    path, _ = two_blocks
    info = patch_header(path, "pc.ram", version=2)
    with pytest.raises(FormatError) as err:
        mappedram.open(path)
    assert err.value.offset == info["header_offset"]
    assert "version 1" in err.value.expected and err.value.found == "2"


def test_misaligned_pages_offset(tmp_path):
    """QEMU refuses pages_offset not aligned to the page size ("region has bad alignment")."""
    data = pattern_block(4)
    path = write_snapshot(tmp_path / "mis.bin", {"pc.ram": data}, alignment=PAGE)
    info = block_info(path, "pc.ram")
    assert info["pages_offset"] % (1 << 20) != 0  # the smaller alignment is honoured
    assert problems(path) == []
    # move the pages 8 bytes back: the stream after them moves with them
    patch_header(path, "pc.ram", pages_offset=info["pages_offset"] - 8)
    with open(path, "r+b") as f:
        f.seek(info["pages_offset"])
        rest = f.read()
        f.seek(info["pages_offset"] - 8)
        f.write(rest)
        f.truncate()
    found = problems(path)
    assert any("pages_offset aligned" in text for _, text in found), found


def test_stray_bitmap_bits(two_blocks):
    path, _ = two_blocks
    info = block_info(path, "extra")  # 10 pages: bits 10..63 must be clear
    patch(path, info["bitmap_offset"] + 7, b"\x80")
    found = problems(path)
    assert any("bitmap bits past page 10 clear, found 1 set" in text for _, text in found), found
    with mappedram.open(path) as snap:
        assert snap.block("extra").populated == 10


def test_mem_size_mismatch(tmp_path):
    path = write_snapshot(tmp_path / "mem.bin", {"pc.ram": pattern_block(2)})
    with mappedram.open(path) as snap:
        word_at = snap.ram_section_offset + 1 + 4 + 1 + 3 + 8
    patch(path, word_at, S.RamWord.build(PAGE | RamFlag.MEM_SIZE))
    found = problems(path)
    assert (word_at - 17, "expected block lengths adding up to MEM_SIZE 4096, found 8192") in found, found


def test_footer_mismatch(two_blocks):
    path, _ = two_blocks
    start = section(path, "start", "ram")
    patch(path, start.end - 4, (99).to_bytes(4, "big"))
    found = problems(path)
    assert (start.end - 5, "expected the footer of section 2 (ram), found id 99") in found


def test_page_flag_in_mapped_ram_stream(two_blocks):
    path, _ = two_blocks
    part = section(path, "part", "ram")
    patch(path, part.payload_offset, S.RamWord.build(RamFlag.PAGE))
    found = problems(path)
    assert len(found) == 1
    assert found[0][0] == part.payload_offset
    assert "RAM flags valid under mapped-ram" in found[0][1]


def test_unknown_section_type(two_blocks):
    path, _ = two_blocks
    part = section(path, "part", "ram")
    patch(path, part.offset, b"\x42")
    assert problems(path) == [(part.offset, "expected a section type byte (0x00-0x08), found 0x42")]


def test_broken_vmdesc(paused_mr, tmp_path):
    path = truncate_copy(paused_mr, tmp_path / "vm.bin", os.path.getsize(paused_mr))
    with mappedram.open(path) as snap:
        json_at = snap.vmdesc_location[0] + 5
        devices = [(d.idstr, d.offset, d.end) for d in snap.devices]
    patch(path, json_at + 10, b"\x01")
    found = problems(path)
    assert (
        len(found) == 1
        and found[0][0] == json_at - 5
        and "expected a VM description in JSON, found Invalid control character" in found[0][1]
    )
    with mappedram.open(path) as snap:  # device sections found by their footers instead
        assert [(d.idstr, d.offset, d.end) for d in snap.devices] == devices


def test_bad_magic_and_version(tmp_path):
    path = write_snapshot(tmp_path / "v.bin", {"pc.ram": pattern_block(1)})
    patch(path, 4, (2).to_bytes(4, "big"))
    with pytest.raises(FormatError) as err:
        mappedram.open(path)
    assert (err.value.offset, err.value.found) == (4, "the obsolete v2")
    patch(path, 0, b"QEVX")
    with pytest.raises(FormatError) as err:
        mappedram.open(path)
    assert err.value.offset == 0 and "QEVM" in err.value.expected


def test_cli_exit_codes(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "missing")]) == 2
    assert "No such file" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert main(["dump", str(empty)]) == 1
    assert "offset 0x0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["dump"])
    assert exc.value.code == 2
    path = write_snapshot(tmp_path / "ok.bin", {"pc.ram": pattern_block(1)})
    assert main(["extract", str(path), "--block", "nope", "-o", str(tmp_path / "o")]) == 2
    assert "no RAM block 'nope'" in capsys.readouterr().err
