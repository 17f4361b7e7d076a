"""export-elf's placement: --map puts a block (pc.ram and pc.bios too) where it says, a
block the file does not hold is refused in one line, overlaps name both blocks and ranges.

The cores are read back with binutils' readelf (an ELF reader that is not ours) and their
bytes compared with the blocks' sha256 from the fixtures' manifests (QEMU's restored RAM)
or with the bytes the crafted files were built from."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from conftest import fixture_file, load_manifest
from craft import PAGE, patch, pattern_block, section, write_snapshot

import mappedram
from mappedram.cli import main
from mappedram.formats import structs as S
from mappedram.formats.bitmap import LITTLE_ENDIAN_64
from mappedram.formats.constants import RamFlag
from mappedram.formats.layout import BlockPlace, round_up
from mappedram.mapper.convert import to_stream
from mappedram.mapper.encoder import StreamComposer

VRAM = "0000:00:02.0/vga.vram"
NOT_IN_FILE = (
    "block 'pc.ram' is not in the file: x-ignore-shared left its RAM in shared memory (the backing file of its "
    "memory backend), so the file holds no pages of it"
)
_LOAD = re.compile(r"^\s*LOAD\s+(0x[0-9a-f]+)\s+0x[0-9a-f]+\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s", re.M)


def readelf_loads(core) -> list[tuple[int, int, int]]:
    """(p_paddr, p_filesz, p_offset) of every PT_LOAD, as `readelf -lW` reads them."""
    if shutil.which("readelf") is None:
        if os.environ.get("CI"):
            raise RuntimeError("CI needs binutils' readelf (installed with GNU as)")
        pytest.skip("needs binutils' readelf")
    out = subprocess.run(["readelf", "-lW", str(core)], capture_output=True, text=True, check=True).stdout
    return [(int(paddr, 16), int(size, 16), int(offset, 16)) for offset, paddr, size in _LOAD.findall(out)]


def segments(core) -> list[tuple[int, bytes]]:
    """(p_paddr, the bytes it holds) of every PT_LOAD, placed as `readelf -lW` reads them."""
    data = core.read_bytes()
    return [(addr, data[offset : offset + size]) for addr, size, offset in readelf_loads(core)]


def segment_sha256(core, offset: int, size: int) -> str:
    with open(core, "rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(size)).hexdigest()


def export(capsys, path, core, *args: str) -> tuple[int, list[str], str]:
    """(exit code, stdout lines, stderr) of `mappedram export-elf PATH -o CORE ARGS`."""
    code = main(["export-elf", str(path), "-o", str(core), *args])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def refused(capsys, path, core, code: int, line: str, *args: str) -> None:
    """One line on stderr, this exit code, no core."""
    assert export(capsys, path, core, *args) == (code, [], f"mappedram: {path}: {line}\n")
    assert not core.exists()


@pytest.fixture(scope="module")
def block_sha256(paused_mr):
    """Each block's sha256 as QEMU restored it (the fixture's manifest)."""
    return {b["name"]: b["sha256"] for b in load_manifest(paused_mr.name)["blocks"]}


# -- a block named by --map goes where --map says ------------------------------------------------
def test_map_places_pc_ram_pc_bios_and_video_ram(paused_mr, block_sha256, tmp_path, capsys):
    core = tmp_path / "core"
    code, out, _ = export(
        capsys, paused_mr, core, "--map", "pc.ram=4G", "--map", f"{VRAM}=0x200000000", "--map", "pc.bios=0x10000"
    )
    assert code == 0
    assert out[:3] == [
        "PT_LOAD 0x000000010000-0x000000050000  pc.bios +0x0",
        "PT_LOAD 0x000100000000-0x000104000000  pc.ram +0x0",
        f"PT_LOAD 0x000200000000-0x000201000000  {VRAM} +0x0",
    ]
    loads = readelf_loads(core)
    assert [(a, n) for a, n, _ in loads] == [(0x10000, 0x40000), (1 << 32, 64 << 20), (0x200000000, 16 << 20)]
    for (_, size, offset), name in zip(loads, ("pc.bios", "pc.ram", VRAM)):
        assert segment_sha256(core, offset, size) == block_sha256[name], name


def test_map_pc_ram_at_0_is_the_whole_block_from_0(paused_mr, block_sha256, tmp_path, capsys):
    """Not an overlap with QEMU's layout of pc.ram: --map replaces it. The block is one range,
    the VGA window's bytes of the block included (QEMU's layout leaves them out)."""
    core = tmp_path / "core"
    code, out, _ = export(capsys, paused_mr, core, "--map", "pc.ram=0")
    assert code == 0
    assert out == [
        "PT_LOAD 0x000000000000-0x000004000000  pc.ram +0x0",
        "PT_LOAD 0x0000fffc0000-0x000100000000  pc.bios +0x0",
        f"{core}: 2 segments, 65400832 bytes of page data",
    ]
    (addr, size, offset), _ = readelf_loads(core)
    assert (addr, size) == (0, 64 << 20)
    assert segment_sha256(core, offset, size) == block_sha256["pc.ram"]


def test_a_machine_without_pc_ram_exports_what_map_places(tmp_path, capsys):
    """sun4u: no layout known, no pc.ram; --map places its RAM and PROM."""
    path = fixture_file("sun4u-64-h-paused-mr.bin")
    sha = {b["name"]: b["sha256"] for b in load_manifest(path.name)["blocks"]}
    core = tmp_path / "core"
    refused(
        capsys,
        path,
        core,
        2,
        "no RAM block 'pc.ram' (the main RAM of x86 pc and q35 machines); give --map BLOCK=ADDR to place the "
        "blocks to export (in the file: sun4u.ram, sun4u.prom)",
    )
    code, out, _ = export(capsys, path, core, "--map", "sun4u.ram=0", "--map", "sun4u.prom=0x1fff0000000")
    assert code == 0 and out[:2] == [
        "PT_LOAD 0x000000000000-0x000004000000  sun4u.ram +0x0",
        "PT_LOAD 0x01fff0000000-0x01fff0400000  sun4u.prom +0x0",
    ]
    loads = readelf_loads(core)
    assert [(a, n) for a, n, _ in loads] == [(0, 64 << 20), (0x1FFF0000000, 4 << 20)]
    for (_, size, offset), name in zip(loads, ("sun4u.ram", "sun4u.prom")):
        assert segment_sha256(core, offset, size) == sha[name], name


def test_a_pc_file_without_pc_ram(tmp_path, capsys):
    vram, bios = pattern_block(4, seed=2), pattern_block(64, seed=3)
    path = write_snapshot(tmp_path / "no-ram.sav", {"vga.vram": vram, "pc.bios": bios})
    core = tmp_path / "core"
    refused(
        capsys,
        path,
        core,
        2,
        "no RAM block 'pc.ram' (the main RAM of x86 pc and q35 machines); give --map BLOCK=ADDR to place the "
        "blocks to export (in the file: vga.vram, pc.bios)",
    )
    refused(
        capsys,
        path,
        core,
        2,
        "--below-4g splits pc.ram, which cannot be exported: no RAM block 'pc.ram' (the main RAM of x86 pc and "
        "q35 machines)",
        "--below-4g",
        "1M",
    )
    code, out, _ = export(capsys, path, core, "--map", "vga.vram=0xfd000000")
    assert code == 0 and out == [
        "PT_LOAD 0x0000fd000000-0x0000fd004000  vga.vram +0x0",
        "PT_LOAD 0x0000fffc0000-0x000100000000  pc.bios +0x0",
        f"{core}: 2 segments, {4 * PAGE + 64 * PAGE} bytes of page data",
    ]
    assert segments(core) == [
        (0xFD000000, vram.tobytes()),
        ((1 << 32) - 64 * PAGE, bios.tobytes()),
    ]


# -- a block the file leaves out (x-ignore-shared) -------------------------------------------------
def shared_file(path, blocks: list[tuple[str, np.ndarray, bool]]):
    """A QEMU 11 x-ignore-shared save of ``blocks`` (name, data, in the file): a block left
    out has its MappedRamHeader's offsets 0 and nothing reserved; the others are in it."""
    comp = StreamComposer(PAGE, capabilities=["mapped-ram", "x-ignore-shared"], machine="pc-i440fx-10.0")
    enc = comp.encoder
    blocks = [(name, data.size, data if in_file else None) for name, data, in_file in blocks]
    out = bytearray(comp.head())
    out += enc.ram_start(comp.ram_id) + enc.ram_word(sum(n for _, n, _ in blocks), RamFlag.MEM_SIZE)
    for name, length, data in blocks:
        at = len(out)
        entry_size = len(enc.block_entry(name, length, BlockPlace(name, length, PAGE, at, 0, 0, 0, 0), addr=0))
        pages = length // PAGE
        bitmap_at = 0 if data is None else at + entry_size
        pages_at = 0 if data is None else round_up(bitmap_at + LITTLE_ENDIAN_64.size(pages), PAGE)
        place = BlockPlace(name, length, PAGE, at, 0, bitmap_at, 0, pages_at)  # what the entry states
        out += enc.block_entry(name, length, place, addr=0)
        if data is not None:
            out += LITTLE_ENDIAN_64.pack(np.ones(pages, dtype=bool))
            out += bytes(pages_at - len(out)) + data.tobytes()
    out += comp.section_end() + comp.tail()
    path.write_bytes(out)
    return path


@pytest.fixture
def shared_ram(tmp_path):
    vram, bios = pattern_block(4, seed=2), pattern_block(64, seed=3)
    blocks = [("pc.ram", pattern_block(64), False), ("vga.vram", vram, True), ("pc.bios", bios, True)]
    path = shared_file(tmp_path / "shared.sav", blocks)
    with mappedram.open(path) as snap:  # what the file says, read by the reader
        assert [(b.name, b.in_file) for b in snap] == [("pc.ram", False), ("vga.vram", True), ("pc.bios", True)]
    assert mappedram.verify(path).ok
    return path, vram, bios


def test_pc_ram_left_out_is_refused_without_map(shared_ram, tmp_path, capsys):
    path, _, _ = shared_ram
    core = tmp_path / "core"
    placing = "give --map BLOCK=ADDR to place the blocks to export (in the file: vga.vram, pc.bios)"
    refused(capsys, path, core, 2, f"{NOT_IN_FILE}; {placing}")
    refused(capsys, path, core, 2, f"--map pc.ram=0x0: {NOT_IN_FILE}", "--map", "pc.ram=0")
    refused(
        capsys, path, core, 2, f"--below-4g splits pc.ram, which cannot be exported: {NOT_IN_FILE}", "--below-4g", "1M"
    )


def test_pc_ram_left_out_others_placed_by_map(shared_ram, tmp_path, capsys):
    path, vram, bios = shared_ram
    core = tmp_path / "core"
    code, out, err = export(capsys, path, core, "--map", "vga.vram=0xfd000000")
    assert (code, err) == (0, "")
    assert out == [
        "PT_LOAD 0x0000fd000000-0x0000fd004000  vga.vram +0x0",
        "PT_LOAD 0x0000fffc0000-0x000100000000  pc.bios +0x0",
        "pc.ram: not in the file (x-ignore-shared), not exported",
        f"{core}: 2 segments, {4 * PAGE + 64 * PAGE} bytes of page data",
    ]
    assert segments(core) == [
        (0xFD000000, vram.tobytes()),
        ((1 << 32) - 64 * PAGE, bios.tobytes()),
    ]


def test_pc_bios_left_out_is_said(tmp_path, capsys):
    """pc.bios shared: pc.ram is exported by QEMU's layout, pc.bios is not (no zeros in its place)."""
    ram = pattern_block(16, seed=4)
    path = shared_file(tmp_path / "bios.sav", [("pc.ram", ram, True), ("pc.bios", pattern_block(64), False)])
    core = tmp_path / "core"
    assert export(capsys, path, core) == (
        0,
        [
            "PT_LOAD 0x000000000000-0x000000010000  pc.ram +0x0",
            "pc.bios: not in the file (x-ignore-shared), not exported",
            f"{core}: 1 segments, {16 * PAGE} bytes of page data",
        ],
        "",
    )
    ((addr, size, offset),) = readelf_loads(core)
    assert (addr, core.read_bytes()[offset : offset + size]) == (0, ram.tobytes())


def test_map_of_a_shared_block_is_refused(tmp_path, capsys):
    from test_verdicts import ignore_shared_file

    path = ignore_shared_file(tmp_path / "shared.sav")  # mem-shared left out, pc.ram in the file
    line = NOT_IN_FILE.replace("'pc.ram'", "'mem-shared'")
    refused(capsys, path, tmp_path / "core", 2, f"--map mem-shared=0x100000000: {line}", "--map", "mem-shared=4G")


# -- what cannot be placed --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["--map", "pc.bios=0x1000"],
            "pc.ram at 0x0-0xa0000 (QEMU's layout) overlaps pc.bios at 0x1000-0x41000 (--map)",
        ),
        (
            ["--map", f"{VRAM}=4G", "--map", "pc.bios=0x100fff000"],
            f"{VRAM} at 0x100000000-0x101000000 (--map) overlaps pc.bios at 0x100fff000-0x10103f000 (--map)",
        ),
        (
            ["--below-4g", "32M", "--map", f"{VRAM}=0x1000000"],
            f"pc.ram at 0xc0000-0x2000000 (--below-4g) overlaps {VRAM} at 0x1000000-0x2000000 (--map)",
        ),
        (
            ["--map", "pc.ram=4G", "--map", f"{VRAM}=0x103fff000"],
            f"pc.ram at 0x100000000-0x104000000 (--map) overlaps {VRAM} at 0x103fff000-0x104fff000 (--map)",
        ),
        (
            ["--map", "pc.ram=0", "--below-4g", "32M"],
            "--below-4g splits pc.ram around the PCI hole and --map pc.ram=ADDR places it whole: give one of them",
        ),
        (
            ["--map", "vga=0xfd000000"],
            "--map vga=0xfd000000: no RAM block 'vga' in the file; blocks: pc.ram, 0000:00:02.0/vga.vram, "
            "/rom@etc/acpi/tables, pc.bios, 0000:00:03.0/e1000.rom, pc.rom, 0000:00:02.0/vga.rom, "
            "/rom@etc/table-loader, /rom@etc/acpi/rsdp",
        ),
    ],
    ids=["layout-and-map", "map-and-map", "below-4g-and-map", "pc.ram-mapped", "below-4g-with-pc.ram", "no-block"],
)
def test_usage_that_cannot_be_placed(paused_mr, tmp_path, capsys, args, line):
    refused(capsys, paused_mr, tmp_path / "core", 2, line, *args)


def test_unknown_machine_type_asks_for_an_option(tmp_path, capsys):
    ram = pattern_block(8)
    path = write_snapshot(tmp_path / "virt.sav", {"pc.ram": ram}, machine_type="virt-10.0")
    core = tmp_path / "core"
    refused(
        capsys,
        path,
        core,
        2,
        "no guest-physical layout known for machine type 'virt-10.0' (x86 pc and q35 only): give --below-4g BYTES, "
        "or --map pc.ram=ADDR",
    )
    assert export(capsys, path, core, "--map", "pc.ram=0x40000000")[0] == 0
    ((addr, size, offset),) = readelf_loads(core)
    assert (addr, core.read_bytes()[offset : offset + size]) == (0x40000000, ram.tobytes())


def bios_claiming(tmp_path, claim: int):
    """A classic stream (pc.ram of 16 pages, pc.bios of 4) whose pc.bios claims ``claim``
    bytes, as a stream may: its RAM size is not bounded by the file."""
    small = write_snapshot(tmp_path / "src.sav", {"pc.ram": pattern_block(16), "pc.bios": pattern_block(4)})
    path = tmp_path / "bios-claims.sav"
    with mappedram.open(small) as snap:
        to_stream(snap, path)
    with mappedram.open(path) as snap:
        entry = snap.block("pc.bios").entry_offset
    patch(path, section(path, "start", "ram").payload_offset, S.RamWord.build((16 * PAGE + claim) | RamFlag.MEM_SIZE))
    patch(path, entry + 1 + len("pc.bios"), S.RamWord.build(claim))
    return path, entry


def test_blocks_of_the_file_that_overlap_in_qemus_layout(tmp_path, capsys):
    """Only the file placed them: exit 1, at pc.bios's entry, both blocks and ranges named."""
    path, entry = bios_claiming(tmp_path, (1 << 32) - 0x8000)
    core = tmp_path / "core"
    refused(
        capsys,
        path,
        core,
        1,
        f"offset {entry:#x} ({entry}): expected RAM blocks that do not overlap in QEMU's layout, found pc.ram at "
        "0x0-0x10000 (QEMU's layout) and pc.bios at 0x8000-0x100000000 (QEMU's layout)",
    )
    # placing one of them by hand makes it the command line's to answer for, and lets it through
    assert export(capsys, path, core, "--map", "pc.ram=0x100000000")[0] == 0
    path, entry = bios_claiming(tmp_path, (1 << 32) + PAGE)
    refused(
        capsys,
        path,
        core.with_name("core2"),
        1,
        f"offset {entry:#x} ({entry}): expected 'pc.bios' to fit below 4 GiB, found {(1 << 32) + PAGE} bytes",
    )


def test_map_in_the_one_pass_of_a_compressed_image(tmp_path, capsys):
    """A zstd libvirt image is exported in one forward pass: --map places its blocks there
    as in the raw image (the same core, byte for byte)."""
    from test_compressed import LEGACY, write_image

    stream = fixture_file(LEGACY).read_bytes()
    cores = {}
    for fmt in ("raw", "zstd"):
        image = write_image(tmp_path / f"{fmt}.sav", fmt, stream)
        cores[fmt] = tmp_path / f"{fmt}.core"
        code, out, _ = export(capsys, image, cores[fmt], "--map", "pc.ram=4G", "--map", f"{VRAM}=0x200000000")
        assert code == 0 and out[1:3] == [
            "PT_LOAD 0x000100000000-0x000104000000  pc.ram +0x0",
            f"PT_LOAD 0x000200000000-0x000201000000  {VRAM} +0x0",
        ]
    sha = {b["name"]: b.get("sha256") for b in load_manifest(LEGACY)["blocks"]}
    loads = readelf_loads(cores["zstd"])
    for addr, size, offset in loads:
        name = {1 << 32: "pc.ram", 0x200000000: VRAM}.get(addr)
        if name:
            assert segment_sha256(cores["zstd"], offset, size) == sha[name], name
    assert [load[:2] for load in loads] == [load[:2] for load in readelf_loads(cores["raw"])]
    assert cores["zstd"].read_bytes()[4096:] == cores["raw"].read_bytes()[4096:]  # the headers: CPU notes in raw only


def test_library_placement_errors_and_left_out(shared_ram, paused_mr):
    """The caller's placement is a ValueError (not a FormatError blaming the file); a block
    of QEMU's layout that the file leaves out is listed in left_out."""
    path, _, _ = shared_ram
    with mappedram.open(path) as snap:
        view = mappedram.PhysicalView(snap, extra={"vga.vram": 0xFD000000})
        assert view.left_out == ["pc.ram: not in the file (x-ignore-shared), not exported"]
        assert [(r.start, r.block) for r in view.regions] == [
            (0xFD000000, "vga.vram"),
            ((1 << 32) - 64 * PAGE, "pc.bios"),
        ]
    with mappedram.open(paused_mr) as snap:
        with pytest.raises(ValueError, match=r"overlaps pc.bios at 0x1000-0x41000 \(--map\)") as err:
            mappedram.PhysicalView(snap, extra={"pc.bios": 0x1000})
        assert not isinstance(err.value, mappedram.FormatError)
        for bad, why in (
            (0x123, "a multiple of 4096"),
            (-4096, "a guest-physical address below"),
            (1 << 64, "a guest-physical"),
        ):
            with pytest.raises(ValueError, match=rf"extra\['pc.bios'\]: expected {why}"):
                mappedram.PhysicalView(snap, extra={"pc.bios": bad})
        view = mappedram.PhysicalView(snap, extra={"pc.ram": 0})  # the VGA window's bytes from the block
        assert view.read(0xA0000, 0x20000) == bytes(snap.block("pc.ram").read()[0xA0000:0xC0000])
        assert view.left_out == []
