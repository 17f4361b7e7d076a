"""Files QEMU's or libvirt's loader refuses must not verify as valid (issue 11, items 5 and 6).

Each hostile file is a valid one with one element changed or inserted, built from the
construct schemas; each test checks the offset and what was expected, and the CLI's exit
code. The real QEMU fixtures must stay valid under the same rules.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from pathlib import Path

import pytest
import zstandard
from conftest import fixture_file
from craft import PAGE, patch, pattern_block, section, write_snapshot

import mappedram
from mappedram import FormatError
from mappedram.cli import main
from mappedram.formats import structs as S
from mappedram.formats.constants import SUB_CAPABILITIES, RamFlag, SectionType, VmCommand

XML = b"<domain type='kvm'><name>t</name></domain>\0"


def splice(path: Path, at: int, data: bytes) -> None:
    """Insert ``data`` at ``at`` (safe after the last block: nothing points past it)."""
    raw = path.read_bytes()
    path.write_bytes(raw[:at] + data + raw[at:])


def refused(path: Path, offset: int, expected: str) -> None:
    """verify finds exactly this problem (among possibly others), and the CLI exits 1."""
    report = mappedram.verify(path)
    assert report.ok is False
    found = [(p.offset, p.text) for p in report.problems]
    assert any(o == offset and expected in text for o, text in found), found
    assert main(["verify", str(path)]) == 1


@pytest.fixture
def mapped(tmp_path):
    return write_snapshot(tmp_path / "mr.sav", {"pc.ram": pattern_block(8, zero=(2,))})


@pytest.fixture
def classic(tmp_path, mapped):
    out = tmp_path / "stream.sav"
    mappedram.convert(mapped, out, "stream")
    assert mappedram.verify(out).ok
    return out


def libvirt_prefix(fmt: str | int, little_endian: bool = True, data_len: int = len(XML) + 4096, **fields) -> bytes:
    schema = S.LibvirtHeaderLE if little_endian else S.LibvirtHeaderBE
    header = schema.build({"data_len": data_len, "format": fmt, **fields})
    return header + (XML + bytes(data_len - len(XML)) if data_len else b"")


# -- RAM words (ram_load_precopy: switch on flags & ~CONTINUE) ------------------------------
@pytest.mark.parametrize(
    "flags, follows",
    [
        (0, b""),  # no kind at all: the old reader skipped it like a MULTIFD_FLUSH
        (RamFlag.CONTINUE, b""),
        (RamFlag.PAGE | RamFlag.ZERO, S.Name8.build("pc.ram") + bytes(PAGE)),  # read as a PAGE before
        (RamFlag.EOS | RamFlag.PAGE, b""),
    ],
    ids=["0", "CONTINUE", "PAGE|ZERO", "EOS|PAGE"],
)
def test_classic_stream_word_of_no_single_kind(classic, flags, follows):
    part = section(classic, "part", "ram")
    splice(classic, part.payload_offset, S.RamWord.build(int(flags)) + follows)
    refused(classic, part.payload_offset, "RAM flags valid under stream: one of ZERO, MEM_SIZE, PAGE, EOS")


def test_classic_stream_continue_eos_is_accepted(classic):
    """QEMU strips CONTINUE before it looks at the kind: CONTINUE|EOS ends the section."""
    end = section(classic, "end", "ram")
    patch(classic, end.payload_offset, S.RamWord.build(RamFlag.EOS | RamFlag.CONTINUE))
    assert mappedram.verify(classic).ok


def test_mapped_ram_zero_word(mapped):
    part = section(mapped, "part", "ram")
    splice(mapped, part.payload_offset, S.RamWord.build(0))
    refused(mapped, part.payload_offset, "RAM flags valid under mapped-ram: one of MEM_SIZE, EOS")


def test_mem_size_word_with_a_page_kind(mapped):
    with mappedram.open(mapped) as snap:
        at = section(mapped, "start", "ram").payload_offset
        total = snap.ram_total
    patch(mapped, at, S.RamWord.build(total | RamFlag.MEM_SIZE | RamFlag.PAGE))
    with pytest.raises(FormatError) as err:
        mappedram.open(mapped)
    assert err.value.offset == at and "the MEM_SIZE word" in err.value.expected
    refused(mapped, at, "the MEM_SIZE word (flag 0x04) opening the RAM section")


# -- VM commands (loadvm_process_command, mig_cmd_args) --------------------------------------
@pytest.mark.parametrize(
    "cmd, data, expected",
    [
        (0, b"", "a known VM command (OPEN_RETURN_PATH (1), PING (2)"),
        (0x1234, b"", "found cmd 0x1234"),
        (VmCommand.SWITCHOVER_START, b"\0\0\0\0", "a SWITCHOVER_START command with a payload of 0 bytes, found 4"),
        (VmCommand.PING, b"", "a PING command with a payload of 4 bytes, found 0"),
        (VmCommand.POSTCOPY_ADVISE, bytes(8), "a POSTCOPY_ADVISE command with a payload of 0 or 16 bytes, found 8"),
    ],
    ids=["INVALID", "0x1234", "SWITCHOVER_START-4", "PING-0", "POSTCOPY_ADVISE-8"],
)
def test_command_refused(mapped, cmd, data, expected):
    end = section(mapped, "end", "ram")
    splice(mapped, end.offset, bytes([SectionType.COMMAND]) + S.CommandBody.build({"cmd": int(cmd), "data": data}))
    refused(mapped, end.offset + 1, expected)
    assert main(["dump", str(mapped)]) == 0  # the walk goes on: the length frames it


def _command(cmd: str, data: bytes = b"") -> bytes:
    return bytes([SectionType.COMMAND]) + S.CommandBody.build({"cmd": cmd, "data": data})


def test_command_with_its_length_is_accepted(mapped):
    end = section(mapped, "end", "ram")
    splice(mapped, end.offset, _command("open_return_path") + _command("ping", bytes(4)))
    assert mappedram.verify(mapped).ok


def test_ping_without_a_return_path_refused(mapped):
    """savevm.c: a PING with no return path (none was opened before it) fails the load."""
    end = section(mapped, "end", "ram")
    splice(mapped, end.offset, _command("ping", bytes(4)) + _command("open_return_path") + _command("ping", bytes(4)))
    refused(mapped, end.offset + 1, "an OPEN_RETURN_PATH command before PING (no return path: QEMU refuses it)")
    assert [p.offset for p in mappedram.verify(mapped).problems] == [end.offset + 1]  # the second PING is fine


# -- libvirt header (virQEMUSaveFormat, qemuSaveImageOpen) -----------------------------------
@pytest.mark.parametrize("little_endian", [True, False])
def test_libvirt_unknown_format(tmp_path, little_endian):
    path = write_snapshot(tmp_path / "lv.sav", {"pc.ram": pattern_block(2)}, prefix=libvirt_prefix(77, little_endian))
    refused(path, 28, "a libvirt save format (0 raw, 1 gzip, 2 bzip2, 3 xz, 4 lzop, 5 zstd, 6 sparse), found 77")


@pytest.mark.parametrize(
    "fields, at, expected",
    [
        ({"data_len": 0}, 20, "a libvirt data_len above 0 (the domain XML follows the header), found 0"),
        ({"cookie_offset": len(XML) + 4097}, 32, f"a libvirt cookie offset inside the data area of {len(XML) + 4096}"),
        ({"cookie_offset": 5}, 32, "the libvirt domain XML to end with a NUL within its 5 bytes (cookie_offset)"),
        ({"cookie_offset": len(XML) - 1}, 32, f"a NUL within its {len(XML) - 1} bytes (cookie_offset), found none"),
    ],
    ids=["data_len-0", "cookie-past-data", "cookie-cuts-xml", "cookie-at-the-nul"],
)
def test_libvirt_data_area(tmp_path, fields, at, expected):
    path = write_snapshot(tmp_path / "lv.sav", {"pc.ram": pattern_block(2)}, prefix=libvirt_prefix("sparse", **fields))
    refused(path, at, expected)


def test_libvirt_xml_without_nul(tmp_path):
    """No cookie: the XML is all of data_len, and a NUL must end it there."""
    prefix = S.LibvirtHeaderLE.build({"data_len": len(XML) - 1, "format": "sparse"}) + XML[:-1]  # no NUL
    path = write_snapshot(tmp_path / "lv.sav", {"pc.ram": pattern_block(2)}, prefix=prefix)
    refused(path, 20, f"the libvirt domain XML to end with a NUL within its {len(XML) - 1} bytes (data_len)")


@pytest.mark.parametrize("cookie_offset", [0, len(XML), len(XML) + 100])
def test_libvirt_xml_ending_in_its_area_accepted(tmp_path, cookie_offset):
    prefix = libvirt_prefix("sparse", cookie_offset=cookie_offset)
    path = write_snapshot(tmp_path / "lv.sav", {"pc.ram": pattern_block(2)}, prefix=prefix)
    assert mappedram.verify(path).ok


@pytest.mark.parametrize("fmt", ["gzip", "zstd", "lzop"])
def test_libvirt_compressed_format_before_plain_stream(tmp_path, classic, fmt):
    path = tmp_path / "lv.sav"
    path.write_bytes(libvirt_prefix(fmt) + classic.read_bytes())
    refused(path, 28, f"{fmt}-compressed data as the header's format says, found an uncompressed QEMU stream")


def test_libvirt_raw_before_mapped_ram(tmp_path):
    path = write_snapshot(tmp_path / "lv.sav", {"pc.ram": pattern_block(2)}, prefix=libvirt_prefix("raw"))
    refused(path, 28, "a classic stream behind a libvirt header of format raw, found a mapped-ram stream")


def test_libvirt_sparse_before_classic_stream(tmp_path, classic):
    path = tmp_path / "lv.sav"
    path.write_bytes(libvirt_prefix("sparse") + classic.read_bytes())
    refused(path, 28, "a mapped-ram stream behind a libvirt header of format sparse, found a classic stream")
    path.write_bytes(libvirt_prefix("raw") + classic.read_bytes())
    assert mappedram.verify(path).ok


@pytest.mark.parametrize(
    "fmt, compress",
    [
        ("gzip", gzip.compress),
        ("bzip2", bz2.compress),
        ("xz", lambda b: lzma.compress(b, format=lzma.FORMAT_XZ)),
        ("zstd", zstandard.compress),
    ],
    ids=["gzip", "bzip2", "xz", "zstd"],
)
def test_libvirt_compressed_image_reads_forward_only(tmp_path, classic, capsys, fmt, compress):
    """Random access (the Snapshot class) is refused in one line naming what reads it;
    mappedram.open and the commands read it forward (tests/test_compressed.py)."""
    path = tmp_path / "lv.sav"
    prefix = libvirt_prefix(fmt)
    path.write_bytes(prefix + compress(classic.read_bytes()))
    with pytest.raises(FormatError) as err:
        mappedram.Snapshot(path)
    assert err.value.offset == len(prefix) and f"this libvirt image is {fmt}-compressed" in err.value.expected
    assert "mappedram.open()" in err.value.expected
    assert main(["dump", str(path)]) == 0
    assert mappedram.verify(path).ok


# -- x-ignore-shared (QEMU 11: both offsets 0, nothing reserved) -----------------------------
def ignore_shared_file(
    path: Path, *, caps=("mapped-ram", "x-ignore-shared"), shared_length=256 * PAGE, total=None
) -> Path:
    """A shared block left out of the file, then pc.ram with page 0 populated."""
    out = bytearray(S.QevmHeader.build({"version": 3}))
    out += S.ConfigurationHead.build({"machine": "pc-q35-11.0"})
    out += S.ConfigSubsection.build({"head": {"name": SUB_CAPABILITIES, "version_id": 1}, "body": {"names": caps}})
    out += bytes([SectionType.SECTION_START])
    out += S.SectionHeaderFull.build({"section_id": 2, "idstr": "ram", "instance_id": 0, "version_id": 4})
    out += S.RamWord.build((total or shared_length + 2 * PAGE) | RamFlag.MEM_SIZE)
    params = {"mapped_ram": True, "ignore_shared": "x-ignore-shared" in caps}

    def entry(name, length, addr, bitmap_offset, pages_offset):
        header = {"version": 1, "page_size": PAGE, "bitmap_offset": bitmap_offset, "pages_offset": pages_offset}
        return S.RamBlockEntry.build(
            {"idstr": name, "used_length": length, "addr": addr, "mapped_ram": header}, **params
        )

    out += entry("mem-shared", shared_length, 1 << 32, 0, 0)
    bitmap_at = len(out) + len(entry("pc.ram", 0, 0, 0, 0))
    pages_at = -(-(bitmap_at + 8) // PAGE) * PAGE
    out += entry("pc.ram", 2 * PAGE, 0, bitmap_at, pages_at)
    out += (1).to_bytes(8, "little") + bytes(pages_at - bitmap_at - 8)
    out += pattern_block(1).tobytes() + bytes(PAGE)
    footer = S.SectionFooter.build({"section_id": 2})
    out += S.RamWord.build(RamFlag.EOS) + footer
    out += bytes([SectionType.SECTION_END]) + S.SectionHeaderPart.build({"section_id": 2})
    out += S.RamWord.build(RamFlag.EOS) + footer + bytes([SectionType.EOF])
    path.write_bytes(out)
    return path


def test_ignore_shared_block_is_valid_and_not_in_the_file(tmp_path, capsys):
    path = ignore_shared_file(tmp_path / "shared.sav")
    report = mappedram.verify(path, hash_blocks=True)
    assert report.problems == [] and list(report.hashes) == ["pc.ram"]
    assert "block 'mem-shared' is not in the file (x-ignore-shared): no hash" in report.notes
    with mappedram.open(path) as snap:
        shared = snap.block("mem-shared")
        assert (shared.in_file, shared.populated, shared.addr) == (False, 0, 1 << 32)
        assert snap.block("pc.ram").in_file and snap.block("pc.ram").populated == 1
        assert snap.ram_total == shared.used_length + 2 * PAGE  # it counts toward MEM_SIZE
        assert bytes(shared.page(0)) == bytes(PAGE) and shared.page_offset(0) is None
    assert main(["dump", str(path)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "mem-shared" in x)
    assert "not in the file (x-ignore-shared)" in line and "0x" not in line, line  # no offsets for it
    assert main(["dump", "--json", str(path)]) == 0
    blocks = {b["name"]: b for b in json.loads(capsys.readouterr().out)["blocks"]}
    assert (blocks["mem-shared"]["in_file"], blocks["pc.ram"]["in_file"]) == (False, True)


def test_ignore_shared_block_extract_is_refused(tmp_path, capsys):
    path = ignore_shared_file(tmp_path / "shared.sav")
    out = tmp_path / "out.raw"
    assert main(["extract", str(path), "--block", "mem-shared", "-o", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "block 'mem-shared' is not in the file: x-ignore-shared" in err[0], err
    assert not out.exists()
    with mappedram.open(path) as snap, pytest.raises(ValueError, match="is not in the file"):
        mappedram.extract(snap, "mem-shared", out)
    assert main(["extract", str(path), "--block", "pc.ram", "-o", str(out)]) == 0
    assert out.read_bytes() == pattern_block(1).tobytes() + bytes(PAGE)


def test_ignore_shared_block_length_still_checked(tmp_path):
    path = ignore_shared_file(tmp_path / "shared.sav", shared_length=256 * PAGE + 512, total=258 * PAGE)
    with mappedram.open(path) as snap:
        entry = snap.block("mem-shared").entry_offset
        mem_size_at = snap.ram_section_offset
    refused(path, entry, "expected block 'mem-shared''s used_length to be a multiple of the page size 4096")
    refused(path, mem_size_at, f"expected block lengths adding up to MEM_SIZE {258 * PAGE}, found {258 * PAGE + 512}")
    # A MEM_SIZE that leaves the shared block out is used up by it: the list ends there.
    path = ignore_shared_file(tmp_path / "shared2.sav", total=2 * PAGE)
    with mappedram.open(path.with_name("shared.sav")) as snap:
        after_shared = snap.block("pc.ram").entry_offset
    refused(path, after_shared, "RAM flags valid under mapped-ram")


def test_zero_offsets_without_ignore_shared_are_refused(tmp_path):
    path = ignore_shared_file(tmp_path / "plain.sav", caps=("mapped-ram",))
    with pytest.raises(FormatError) as err:
        mappedram.open(path)
    assert err.value.offset == 0 and "page region of 'mem-shared'" in err.value.expected
    assert main(["verify", str(path)]) == 1


# -- the real QEMU files keep their verdict ---------------------------------------------------
@pytest.mark.parametrize("name", ["pc64-d-paused-legacy.bin", "pc64-c-live-mr-mfd4.bin"])
def test_real_fixtures_stay_valid(name):
    path = fixture_file(name)
    report = mappedram.verify(path)
    assert report.ok, report.problems
    with mappedram.open(path) as snap:
        assert all(b.in_file for b in snap)
        commands = [(s.command, s.payload_length) for s in snap.sections if s.kind == "command"]
    assert commands and all(c == ("switchover_start", 0) for c in commands), commands
