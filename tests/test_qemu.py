"""Against the real qemu-system-x86_64 10.0: QEMU's files read by us, ours restored by QEMU.

The guest is tests/guest/boot.S: it stamps every page of [1 MiB, 63 MiB) and keeps
incrementing a counter at the start of each. Without QEMU 10 these tests skip; under
CI (CI=true) they must run (.ci/install-qemu installs QEMU).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time

import numpy as np
import pytest
from qemu_vm import RAM_MB, Vm, boot_and_wait, build_guest, qemu_binary, restore, save

import mappedram
from mappedram.cli import main
from mappedram.formats import structs as S

pytestmark = pytest.mark.qemu

if qemu_binary() is None or shutil.which("as") is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI needs qemu-system-x86_64 >= 10 and GNU as: run .ci/install-qemu")
    pytest.skip("needs qemu-system-x86_64 >= 10.0 and GNU as (see .ci/install-qemu)", allow_module_level=True)

pytestmark = pytest.mark.qemu

FIRST, LAST = 0x100000, (RAM_MB - 1) << 20
RAM = "pc.ram"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("qemu")


@pytest.fixture(scope="module")
def image(workdir):
    return build_guest(workdir)


@pytest.fixture
def vm(workdir, image):
    with Vm(workdir, image, name=f"src{time.monotonic_ns()}") as machine:
        boot_and_wait(machine)
        yield machine


def guest_stamps_ok(ram: np.ndarray) -> None:
    words = ram.view("<u4").reshape(-1, 1024)
    pages = np.arange(FIRST >> 12, LAST >> 12)
    assert (words[pages, 1] == 0x4D415250).all()
    assert (words[pages, 2] == pages).all()
    assert (words[pages, 3] == ~pages.astype(np.uint32)).all()


def counters_advance(machine: Vm) -> None:
    before = machine.read_u32(FIRST)
    deadline = time.monotonic() + 30
    while machine.read_u32(FIRST) == before:
        assert time.monotonic() < deadline, "the guest's counter does not move"
        time.sleep(0.1)


def test_paused_save_matches_pmemsave(vm, workdir):
    path = workdir / "paused.sav"
    vm.cmd("stop")
    dump = workdir / "pmem.bin"
    vm.cmd("pmemsave", val=0, size=RAM_MB << 20, filename=str(dump))
    save(vm, f"file:{path}", mapped_ram=True)
    report = mappedram.verify(path)
    assert report.ok, report.problems
    with mappedram.open(path) as snap:
        assert snap.capabilities == ("mapped-ram",) and snap.machine_type.startswith("pc-i440fx-")
        ram = snap.block(RAM).read()
    pmem = np.fromfile(dump, dtype=np.uint8)
    assert np.array_equal(ram[:0xA0000], pmem[:0xA0000])  # below the VGA/ROM window
    assert np.array_equal(ram[0x100000:], pmem[0x100000:])
    guest_stamps_ok(ram)


def test_live_multifd_save_several_rounds(vm, workdir):
    path = workdir / "live.sav"
    vm.set_caps(mapped_ram=True, multifd=True)
    vm.cmd(
        "migrate-set-parameters",
        **{"multifd-channels": 4, "downtime-limit": 1, "avail-switchover-bandwidth": 1000000, "max-bandwidth": 8 << 30},
    )
    vm.cmd("migrate", uri=f"file:{path}")
    time.sleep(2)
    vm.cmd("migrate-set-parameters", **{"downtime-limit": 2000, "avail-switchover-bandwidth": 0})
    info = vm.wait_migration()
    rounds = info["ram"]["dirty-sync-count"]
    assert rounds > 1
    report = mappedram.verify(path, hash_blocks=True)
    assert report.ok, report.problems
    with mappedram.open(path) as snap:
        parts = [s for s in snap.sections if s.kind == "part" and s.idstr == "ram"]
        assert len(parts) >= rounds - 1
        guest_stamps_ok(snap.block(RAM).read())


def test_offset_save_behind_libvirt_header(vm, workdir):
    path = workdir / "libvirt.sav"
    xml = b"<domain type='qemu'><name>t</name></domain>\0"
    data_len = len(xml) + 65536
    path.write_bytes(S.LibvirtHeaderLE.build({"data_len": data_len, "was_running": 1}) + xml + bytes(65536))
    offset = 92 + data_len
    save(vm, f"file:{path},offset={offset:#x}", mapped_ram=True)
    with mappedram.open(path) as snap:
        assert snap.libvirt is not None and snap.libvirt.complete and snap.stream_start == offset
        assert snap.block(RAM).bitmap_offset > offset  # absolute offsets, prefix included
        guest_stamps_ok(snap.block(RAM).read())
    assert mappedram.verify(path).ok


def _restore_and_check(workdir, image, path, *, mapped_ram: bool, offset: int = 0, paused: bool = True) -> None:
    uri = f"file:{path}" + (f",offset={offset:#x}" if offset else "")
    with Vm(workdir, image, incoming=True, name=f"dst{time.monotonic_ns()}") as dst:
        restore(dst, uri, mapped_ram=mapped_ram)
        if paused:
            dst.cmd("cont")
        counters_advance(dst)
        words = [dst.read_u32(FIRST + 0x1000 * i + 4) for i in (0, 100, 1000)]
        assert words == [0x4D415250] * 3


def _qemu_save_contents(vm, path):
    """A paused mapped-ram save by QEMU, as (its device state, its RAM blocks)."""
    save(vm, f"file:{path}", mapped_ram=True)
    with mappedram.open(path) as snap:
        return mappedram.DeviceState.from_snapshot(snap), {b.name: b.read() for b in snap}


def test_our_rewrite_restores_in_qemu(vm, workdir, image):
    """QEMU snapshot -> our writer (RAM rewritten, device sections passed through) -> QEMU."""
    devices, blocks = _qemu_save_contents(vm, workdir / "for-rewrite.sav")
    marker_page = 0x200000 // 0x1000
    blocks[RAM][0x200000 + 16 : 0x200000 + 20] = [0xDE, 0xAD, 0xBE, 0xEF]
    ours = workdir / "ours.sav"
    with mappedram.SnapshotWriter(ours, blocks, channels=4, devices=devices) as writer:
        writer.complete()
    assert mappedram.verify(ours).ok
    with Vm(workdir, image, incoming=True, name="dst-ours") as dst:
        restore(dst, f"file:{ours}", mapped_ram=True)
        assert dst.read_u32(marker_page * 0x1000 + 16) == 0xEFBEADDE  # our byte landed in guest RAM
        dst.cmd("cont")
        counters_advance(dst)


def test_convert_both_ways_restores_in_qemu(vm, workdir, image):
    legacy = workdir / "legacy.sav"
    save(vm, f"file:{legacy}")  # the classic stream
    with mappedram.open(legacy) as snap:
        assert snap.format == "stream"
        legacy_ram = hashlib.sha256(snap.block(RAM).read()).hexdigest()
    as_mapped = workdir / "converted-mr.sav"
    back = workdir / "converted-stream.sav"
    assert main(["convert", str(legacy), str(as_mapped), "--to", "mapped-ram"]) == 0
    assert main(["convert", str(as_mapped), str(back), "--to", "stream"]) == 0
    for path, fmt in ((as_mapped, "mapped-ram"), (back, "stream")):
        assert mappedram.verify(path).ok
        with mappedram.open(path) as snap:
            assert snap.format == fmt
            assert hashlib.sha256(snap.block(RAM).read()).hexdigest() == legacy_ram
    _restore_and_check(workdir, image, as_mapped, mapped_ram=True)
    _restore_and_check(workdir, image, back, mapped_ram=False)


def test_qemu_restores_libvirt_offset_file_written_by_us(vm, workdir, image):
    devices, blocks = _qemu_save_contents(vm, workdir / "for-prefix.sav")
    xml = b"<domain/>\0"
    prefix = S.LibvirtHeaderLE.build({"data_len": len(xml) + 4000}) + xml + bytes(4000)
    ours = workdir / "ours-libvirt.sav"
    with mappedram.SnapshotWriter(ours, blocks, devices=devices, prefix=prefix) as writer:
        writer.complete()
    _restore_and_check(workdir, image, ours, mapped_ram=True, offset=len(prefix))


def test_export_elf_matches_dump_guest_memory(vm, workdir):
    """QEMU's dump-guest-memory of a paused guest and our export of its save: the same
    PT_LOAD ranges holding the same bytes."""
    from test_physical import elf_loads

    vm.cmd("stop")
    theirs = workdir / "qemu-core.elf"
    vm.cmd("dump-guest-memory", paging=False, protocol=f"file:{theirs}")
    vga = next(d for bus in vm.cmd("query-pci") for d in bus["devices"] if d["class_info"]["class"] == 0x0300)
    vram_base = next(r["address"] for r in vga["regions"] if r["bar"] == 0)
    path = workdir / "for-elf.sav"
    save(vm, f"file:{path}", mapped_ram=True)
    ours = workdir / "our-core.elf"
    assert main(["export-elf", str(path), "-o", str(ours), "--map", f"0000:00:02.0/vga.vram={vram_base:#x}"]) == 0
    qemu_loads, our_loads = elf_loads(theirs), elf_loads(ours)
    assert [(a, n) for a, n, _ in our_loads] == [(a, n) for a, n, _ in qemu_loads]
    with open(theirs, "rb") as a, open(ours, "rb") as b:
        for (addr, size, off_a), (_, _, off_b) in zip(qemu_loads, our_loads):
            a.seek(off_a)
            b.seek(off_b)
            assert a.read(size) == b.read(size), hex(addr)
