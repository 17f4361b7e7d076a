"""Against a real libvirt 11 driving QEMU 10: `virsh save` images in every format read by us,
our conversions restored by `virsh restore`.

One domain boots tests/guest/boot.S (it stamps every page of [1 MiB, 63 MiB) and keeps
incrementing a counter in each). It is saved once in each of libvirt's seven image formats;
after each save `virsh restore --paused` and QEMU's `pmemsave` give the RAM that QEMU loaded
from the image: the ground truth mappedram's reading must equal. Then every image is converted
both ways (and to compressed streams) and each output restored: the guest runs on.
The tests start virtlogd and libvirtd themselves (root), and stop them at the end by pid.
Without root, libvirt 11 or QEMU 10 they skip; under CI (CI=true) they must run
(.ci/install-qemu, .ci/install-libvirt).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from libvirt_host import Daemons, Domain, missing, remove_stale_domains
from qemu_vm import RAM_MB, boot_and_wait, build_guest
from test_qemu import FIRST, counters_advance, guest_stamps_ok

import mappedram
from mappedram.cli import main

pytestmark = [pytest.mark.qemu, pytest.mark.libvirt]

if (reason := missing()) is not None:
    if os.environ.get("CI"):
        raise RuntimeError(f"CI needs libvirt 11 as root: {reason}")
    pytest.skip(reason, allow_module_level=True)

# libvirt's virQEMUSaveFormat (qemu_saveimage.h): the header's format field per --image-format.
FORMATS = {"raw": 0, "gzip": 1, "bzip2": 2, "xz": 3, "lzop": 4, "zstd": 5, "sparse": 6}
SAVE_OPTIONS = {"sparse": ("--parallel-channels", "4")}
# How libvirt decompresses an image on restore (qemuSaveImageGetCompressionCommand).
DECOMPRESS = {name: (name, "-dc") for name in ("gzip", "bzip2", "xz", "zstd")}
DECOMPRESS["lzop"] = ("lzop", "-dc", "--ignore-warn")
# convert's option for a compressed output, beside --to stream; its values are libvirt's names.
COMPRESS_OPTION = "--compress"
# (the image converted, the compressor of the output): every compressor once, from each kind of input.
COMPRESSED_OUTPUTS = [("raw", "zstd"), ("sparse", "gzip"), ("zstd", "xz"), ("gzip", "bzip2"), ("sparse", "lzop")]

RAM = "pc.ram"
VGA_WINDOW = (0xA0000, 0xC0000)  # guest-physical addresses that are not pc.ram in a pmemsave
HEADER = struct.Struct("<16s5I56x")  # virQEMUSaveHeader on a little-endian host (92 bytes)
QEVM = b"QEVM\x00\x00\x00\x03"


@dataclass(frozen=True)
class SaveHeader:
    magic: bytes
    version: int
    data_len: int
    was_running: int
    format: int
    cookie_offset: int
    xml: bytes
    cookie: bytes

    @property
    def stream_start(self) -> int:
        return HEADER.size + self.data_len


def read_header(path: Path) -> SaveHeader:
    """libvirt's header, its domain XML and cookie, parsed here as qemuSaveImageReadHeader does."""
    with path.open("rb") as f:
        magic, version, data_len, was_running, fmt, cookie_offset = HEADER.unpack(f.read(HEADER.size))
        data = f.read(data_len)
    xml_len = cookie_offset or data_len
    return SaveHeader(
        magic,
        version,
        data_len,
        was_running,
        fmt,
        cookie_offset,
        data[:xml_len].split(b"\0", 1)[0],
        data[xml_len:].split(b"\0", 1)[0],
    )


class Saved(NamedTuple):
    image: Path  # what `virsh save` wrote
    truth: Path  # QEMU's pmemsave of guest-physical [0, RAM) after restoring it


@pytest.fixture(scope="session")
def daemons():
    started = Daemons()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def workdir():
    """Not under pytest's tmp_path (mode 0700): QEMU runs as libvirt-qemu and must reach the
    boot disk here, and write its pmemsave files into truth/."""
    path = Path(tempfile.mkdtemp(prefix="mappedram-libvirt-"))
    path.chmod(0o711)
    (path / "truth").mkdir(mode=0o777)
    (path / "truth").chmod(0o777)  # past the umask
    yield path
    shutil.rmtree(path)


@pytest.fixture(scope="module")
def domain(daemons, workdir):
    remove_stale_domains()
    dom = Domain(workdir, build_guest(workdir))
    try:
        dom.start()
        boot_and_wait(dom)  # it needs only read_u32
        yield dom
    finally:
        dom.remove()


@pytest.fixture(scope="module")
def saves(domain, workdir) -> dict[str, Saved]:
    """The running domain saved in each format; after each save, restored paused, its RAM
    taken by pmemsave, and resumed for the next save."""
    out = {}
    for fmt in FORMATS:
        image, truth = workdir / f"{fmt}.sav", workdir / "truth" / f"{fmt}.bin"
        domain.save(image, fmt, *SAVE_OPTIONS.get(fmt, ()))
        domain.restore(image, paused=True)
        domain.pmemsave(truth)
        domain.resume()
        out[fmt] = Saved(image, truth)
    return out


def extract_ram(image: Path, workdir: Path) -> np.ndarray:
    """pc.ram as `mappedram extract` writes it (the file deleted once read)."""
    out = workdir / f"{image.stem}.pc.ram"
    assert main(["extract", str(image), "--block", RAM, "-o", str(out)]) == 0
    try:
        return np.fromfile(out, dtype=np.uint8)
    finally:
        out.unlink()


def assert_same_ram(ram: np.ndarray, truth: Path) -> None:
    """pc.ram against guest-physical memory, outside the VGA window."""
    pmem = np.fromfile(truth, dtype=np.uint8)
    assert ram.size == pmem.size == RAM_MB << 20
    low, high = VGA_WINDOW
    assert np.array_equal(ram[:low], pmem[:low])
    assert np.array_equal(ram[high:], pmem[high:])


def restore_runs(domain: Domain, image: Path) -> None:
    """`virsh restore` accepts the image and the guest runs on from it."""
    if domain.state() != "shut off":
        domain.destroy()
    domain.restore(image)
    assert domain.state() == "running"
    counters_advance(domain)
    assert [domain.read_u32(FIRST + 0x1000 * i + 4) for i in (0, 100, 1000)] == [0x4D415250] * 3


def assert_header_kept(out: Path, src: Path, fmt: int) -> SaveHeader:
    """convert's output carries the input's libvirt header: the XML, the cookie and
    was_running kept, the format field saying what follows it."""
    theirs, ours = read_header(src), read_header(out)
    assert ours.magic == b"LibvirtQemudSave" and ours.version == 2
    assert (ours.xml, ours.cookie, ours.was_running) == (theirs.xml, theirs.cookie, theirs.was_running)
    assert b"<domain" in ours.xml and ours.cookie.startswith(b"<cookie>")
    assert ours.format == fmt
    return ours


@pytest.mark.parametrize("fmt", FORMATS)
def test_virsh_save_reads_as_qemu_restored_it(saves, workdir, fmt, capsys):
    """extract and verify --hash of every format give the RAM QEMU loaded from the image; for
    the formats with random access (raw, sparse) so does mappedram.open()."""
    image, truth = saves[fmt]
    header = read_header(image)
    assert header.magic == b"LibvirtQemudSave" and header.format == FORMATS[fmt]
    ram = extract_ram(image, workdir)
    assert_same_ram(ram, truth)
    guest_stamps_ok(ram)

    capsys.readouterr()
    assert main(["verify", str(image), "--hash", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["valid"], report["problems"]
    assert report["sha256"][RAM] == hashlib.sha256(ram).hexdigest()

    assert main(["dump", str(image), "--json"]) == 0
    dump = json.loads(capsys.readouterr().out)
    assert dump["stream_start"] == header.stream_start
    assert dump["format"] == ("mapped-ram" if fmt == "sparse" else "stream")

    if fmt in ("raw", "sparse"):
        with mappedram.open(image) as snap:
            assert snap.libvirt is not None and snap.stream_start == header.stream_start
            assert np.array_equal(snap.block(RAM).read(), ram)


@pytest.mark.parametrize("to", ["mapped-ram", "stream"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_convert_restores_in_libvirt(saves, domain, workdir, fmt, to):
    """Every image to the sparse (6) and the raw (0) format: the same RAM, and libvirt restores it."""
    image, truth = saves[fmt]
    out = workdir / f"{fmt}-to-{to}.sav"
    assert main(["convert", str(image), str(out), "--to", to]) == 0
    header = assert_header_kept(out, image, FORMATS["sparse" if to == "mapped-ram" else "raw"])
    with out.open("rb") as f:
        f.seek(header.stream_start)
        assert f.read(len(QEVM)) == QEVM
    with mappedram.open(out) as snap:
        assert snap.format == to
    assert_same_ram(extract_ram(out, workdir), truth)
    restore_runs(domain, out)


@pytest.mark.parametrize(("fmt", "compressor"), COMPRESSED_OUTPUTS)
def test_convert_to_compressed_restores_in_libvirt(saves, domain, workdir, fmt, compressor):
    """A compressed stream as libvirt writes it: the format field names the compressor, the
    program libvirt runs on restore decompresses what follows the header to a QEMU stream."""
    image, truth = saves[fmt]
    out = workdir / f"{fmt}-to-{compressor}.sav"
    assert main(["convert", str(image), str(out), "--to", "stream", COMPRESS_OPTION, compressor]) == 0
    header = assert_header_kept(out, image, FORMATS[compressor])
    with out.open("rb") as f:
        f.seek(header.stream_start)
        stream = subprocess.run(DECOMPRESS[compressor], stdin=f, capture_output=True, check=True).stdout
    assert stream.startswith(QEVM)
    assert_same_ram(extract_ram(out, workdir), truth)
    restore_runs(domain, out)
