"""Guest-physical view and ELF core export, on the QEMU fixtures."""

from __future__ import annotations

import hashlib
import struct

import pytest

import mappedram
from mappedram.cli import main
from mappedram.mapper.physical import PhysicalView, below_4g

GIB = 1 << 30


def elf_loads(path):
    """(p_paddr, p_filesz, p_offset) of every PT_LOAD of an ELF64 little-endian core."""
    with open(path, "rb") as f:
        head = f.read(64)
        assert head[:4] == b"\x7fELF" and head[4] == 2 and head[5] == 1
        (phoff,) = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    loads = []
    for i in range(phnum):
        p_type, _, p_offset, _, p_paddr, p_filesz, _, _ = struct.unpack_from("<IIQQQQQQ", table, i * phentsize)
        if p_type == 1:
            loads.append((p_paddr, p_filesz, p_offset))
    return loads


@pytest.mark.parametrize(
    ("machine", "ram", "low"),
    [
        ("pc-i440fx-10.0", 64 << 20, 64 << 20),
        ("pc-i440fx-10.0", 4 * GIB, 3 * GIB),
        ("pc-i440fx-10.0", 0xE0000000 - 4096, 0xE0000000 - 4096),
        ("pc-q35-10.0", 3 * GIB, 2 * GIB),
        ("pc-q35-10.0", 0xB0000000 - 4096, 0xB0000000 - 4096),
    ],
)
def test_pci_hole_split(machine, ram, low):
    assert below_4g(machine, ram) == low


def test_unknown_machine_needs_override():
    with pytest.raises(ValueError, match="give below_4g"):
        below_4g("virt-10.0", 1 << 30)


def test_physical_view_matches_pmemsave(fixture_path, manifest):
    if manifest["target"] != "x86_64":
        pytest.skip(f"the physical view knows the x86 pc/q35 layouts only, not {manifest['machine_type']}")
    pm = manifest["main_ram_pmemsave"]
    with mappedram.open(fixture_path) as snap:
        view = PhysicalView(snap)
        for region in pm["regions"]:
            start, end = int(region["start"], 16), int(region["end"], 16)
            if start == 0xA0000:  # the VGA window is device memory: not in the view
                with pytest.raises(ValueError, match="not RAM"):
                    view.read(start, 16)
                continue
            assert hashlib.sha256(view.read(start, end - start)).hexdigest() == region["sha256"]
        bios = snap.block("pc.bios")
        assert view.read((1 << 32) - bios.used_length, 64) == bytes(bios.page(0)[:64])


def test_export_elf(paused_mr, tmp_path, capsys):
    out = tmp_path / "core.elf"
    vram = "0000:00:02.0/vga.vram"
    assert main(["export-elf", str(paused_mr), "-o", str(out), "--map", f"{vram}=0xfd000000"]) == 0
    assert "4 segments" in capsys.readouterr().out
    loads = elf_loads(out)
    assert [(a, n) for a, n, _ in loads] == [
        (0, 0xA0000),
        (0xC0000, 0x4000000 - 0xC0000),
        (0xFD000000, 16 << 20),
        (0xFFFC0000, 0x40000),
    ]
    with mappedram.open(paused_mr) as snap, open(out, "rb") as f:
        view = PhysicalView(snap, extra={vram: 0xFD000000})
        for addr, size, offset in loads:
            f.seek(offset)
            assert f.read(size) == view.read(addr, size), hex(addr)
    assert out.stat().st_blocks * 512 < out.stat().st_size  # absent pages are holes


def test_volatility3_reads_the_export(paused_mr, tmp_path):
    pytest.importorskip("volatility3")
    from volatility3.framework import contexts
    from volatility3.framework.layers import elf, physical

    out = tmp_path / "core.elf"
    assert main(["export-elf", str(paused_mr), "-o", str(out)]) == 0
    ctx = contexts.Context()
    ctx.config["base.location"] = out.as_uri()
    ctx.add_layer(physical.FileLayer(ctx, "base", "base"))
    ctx.config["memory.base_layer"] = "base"
    layer = elf.Elf64Layer(ctx, "memory", "memory")
    page = 0x2345  # the guest stamped page N with 0x4d415250, N, ~N at +4
    assert struct.unpack("<III", layer.read(page * 4096 + 4, 12)) == (0x4D415250, page, ~page & 0xFFFFFFFF)
    assert not layer.is_valid(0xA0000)  # the VGA window is not in the core
