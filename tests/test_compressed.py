"""Compressed libvirt images (gzip, bzip2, xz, lzop, zstd) read in one forward pass.

The images are built as libvirt writes them, without libvirt: its 92-byte header, the
domain XML and a cookie padded to data_len, then QEMU's classic stream (the committed
fixture pc64-d-paused-legacy) through each compressor. Every command's result is held
against the same image uncompressed (raw) and against the manifest's QEMU ground truth.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import zstandard
from conftest import fixture_file, load_manifest
from test_physical import elf_loads

import mappedram
from mappedram.cli import main
from mappedram.formats import structs as S
from mappedram.mapper.encoder import StreamComposer
from mappedram.mapper.prologue import CompressedImage

LEGACY = "pc64-d-paused-legacy.bin"
PAGE = 4096
XML = b"<domain type='qemu'><name>guest</name><memory unit='KiB'>65536</memory></domain>\n\0"
COOKIE = b"<cookie><cpu mode='custom'/></cookie>\n\0"
PAD = 64 * 1024  # virQEMUSaveDataWrite's room for a longer XML


def _lzop(data: bytes) -> bytes:
    return subprocess.run(["lzop", "-c"], input=data, stdout=subprocess.PIPE, check=True).stdout


COMPRESS = {
    "gzip": gzip.compress,
    "bzip2": bz2.compress,
    "xz": lambda b: lzma.compress(b, format=lzma.FORMAT_XZ),
    "zstd": zstandard.compress,
    "lzop": _lzop,
}
FORMATS = [
    pytest.param(f, marks=pytest.mark.skipif(f == "lzop" and not shutil.which("lzop"), reason="needs lzop"))
    for f in COMPRESS
]


def libvirt_header(fmt: str, was_running: int = 1) -> bytes:
    """virQEMUSaveDataWrite's layout: header, XML, cookie, zeros to data_len."""
    data = XML + COOKIE
    header = S.LibvirtHeaderLE.build(
        {"data_len": len(data) + PAD, "format": fmt, "was_running": was_running, "cookie_offset": len(XML)}
    )
    return header + data + bytes(PAD)


def write_image(path: Path, fmt: str, stream: bytes) -> Path:
    body = stream if fmt in ("raw", "sparse") else COMPRESS[fmt](stream)
    path.write_bytes(libvirt_header(fmt) + body)
    return path


@pytest.fixture(scope="module")
def legacy_stream() -> bytes:
    return fixture_file(LEGACY).read_bytes()


@pytest.fixture(scope="module")
def images(tmp_path_factory, legacy_stream) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("images")
    fmts = ["raw"] + [f for f in COMPRESS if f != "lzop" or shutil.which("lzop")]
    return {fmt: write_image(out / f"img.{fmt}", fmt, legacy_stream) for fmt in fmts}


def qemu_hashes() -> dict[str, str]:
    return {b["name"]: b["sha256"] for b in load_manifest(LEGACY)["blocks"] if "sha256" in b}


# -- every command, against the raw image and QEMU's ground truth -----------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_dump_equals_the_raw_image(images, fmt, capsys):
    with mappedram.open(images[fmt]) as snap, mappedram.open(images["raw"]) as raw:
        assert isinstance(snap, mappedram.ForwardSnapshot) and snap.compressor == fmt
        ours, theirs = snap.describe(), raw.describe()
        assert ours.pop("libvirt")["format"] == fmt and theirs.pop("libvirt")["format"] == "raw"
        for key in ("file", "size"):
            ours.pop(key), theirs.pop(key)
        assert ours == theirs  # offsets of the uncompressed stream: blocks, sections, description
        assert snap.problems == raw.problems == []
        assert snap.vmdesc == raw.vmdesc and snap.devices
    assert main(["dump", str(images[fmt])]) == 0
    out = capsys.readouterr().out
    assert f"format {fmt}" in out and "pc.ram" in out


@pytest.mark.parametrize("fmt", FORMATS)
def test_verify_hash_matches_qemu(images, fmt, capsys):
    report = mappedram.verify(images[fmt], hash_blocks=True)
    raw = mappedram.verify(images["raw"], hash_blocks=True)
    assert report.ok and report.notes == raw.notes
    assert report.hashes == raw.hashes
    for name, digest in qemu_hashes().items():
        assert report.hashes[name] == digest, name
    assert main(["verify", "--hash", str(images[fmt])]) == 0
    assert f"{qemu_hashes()['pc.ram']}  pc.ram" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", FORMATS)
def test_extract_restore_and_export_elf_equal_the_raw_image(images, fmt, tmp_path):
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    assert main(["extract", str(images[fmt]), "--block", "pc.ram", "-o", str(ours)]) == 0
    assert main(["extract", str(images["raw"]), "--block", "pc.ram", "-o", str(theirs)]) == 0
    assert ours.read_bytes() == theirs.read_bytes()
    assert hashlib.sha256(ours.read_bytes()).hexdigest() == qemu_hashes()["pc.ram"]
    assert os.stat(ours).st_blocks * 512 < os.path.getsize(ours)  # absent pages are holes
    restored = mappedram.restore(images[fmt])
    for name, digest in qemu_hashes().items():
        assert hashlib.sha256(restored[name]).hexdigest() == digest
    core, raw_core = tmp_path / "ours.elf", tmp_path / "theirs.elf"
    assert main(["export-elf", str(images[fmt]), "-o", str(core)]) == 0
    assert main(["export-elf", str(images["raw"]), "-o", str(raw_core)]) == 0
    ours_loads, theirs_loads = elf_loads(core), elf_loads(raw_core)
    assert [(a, n) for a, n, _ in ours_loads] == [(a, n) for a, n, _ in theirs_loads]
    with open(core, "rb") as a, open(raw_core, "rb") as b:  # the same memory in every segment
        for (_, size, at_a), (_, _, at_b) in zip(ours_loads, theirs_loads):
            assert os.pread(a.fileno(), size, at_a) == os.pread(b.fileno(), size, at_b)


def test_restore_into_caller_buffers(images):
    with mappedram.open(images["zstd"]) as snap:
        target = np.full(snap.block("pc.bios").used_length, 0xAA, dtype=np.uint8)
        stats = snap.restore_into({"pc.bios": target})
        assert hashlib.sha256(target).hexdigest() == qemu_hashes()["pc.bios"]
        assert stats.bytes_read == snap.block("pc.bios").populated * PAGE


# -- what needs random access, and a second pass ---------------------------------------------
def test_random_access_is_refused_in_one_line(images):
    path = images["zstd"]
    with pytest.raises(CompressedImage) as err:
        mappedram.Snapshot(path)
    assert "mappedram.open()" in str(err.value) and "\n" not in str(err.value)
    with mappedram.open(path) as snap:
        block = snap.block("pc.ram")
        for call in (lambda: block.page(3), lambda: list(block.extents()), lambda: snap.read_bytes(0, 10)):
            with pytest.raises(mappedram.FormatError, match="reads in one forward pass") as err:
                call()
            assert "\n" not in str(err.value)
        assert block.populated == 15920  # the metadata walk is fine...
        with pytest.raises(mappedram.FormatError, match="open it again"):
            snap.restore_into({"pc.ram": np.zeros(block.used_length, dtype=np.uint8)})  # ...but the pages passed


# -- damaged and hostile images --------------------------------------------------------------
def _one_line_error(path: Path, capsys, *needles: str) -> str:
    for command in (["dump"], ["verify", "--hash"]):
        assert main([*command, str(path)]) == 1
        captured = capsys.readouterr()
        text = captured.err + captured.out
        assert text.count("\n") == 1, text
        for needle in needles:
            assert needle in text, text
    return text


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_compressed_data(images, fmt, tmp_path, capsys):
    data = images[fmt].read_bytes()
    cut = tmp_path / "cut.sav"
    cut.write_bytes(data[: len(data) * 2 // 3])
    _one_line_error(cut, capsys, "expected")


def test_damaged_compressed_data(images, tmp_path, capsys):
    data = bytearray(images["gzip"].read_bytes())
    start = len(libvirt_header("gzip"))
    data[start + 2000 : start + 2100] = bytes(100)
    bad = tmp_path / "bad.sav"
    bad.write_bytes(bytes(data))
    _one_line_error(bad, capsys, "gzip-compressed data that decompresses")


def test_stream_that_ends_inside_a_page(tmp_path, legacy_stream, capsys):
    """Valid compressed data, a stream cut inside a page's data: the offset of that page."""
    with mappedram.open(fixture_file(LEGACY)) as raw:
        offsets = raw.block("pc.ram").index[1]
    cut_at = int(offsets[100]) + 1000
    path = write_image(tmp_path / "cut.sav", "zstd", legacy_stream[:cut_at])
    page_at = len(libvirt_header("zstd")) + int(offsets[100])
    _one_line_error(path, capsys, f"offset {page_at:#x}", "4096 bytes of page data")


def test_mapped_ram_behind_a_compressed_header_is_refused(tmp_path, capsys):
    mr = fixture_file("pc64-a-paused-mr.bin").read_bytes()[: 4 << 20]
    path = write_image(tmp_path / "mr.sav", "zstd", mr)
    _one_line_error(path, capsys, "a classic stream behind a zstd-compressed libvirt header")


def _stream_with_repeat() -> tuple[bytes, bytes, bytes]:
    """A stream whose page 3 of 'a' comes twice (a hostile file, or a live save's second
    pass), 'b' in order; and the data 'a' restores to."""
    comp = StreamComposer(PAGE)
    head = comp.head()
    pieces, _, _ = comp.ram_start(len(head), [("a", 8 * PAGE), ("b", 4 * PAGE)])
    first, second = bytes([1]) * PAGE, bytes([2]) * PAGE
    out = head + b"".join(p for _, p in pieces) + comp.part_start()
    out += comp.page_record("a", 3, first) + comp.page_record(None, 5, first) + comp.page_record(None, 3, second)
    out += comp.page_record("b", 1, first) + comp.section_end() + comp.tail()
    restored = bytes(3 * PAGE) + second + bytes(PAGE) + first + bytes(2 * PAGE)
    return out, restored, bytes(PAGE) + first + bytes(2 * PAGE)


def test_a_repeated_page_leaves_that_hash_out_and_extract_right(tmp_path):
    stream, a_restored, b_restored = _stream_with_repeat()
    path = write_image(tmp_path / "rep.sav", "xz", stream)
    report = mappedram.verify(path, hash_blocks=True)
    assert report.ok
    assert report.hashes == {"b": hashlib.sha256(b_restored).hexdigest()}
    assert len(report.notes) == 1 and "block 'a': no sha256 in one forward pass (page 3 comes again" in report.notes[0]
    out = tmp_path / "a.raw"
    assert main(["extract", str(path), "--block", "a", "-o", str(out)]) == 0
    assert out.read_bytes() == a_restored  # the later record wins
    assert bytes(mappedram.restore(path)["a"]) == a_restored


def test_a_zero_record_after_data_clears_the_page(tmp_path):
    comp = StreamComposer(PAGE)
    head = comp.head()
    pieces, _, _ = comp.ram_start(len(head), [("a", 4 * PAGE)])
    body = comp.page_record("a", 1, bytes([9]) * PAGE) + comp.page_record(None, 1, None)
    body += comp.page_record(None, 2, bytes([8]) * PAGE)
    stream = head + b"".join(p for _, p in pieces) + comp.part_start() + body + comp.section_end() + comp.tail()
    path = write_image(tmp_path / "z.sav", "bzip2", stream)
    with mappedram.open(path) as snap:
        assert snap.block("a").populated == 1
    assert bytes(mappedram.restore(path)["a"]) == bytes(2 * PAGE) + bytes([8]) * PAGE + bytes(PAGE)
    out = tmp_path / "a.raw"
    (tmp_path / "a.raw").write_bytes(b"")
    assert main(["extract", str(path), "--block", "a", "-o", str(out), "--force"]) == 0
    assert out.read_bytes() == bytes(2 * PAGE) + bytes([8]) * PAGE + bytes(PAGE)


def test_missing_lzop_program_says_what_to_install(images, tmp_path, monkeypatch, capsys):
    path = write_image(tmp_path / "lz.sav", "lzop", b"\x89LZO\x00\r\n\x1a\n" + bytes(100))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert main(["dump", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "apt-get install lzop" in err


# -- memory: bounded whatever the guest ------------------------------------------------------
def sparse_guest_stream(ram: int, every: int, seed: int = 5) -> Iterator[bytes]:
    """A classic stream of one block claiming ``ram`` bytes, a random page every
    ``every`` bytes (spread over all of it), in pieces."""
    comp = StreamComposer(PAGE)
    head = comp.head()
    pieces, _, _ = comp.ram_start(len(head), [("pc.ram", ram)])
    yield head + b"".join(p for _, p in pieces) + comp.part_start()
    rng = np.random.default_rng(seed)
    name: str | None = "pc.ram"
    for page in range(0, ram // PAGE, every // PAGE):
        yield comp.page_record(name, page, rng.integers(0, 256, PAGE, dtype=np.uint8).tobytes())
        name = None
    yield comp.section_end() + comp.tail()


def write_sparse_image(path: Path, ram: int, every: int, fmt: str = "zstd") -> Path:
    with open(path, "wb") as f:
        f.write(libvirt_header(fmt))
        with zstandard.ZstdCompressor().stream_writer(f, closefd=False) as z:
            for piece in sparse_guest_stream(ram, every):
                z.write(piece)
    return path


# VmHWM belongs to the process's memory since its exec (ru_maxrss keeps the parent's
# high-water mark across fork and exec on Linux).
PEAK = textwrap.dedent(
    """
    import re, sys
    from mappedram.cli import main
    code = main(sys.argv[1:])
    status = open("/proc/self/status").read()
    print(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1), code)
    """
)


def peak_rss_kib(*args: str) -> tuple[int, int]:
    """(peak RSS in KiB, exit code) of the CLI run in a fresh process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", PEAK, *args], capture_output=True, text=True, env=env, check=True)
    rss, code = out.stdout.split()[-2:]
    return int(rss), int(code)


def test_peak_memory_does_not_follow_the_guest(tmp_path):
    """A 4 GiB guest (a random page every 256 KiB: 64 MiB of pages) and a 256 MiB one:
    the same memory, below 100 MiB, for verify --hash and convert to mapped-ram."""
    small = write_sparse_image(tmp_path / "small.sav", 256 << 20, 16 << 10)
    big = write_sparse_image(tmp_path / "big.sav", 4 << 30, 256 << 10)
    base, _ = peak_rss_kib("dump", str(small))
    for path in (small, big):
        rss, code = peak_rss_kib("verify", "--hash", str(path))
        assert code == 0 and rss < 100 << 10, rss
        rss_conv, code = peak_rss_kib("convert", str(path), str(tmp_path / "out.sav"), "--to", "mapped-ram", "--force")
        assert code == 0 and rss_conv < 100 << 10, rss_conv
        assert rss < base + (40 << 10) and rss_conv < base + (40 << 10), (base, rss, rss_conv)
    report = mappedram.verify(tmp_path / "out.sav", hash_blocks=True)
    ours = mappedram.verify(big, hash_blocks=True)
    assert report.ok and report.hashes == ours.hashes


def test_progress_counts_compressed_bytes(images):
    seen = []
    mappedram.verify(images["gzip"], hash_blocks=True, progress=lambda d, t: seen.append((d, t)))
    size = images["gzip"].stat().st_size - len(libvirt_header("gzip"))
    assert {t for _, t in seen} == {size} and seen[-1][0] == size
    assert len(seen) > 2 and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_dump_json_of_a_compressed_image(images, capsys):
    assert main(["dump", "--json", str(images["bzip2"])]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["libvirt"]["format"] == "bzip2" and info["format"] == "stream"
    assert info["stream_start"] == len(libvirt_header("bzip2"))


def test_device_sizes_are_checked_against_the_description(tmp_path, legacy_stream):
    """Forward, the footers delimit the device sections (the description comes after
    them); a description that sizes one otherwise is a problem at that section."""
    with mappedram.open(fixture_file(LEGACY)) as raw:
        eof, desc = raw.eof_offset, raw.vmdesc
        first = raw.devices[0]
    desc["devices"][0]["fields"][0]["size"] += 1
    text = json.dumps(desc).encode()
    stream = legacy_stream[: eof + 1] + S.VmDescriptionHead.build({"length": len(text)}) + text
    path = write_image(tmp_path / "desc.sav", "gzip", stream)
    report = mappedram.verify(path)
    at = len(libvirt_header("gzip")) + first.payload_offset
    expected = f"expected the {first.payload_length + 1} bytes of {first.idstr}'s state the VM description gives"
    assert [(p.offset, p.text) for p in report.problems] == [
        (at, f"{expected}, found {first.payload_length} before its footer")
    ]


@pytest.mark.skipif(not shutil.which("zstd"), reason="needs the zstd program")
def test_zstd_through_the_program_without_the_module(images, monkeypatch):
    from mappedram.mapper import compression

    monkeypatch.setattr(compression, "_zstandard_available", lambda: False)
    report = mappedram.verify(images["zstd"], hash_blocks=True)
    assert report.ok and report.hashes["pc.ram"] == qemu_hashes()["pc.ram"]
    damaged = bytearray(images["zstd"].read_bytes())
    start = len(libvirt_header("zstd"))
    damaged[start + 5000 : start + 5100] = bytes(100)
    path = images["zstd"].with_name("damaged.zstd")
    path.write_bytes(bytes(damaged))
    report = mappedram.verify(path, hash_blocks=True)  # the program's output before it notices
    assert not report.ok and len(report.problems) == 1 and not report.hashes
