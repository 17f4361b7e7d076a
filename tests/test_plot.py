"""mappedram plot: the data drawn (layout segments, population cells) checked on real files."""

from __future__ import annotations

import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, fixture_file
from craft import pattern_block, stream_claiming, write_snapshot

import mappedram
from mappedram.cli import main
from mappedram.formats import structs as S
from mappedram.visual.layout import KINDS, cell_grid, cells_from_pages, layout, population

sys.path.insert(0, str(REPO / "bench"))
from bench_huge import build_sparse_snapshot  # noqa: E402

A = "pc64-a-paused-mr.bin"
LEGACY = "pc64-d-paused-legacy.bin"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_cover(segments, size):
    """The segments tile [0, size): in file order, no overlap, no hole, none empty."""
    assert segments[0].start == 0 and segments[-1].end == size
    for before, after in zip(segments, segments[1:]):
        assert before.end == after.start, (before, after)
    assert all(s.size > 0 and s.kind in KINDS for s in segments)


def test_layout_tiles_the_file(fixture_path, manifest):
    with mappedram.open(fixture_path) as snap:
        segments = layout(snap)
        info = snap.describe()
    _check_cover(segments, info["size"])
    assert not [s for s in segments if s.kind == "gap"]  # QEMU's files have no unexplained bytes
    vm = info["vmdesc"]
    assert [(s.start, s.end) for s in segments if s.kind == "vmdesc"] == [(vm["offset"], info["size"])]
    devices = [s for s in segments if s.kind == "devices"]
    assert devices and sum(s.sections for s in devices) == len(snap.devices)
    if manifest["stream_start"]:  # a libvirt header and its XML, or other bytes (offset=)
        front = "libvirt" if manifest.get("libvirt") else "prefix"
        head = [s for s in segments if s.end <= manifest["stream_start"]]
        assert {s.kind for s in head} == {front} and head[-1].end == manifest["stream_start"]
    if manifest["format"] == "mapped-ram":
        for block in manifest["blocks"]:
            mine = {s.kind: s for s in segments if s.block == block["name"]}
            assert set(mine) == {"block-header", "bitmap", "pages"}
            assert mine["bitmap"].start == block["bitmap_offset"]
            assert mine["bitmap"].size == -(-block["pages_total"] // 64) * 8  # whole 64-bit words
            assert (mine["pages"].start, mine["pages"].size) == (block["pages_offset"], block["used_length"])
    else:
        records = [s for s in segments if s.kind == "records"]
        ram = [s for s in info["sections"] if s.get("idstr") == "ram"]
        assert sum(s.size for s in records) == sum(s["end"] - s["offset"] for s in ram)
        assert not [s for s in segments if s.kind in ("bitmap", "pages")]


def test_layout_of_a_libvirt_save(tmp_path):
    xml = b"<domain type='kvm'><name>t</name></domain>\0"
    data_len = len(xml) + 4000
    prefix = S.LibvirtHeaderLE.build({"data_len": data_len}) + xml + bytes(4000)
    path = write_snapshot(tmp_path / "lv.sav", {"pc.ram": pattern_block(16)}, prefix=prefix)
    with mappedram.open(path) as snap:
        segments = layout(snap)
        _check_cover(segments, snap.size)
    assert [(s.kind, s.start, s.end) for s in segments[:3]] == [
        ("libvirt", 0, 92),
        ("libvirt", 92, 92 + data_len),
        ("stream", 92 + data_len, segments[2].end),
    ]


def test_population_equals_the_bitmaps(fixture_path, manifest):
    with mappedram.open(fixture_path) as snap:
        cells = {b.name: population(b) for b in snap.blocks.values()}
        present = {b.name: b.present() for b in snap.blocks.values()}
        populated = {b.name: b.populated for b in snap.blocks.values()}  # the bitmap's popcount
    assert list(cells) == [b["name"] for b in manifest["blocks"]]
    for block in manifest["blocks"]:
        c = cells[block["name"]]
        assert c.total == block.get("pages_present", populated[c.name]) == populated[c.name]
        assert c.sizes.sum() == block.get("pages_total", block["used_length"] // 4096)
        per = c.pages_per_cell
        expected = [int(present[c.name][i : i + per].sum()) for i in range(0, c.num_pages, per)]
        assert c.counts.tolist() == expected
        assert np.allclose(c.fractions, np.array(expected) / c.sizes)


def test_population_groups_pages_into_cells(paused_mr):
    with mappedram.open(paused_mr) as snap:
        ram = snap.block("pc.ram")
        c = population(ram, max_cells=7)  # 16384 pages: 6 cells of 2341, a last one of 2338
        present = ram.present()
    assert (c.pages_per_cell, len(c.counts), c.sizes[-1]) == (2341, 7, 16384 - 6 * 2341)
    assert c.counts.tolist() == [int(present[i : i + 2341].sum()) for i in range(0, 16384, 2341)]
    pages = np.flatnonzero(present)
    assert cells_from_pages("pc.ram", pages, 16384, 4096, max_cells=7).counts.tolist() == c.counts.tolist()


def test_huge_sparse_snapshot_from_its_bitmap(tmp_path):
    """64 GiB guest, every 97th page set, the pages holes: cells from the bitmap alone."""
    path = tmp_path / "huge.sav"
    set_pages = build_sparse_snapshot(str(path), 64 << 30)
    with mappedram.open(path) as snap:
        segments = layout(snap)
        (c,) = [population(b) for b in snap.blocks.values()]
    _check_cover(segments, path.stat().st_size)
    assert [s.size for s in segments if s.kind == "bitmap"] == [2 << 20]
    assert c.total == set_pages and c.pages_per_cell == (16 << 20) // 4096
    first_cell = np.arange(c.pages_per_cell) % 97 == 0
    assert c.counts[0] == first_cell.sum()


def test_cli_plot_png_and_svg(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png, svg = tmp_path / "a.png", tmp_path / "d.svg"
    assert main(["plot", str(fixture_file(A)), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 20000
    assert main(["plot", str(fixture_file(LEGACY)), "-o", str(svg)]) == 0
    text = svg.read_text()
    with mappedram.open(fixture_file(LEGACY)) as snap:
        ram = snap.block("pc.ram")
        title = f"pc.ram: {ram.populated}/{ram.num_pages} pages present"
    assert "<svg" in text and title in text  # the titles are text in SVG
    assert "RAM page records" in text


def test_cli_plot_refuses_other_formats_first(tmp_path, capsys):
    out = tmp_path / "a.jpg"
    assert main(["plot", str(fixture_file(A)), "-o", str(out)]) == 2
    assert not out.exists() and ".png or .svg" in capsys.readouterr().err


def test_without_matplotlib_one_line_saying_what_to_install(tmp_path, capsys, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    out = tmp_path / "a.png"
    assert main(["plot", str(fixture_file(A)), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'mappedram[plot]'" in err and not out.exists()
    assert main(["diff", str(fixture_file(A)), str(fixture_file(A)), "--plot", str(out)]) == 2
    assert "pip install" in capsys.readouterr().err and not out.exists()


def test_cli_diff_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "diff.svg"
    assert main(["diff", str(fixture_file(A)), str(fixture_file(LEGACY)), "--plot", str(out)]) == 1
    text = out.read_text()
    result = mappedram.diff(fixture_file(A), fixture_file(LEGACY))
    ram = result.blocks["pc.ram"]
    assert f"pc.ram: {ram.count}/16384 pages differ" in text and "identical blocks:" in text


def test_cli_plot_malformed_file(tmp_path, capsys):
    pytest.importorskip("matplotlib")  # without it plot stops first, saying what to install
    bad = tmp_path / "bad.sav"
    bad.write_bytes(b"not a snapshot" * 10)
    out = tmp_path / "bad.png"
    assert main(["plot", str(bad), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "offset 0x0" in err and not out.exists()


def test_readme_pictures_are_small_pngs():
    """The pictures README shows (made by the commands in its Pictures section)."""
    for name in ("plot-mapped-ram.png", "plot-diff.png", "report.png"):
        data = (REPO / "docs" / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) < 300_000, name


def _stream_claiming_2_60_bytes(tmp_path: Path) -> Path:
    """A classic stream of 4 pages whose block claims 2**60 bytes (a stream's RAM size is
    not bounded by its file)."""
    return stream_claiming(tmp_path, 1 << 60)


def test_population_of_a_huge_claim_allocates_little(tmp_path):
    path = _stream_claiming_2_60_bytes(tmp_path)
    tracemalloc.start()
    try:
        with mappedram.open(path) as snap:
            (c,) = [population(b) for b in snap.blocks.values()]
            segments = layout(snap)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (c.num_pages, c.pages_per_cell, len(c.counts)) == (1 << 48, 1 << 36, 4096)
    assert c.counts[0] == 4 and c.total == 4
    _check_cover(segments, path.stat().st_size)
    assert peak < 64 << 20


def test_cell_grid_tells_empty_from_tiny_shares(tmp_path, paused_mr):
    """The drawn grid: -1 (grey) only where no page is set, the share elsewhere however
    small, NaN (white) past the last cell."""
    with mappedram.open(_stream_claiming_2_60_bytes(tmp_path)) as snap:
        grid = cell_grid(population(snap.block("pc.ram")))
    assert grid.shape == (4096 // 64, 64)
    assert 0 < grid[0, 0] < 1e-9 and (grid.ravel()[1:] == -1).all()
    with mappedram.open(paused_mr) as snap:
        rsdp = population(snap.block("/rom@etc/acpi/rsdp"))  # one page, present
        rom = population(snap.block("pc.rom"))  # 32 pages, none present
    assert cell_grid(rsdp)[0, 0] == 1.0 and np.isnan(cell_grid(rsdp)[0, 1:]).all()
    assert (cell_grid(rom)[0, :32] == -1).all() and np.isnan(cell_grid(rom)[0, 32:]).all()
