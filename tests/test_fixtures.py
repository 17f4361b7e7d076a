"""Every real QEMU 10.0 fixture, read and checked against its manifest."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

import mappedram
from mappedram.cli import main


def test_header_and_configuration(fixture_path, manifest):
    with mappedram.open(fixture_path) as snap:
        assert snap.machine_type == manifest["machine_type"]
        assert list(snap.capabilities) == manifest["capabilities_in_stream"]
        assert snap.format == manifest["format"]
        assert snap.stream_start == manifest["stream_start"]
        assert snap.page_size == manifest["target_page_size"]
        assert snap.ram_total == manifest["ram_total"]
        assert snap.size == manifest["file_apparent_bytes"]
        want = manifest["libvirt"]  # the header make.py wrote in front, or null
        if want is None:
            assert snap.libvirt is None
        else:
            lv = snap.libvirt
            assert (lv.complete, lv.byteorder) == (True, "little")
            got = {k: getattr(lv, k) for k in ("version", "data_len", "was_running", "format", "cookie_offset")}
            assert got == {k: want[k] for k in got}
            assert snap.stream_start == 92 + want["data_len"]


def test_blocks_match_manifest(fixture_path, manifest):
    with mappedram.open(fixture_path) as snap:
        assert [b.name for b in snap] == [b["name"] for b in manifest["blocks"]]
        for block, want in zip(snap, manifest["blocks"]):
            assert block.used_length == want["used_length"]
            for key in ("page_size", "bitmap_offset", "pages_offset"):
                if key in want:
                    assert getattr(block, key) == want[key], (block.name, key)
            if "pages_total" in want:
                assert block.num_pages == want["pages_total"]
                assert block.populated == want["pages_present"]


def test_reconstructed_ram_sha256(fixture_path, manifest):
    with mappedram.open(fixture_path) as snap:
        for block, want in zip(snap, manifest["blocks"]):
            if "sha256" in want:
                assert hashlib.sha256(block.read()).hexdigest() == want["sha256"], block.name


def test_main_ram_equals_qemu_pmemsave(fixture_path, manifest):
    """QEMU's own pmemsave of guest RAM equals the block (except the x86 VGA window)."""
    pm = manifest["main_ram_pmemsave"]
    with mappedram.open(fixture_path) as snap:
        ram = snap.block(pm["block"]).read()
    for region in pm["regions"]:
        start, end = int(region["start"], 16), int(region["end"], 16)
        same = hashlib.sha256(ram[start:end]).hexdigest() == region["sha256"]
        assert same == (start != 0xA0000), region  # the VGA window is read from the device


def test_guest_stamps_visible(fixture_path, manifest):
    """Marker 0x4d415250 at +4, the page number at +8 and its complement at +12 of every
    page from 1 MiB to RAM - 1 MiB (boot.S wrote them, or QEMU's loader on sun4u);
    page() and read() must both show it."""
    stamps = manifest["stamps"]
    first, last = stamps["first_page"], stamps["end_page"]
    with mappedram.open(fixture_path) as snap:
        ram = snap.block(stamps["block"])
        assert ram.page_size == stamps["page_size"]
        words = ram.read().view("<u4").reshape(ram.num_pages, -1)
        assert (words[first:last, 1] == 0x4D415250).all()
        assert (words[first:last, 2] == np.arange(first, last)).all()
        assert (words[first:last, 3] == ~np.arange(first, last, dtype=np.uint32)).all()
        page = np.frombuffer(ram.page(1000), dtype="<u4")
        assert page[1] == 0x4D415250 and page[2] == 1000


def test_runs_cover_populated_pages(fixture_path):
    with mappedram.open(fixture_path) as snap:
        for block in snap:
            present = block.present()
            from_runs = np.zeros_like(present)
            for first, count in block.runs():
                assert not from_runs[first : first + count].any()  # runs are disjoint
                from_runs[first : first + count] = True
            assert (from_runs == present).all()
            assert int(present.sum()) == block.populated


def test_sections_and_devices(fixture_path, manifest):
    with mappedram.open(fixture_path) as snap:
        kinds = [s.kind for s in snap.sections]
        assert kinds[-1] == "eof"
        assert snap.eof_offset == manifest["vmdesc"]["json_offset"] - 6
        assert snap.vmdesc_location == (manifest["vmdesc"]["json_offset"] - 5, manifest["vmdesc"]["json_len"])
        assert snap.vmdesc["page_size"] == manifest["vmdesc"]["page_size"]
        names = [d["name"] for d in snap.vmdesc["devices"]]
        assert [d.idstr for d in snap.devices] == names
        for dev in snap.devices:
            assert snap.read_bytes(dev.end - 5, 1) == b"\x7e"
        ram = [s for s in snap.sections if s.idstr == "ram"]
        assert ram[0].kind == "start" and ram[-1].kind == "end"
        cmds = [s.command for s in snap.sections if s.kind == "command"]
        assert cmds == ["switchover_start"]  # QEMU 10.0 machine types send it
        if manifest["format"] == "mapped-ram":
            # a mapped-ram PART/END payload is only the EOS word
            assert {s.payload_length for s in ram[1:]} == {8}
            assert len(ram) - 2 >= manifest["dirty_sync_count"] - 1


def test_verify_valid_and_hash(fixture_path, manifest):
    report = mappedram.verify(fixture_path, hash_blocks=True)
    assert report.ok, report.problems
    for want in manifest["blocks"]:
        if "sha256" in want:
            assert report.hashes[want["name"]] == want["sha256"]


def test_cli_dump_json(fixture_path, manifest, capsys):
    assert main(["dump", "--json", str(fixture_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["machine_type"] == manifest["machine_type"]
    assert info["format"] == manifest["format"]
    assert [b["name"] for b in info["blocks"]] == [b["name"] for b in manifest["blocks"]]
    assert info["sections"][-1]["kind"] == "eof"


def test_cli_dump_text(fixture_path, manifest, capsys):
    assert main(["dump", str(fixture_path)]) == 0
    out = capsys.readouterr().out
    assert manifest["machine_type"] in out
    assert manifest["stamps"]["block"] in out and "switchover_start" in out


def test_cli_verify_hash(fixture_path, manifest, capsys):
    assert main(["verify", "--hash", str(fixture_path)]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("valid")
    for want in manifest["blocks"]:
        if "sha256" in want:
            assert f"{want['sha256']}  {want['name']}" in out


def test_cli_extract_sparse(paused_mr, tmp_path, capsys):
    out = tmp_path / "pc.ram.raw"
    assert main(["extract", str(paused_mr), "--block", "pc.ram", "-o", str(out)]) == 0
    with mappedram.open(paused_mr) as snap:
        block = snap.block("pc.ram")
        assert out.read_bytes() == block.read().tobytes()
        # clear pages are holes: the file takes no more blocks than its populated pages
        assert out.stat().st_blocks * 512 <= block.populated * block.page_size + (1 << 20)


def test_restore_matches_read(fixture_path):
    with mappedram.open(fixture_path) as snap:
        expected = {b.name: b.read() for b in snap}
    for channels in (1, 3):
        got = mappedram.restore(fixture_path, channels=channels)
        assert got.keys() == expected.keys()
        for name in expected:
            assert np.array_equal(got[name], expected[name]), name


def test_committed_set_stays_small():
    """The repository carries its fixtures: together well under 10 MB."""
    from conftest import FIXTURES

    files = list(FIXTURES.glob("*.zst"))
    assert len(files) == len(list(FIXTURES.glob("*.manifest.json"))) >= 8
    assert sum(f.stat().st_size for f in files) < 10_000_000


def test_nothing_reads_outside_the_repository():
    """A fresh clone has nothing beside it: the fixtures are the repository's own, and no
    test, bench or CI file names the shared folder the fixtures once came from."""
    import os

    from conftest import FIXTURES, REPO

    if "MAPPEDRAM_FIXTURES" not in os.environ:
        assert FIXTURES.resolve().is_relative_to(REPO)
    pattern = re.compile(r"\.\./shared|parent\s*/\s*.shared")
    offenders = [
        str(path.relative_to(REPO))
        for folder in ("tests", "bench", ".ci")
        for path in (REPO / folder).rglob("*")
        if path.is_file()
        and path.suffix not in (".zst", ".bin", ".pyc")
        and ".fixtures" not in path.parts
        and path != Path(__file__)
        and pattern.search(path.read_text(errors="replace"))
    ]
    assert offenders == []
